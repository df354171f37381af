/*
 * edge_slm._core: the only file that includes Python.h.
 *
 * Arguments arrive as buffers: raw bytes (quantized blocks) through y* and
 * w*, typed arrays (float32, int32, uint8) through converters that also
 * check the element type. Sizes are checked here, once, so the kernels can
 * trust them. The GIL is released
 * around every kernel call. Kernel status codes become Python exceptions.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdlib.h>
#include <string.h>

#include "edge_bandwidth.h"
#include "edge_kernels.h"
#include "edge_model.h"

/* ---- helpers ---- */

static const ek_kernels *kernels_named(const char *name) {
    const ek_kernels *k = (name && *name) ? ek_find(name) : ek_best();
    if (!k) PyErr_Format(PyExc_ValueError, "kernel backend '%s' is unknown or unsupported here", name);
    return k;
}

/* "O&" converters: a C-contiguous buffer of the element type the kernel
 * reads, or a TypeError naming the one it got. Called again with NULL to
 * release the buffer when a later argument fails to parse. */
static int typed_buffer(PyObject *obj, Py_buffer *b, int writable, const char *codes,
                        Py_ssize_t itemsize, const char *type_name) {
    if (!obj) {
        PyBuffer_Release(b);
        return 1;
    }
    int flags = PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | (writable ? PyBUF_WRITABLE : 0);
    if (PyObject_GetBuffer(obj, b, flags) < 0) return 0;
    const char *f = b->format ? b->format : "B";
    if (*f == '@' || *f == '=' || *f == '<') f++; /* native order: the targets are little-endian */
    if (b->itemsize != itemsize || !f[0] || f[1] || !strchr(codes, f[0])) {
        PyErr_Format(PyExc_TypeError, "expected a contiguous %s array, got format '%s'", type_name,
                     b->format ? b->format : "B");
        PyBuffer_Release(b);
        return 0;
    }
    return Py_CLEANUP_SUPPORTED;
}

static int f32_in(PyObject *o, void *b) { return typed_buffer(o, b, 0, "f", 4, "float32"); }
static int f32_out(PyObject *o, void *b) { return typed_buffer(o, b, 1, "f", 4, "writable float32"); }
static int i32_in(PyObject *o, void *b) { return typed_buffer(o, b, 0, "il", 4, "int32"); }
static int u8_in(PyObject *o, void *b) { return typed_buffer(o, b, 0, "B", 1, "uint8"); }

static int need_bytes(const char *what, const Py_buffer *b, size_t n) {
    if ((size_t)b->len != n) {
        PyErr_Format(PyExc_ValueError, "%s has %zd bytes, expected %zu", what, b->len, n);
        return -1;
    }
    return 0;
}

static int need_block_multiple(int type, int n) {
    int be = ek_type_block_elems(type);
    if (!be) {
        PyErr_Format(PyExc_ValueError, "unsupported tensor type %d", type);
        return -1;
    }
    if (n <= 0 || n % be) {
        PyErr_Format(PyExc_ValueError, "length %d is not a positive multiple of %d", n, be);
        return -1;
    }
    return 0;
}

static const ek_type_ops *type_ops(const ek_kernels *k, int type) {
    if (type < 0 || type >= EK_TYPE_COUNT || !k->types[type].gemm) {
        PyErr_Format(PyExc_ValueError, "no kernel for tensor type %d", type);
        return NULL;
    }
    return &k->types[type];
}

/* The model's hyperparameters from a dict with exactly these keys. */
static int parse_config(PyObject *config, ek_config *c) {
    static char *names[] = {"n_layer", "dim", "hidden_dim", "n_head", "n_kv_head", "head_dim",
                            "vocab", "norm_eps", "rope_base", "rope_neox", "rope_scale", "ffn_act",
                            "embd_scale", "attn_scale", "swa_window", "swa_pattern",
                            "rope_base_swa", NULL};
    *c = (ek_config){0};
    PyObject *empty = PyTuple_New(0);
    int ok = empty && PyArg_ParseTupleAndKeywords(
                          empty, config, "$iiiiiiiffpfiffiif", names, &c->n_layer, &c->dim,
                          &c->hidden_dim, &c->n_head, &c->n_kv_head, &c->head_dim, &c->vocab,
                          &c->norm_eps, &c->rope_base, &c->rope_neox, &c->rope_scale, &c->ffn_act,
                          &c->embd_scale, &c->attn_scale, &c->swa_window, &c->swa_pattern,
                          &c->rope_base_swa);
    Py_XDECREF(empty);
    return ok ? 0 : -1;
}

static PyObject *status_error(int rc, const char *what) {
    switch (rc) {
    case EK_ENOMEM: return PyErr_NoMemory();
    case EK_ERANGE: PyErr_Format(PyExc_IndexError, "%s: position or slot out of range", what); break;
    case EK_EGONE:
        PyErr_Format(PyExc_IndexError, "%s: the sliding-window layers no longer hold the window before this position", what);
        break;
    default: PyErr_Format(PyExc_ValueError, "%s: invalid arguments (code %d)", what, rc); break;
    }
    return NULL;
}

/* ---- module-level introspection ---- */

static PyObject *py_backends(PyObject *self, PyObject *noargs) {
    (void)self, (void)noargs;
    PyObject *list = PyList_New(0);
    if (!list) return NULL;
    for (const ek_kernels *const *k = ek_available(); *k; k++) {
        PyObject *s = PyUnicode_FromString((*k)->name);
        if (!s || PyList_Append(list, s) < 0) {
            Py_XDECREF(s);
            Py_DECREF(list);
            return NULL;
        }
        Py_DECREF(s);
    }
    return list;
}

static PyObject *py_best_backend(PyObject *self, PyObject *noargs) {
    (void)self, (void)noargs;
    return PyUnicode_FromString(ek_best()->name);
}

static PyObject *py_type_sizes(PyObject *self, PyObject *noargs) {
    (void)self, (void)noargs;
    PyObject *d = PyDict_New();
    if (!d) return NULL;
    for (int t = 0; t < EK_TYPE_COUNT; t++) {
        if (!ek_type_block_elems(t)) continue;
        PyObject *v = Py_BuildValue("(in)", ek_type_block_elems(t), (Py_ssize_t)ek_type_block_bytes(t));
        PyObject *key = PyLong_FromLong(t);
        if (!v || !key || PyDict_SetItem(d, key, v) < 0) {
            Py_XDECREF(v);
            Py_XDECREF(key);
            Py_DECREF(d);
            return NULL;
        }
        Py_DECREF(v);
        Py_DECREF(key);
    }
    return d;
}

/* ---- single kernels, for tests and for anyone comparing implementations ---- */

static PyObject *py_quantize(PyObject *self, PyObject *args) {
    (void)self;
    const char *backend;
    int type;
    Py_buffer x, y;
    if (!PyArg_ParseTuple(args, "ziO&w*", &backend, &type, f32_in, &x, &y)) return NULL;
    PyObject *ret = NULL;
    const ek_kernels *k = kernels_named(backend);
    int n = (int)(x.len / sizeof(float));
    if (!k || need_block_multiple(type, n)) goto done;
    ek_quantize_fn q = NULL;
    if (type == EK_TYPE_Q8_0) q = k->types[EK_TYPE_Q4_0].quantize;
    if (type == EK_TYPE_Q8_1) q = k->types[EK_TYPE_Q4_1].quantize;
    if (type == EK_TYPE_Q8_K) q = k->types[EK_TYPE_Q4_K].quantize;
    if (!q) {
        PyErr_Format(PyExc_ValueError, "no activation quantizer for type %d", type);
        goto done;
    }
    if (need_bytes("output", &y, ek_row_bytes(type, n))) goto done;
    Py_BEGIN_ALLOW_THREADS q(x.buf, y.buf, n);
    Py_END_ALLOW_THREADS ret = Py_NewRef(Py_None);
done:
    PyBuffer_Release(&x);
    PyBuffer_Release(&y);
    return ret;
}

static PyObject *py_dequantize(PyObject *self, PyObject *args) {
    (void)self;
    const char *backend;
    int type;
    Py_buffer x, y;
    if (!PyArg_ParseTuple(args, "ziy*O&", &backend, &type, &x, f32_out, &y)) return NULL;
    PyObject *ret = NULL;
    const ek_kernels *k = kernels_named(backend);
    int n = (int)(y.len / sizeof(float));
    const ek_type_ops *ops = k ? type_ops(k, type) : NULL;
    if (!ops || need_block_multiple(type, n) || need_bytes("input", &x, ek_row_bytes(type, n)))
        goto done;
    Py_BEGIN_ALLOW_THREADS ops->dequantize(x.buf, y.buf, n);
    Py_END_ALLOW_THREADS ret = Py_NewRef(Py_None);
done:
    PyBuffer_Release(&x);
    PyBuffer_Release(&y);
    return ret;
}

/* y[nx, rows] = x[nx, cols] @ W[rows, cols].T, activations quantized by the
 * backend's own quantizer exactly as the forward pass does; with x8 set,
 * W is first repacked and multiplied by the x8 gemm, as the model does. */
static PyObject *py_matmul(PyObject *self, PyObject *args) {
    (void)self;
    const char *backend;
    int type, rows, cols, nx, x8 = 0;
    Py_buffer w, x, y;
    if (!PyArg_ParseTuple(args, "ziiiy*O&O&|p", &backend, &type, &rows, &cols, &w, f32_in, &x,
                          f32_out, &y, &x8))
        return NULL;
    PyObject *ret = NULL;
    void *xq = NULL, *packed = NULL;
    const ek_kernels *k = kernels_named(backend);
    const ek_type_ops *ops = k ? type_ops(k, type) : NULL;
    nx = cols > 0 ? (int)(x.len / sizeof(float) / cols) : 0;
    if (!ops || need_block_multiple(type, cols) || rows <= 0 || nx <= 0 ||
        need_bytes("weights", &w, (size_t)rows * ek_row_bytes(type, cols)) ||
        need_bytes("x", &x, (size_t)nx * cols * sizeof(float)) ||
        need_bytes("y", &y, (size_t)nx * rows * sizeof(float)))
        goto done;
    const void *xa = x.buf;
    size_t x_stride = (size_t)cols * sizeof(float);
    if (ops->act_type != EK_TYPE_F32) {
        x_stride = ek_row_bytes(ops->act_type, cols);
        xq = malloc((size_t)nx * x_stride);
        if (!xq) {
            PyErr_NoMemory();
            goto done;
        }
        xa = xq;
    }
    ek_gemm_fn gemm = ops->gemm;
    const void *wa = w.buf;
    if (x8) {
        if (!ops->gemm_x8) {
            PyErr_Format(PyExc_ValueError, "type %d has no x8 layout in %s", type, k->name);
            goto done;
        }
        if (!(packed = malloc((size_t)rows * ek_row_bytes(type, cols)))) {
            PyErr_NoMemory();
            goto done;
        }
        ek_x8_pack(type, w.buf, packed, rows, cols, 0);
        gemm = ops->gemm_x8;
        wa = packed;
    }
    Py_BEGIN_ALLOW_THREADS
    if (xq)
        for (int j = 0; j < nx; j++)
            ops->quantize((const float *)x.buf + (size_t)j * cols, (char *)xq + j * x_stride, cols);
    gemm(cols, wa, ek_row_bytes(type, cols), rows, xa, x_stride, nx, y.buf, (size_t)rows);
    Py_END_ALLOW_THREADS ret = Py_NewRef(Py_None);
done:
    free(xq);
    free(packed);
    PyBuffer_Release(&w);
    PyBuffer_Release(&x);
    PyBuffer_Release(&y);
    return ret;
}

static PyObject *py_rmsnorm(PyObject *self, PyObject *args) {
    (void)self;
    const char *backend;
    float eps;
    Py_buffer x, w, out;
    if (!PyArg_ParseTuple(args, "zO&O&fO&", &backend, f32_in, &x, f32_in, &w, &eps, f32_out, &out)) return NULL;
    PyObject *ret = NULL;
    const ek_kernels *k = kernels_named(backend);
    int n = (int)(x.len / sizeof(float));
    if (!k || n < 1 || need_bytes("w", &w, x.len) || need_bytes("out", &out, x.len)) goto done;
    Py_BEGIN_ALLOW_THREADS k->rmsnorm(out.buf, x.buf, w.buf, n, eps);
    Py_END_ALLOW_THREADS ret = Py_NewRef(Py_None);
done:
    PyBuffer_Release(&x);
    PyBuffer_Release(&w);
    PyBuffer_Release(&out);
    return ret;
}

static PyObject *py_rope(PyObject *self, PyObject *args) {
    (void)self;
    const char *backend;
    int n_heads, head_dim;
    Py_buffer x, cs;
    if (!PyArg_ParseTuple(args, "zO&iiO&", &backend, f32_out, &x, &n_heads, &head_dim, f32_in, &cs)) return NULL;
    PyObject *ret = NULL;
    const ek_kernels *k = kernels_named(backend);
    if (!k) goto done;
    if (n_heads < 1 || head_dim < 2 || head_dim % 2) {
        PyErr_SetString(PyExc_ValueError, "rope needs heads >= 1 and an even head size");
        goto done;
    }
    if (need_bytes("x", &x, (size_t)n_heads * head_dim * sizeof(float)) ||
        need_bytes("cs", &cs, (size_t)head_dim * sizeof(float)))
        goto done;
    Py_BEGIN_ALLOW_THREADS k->rope(x.buf, n_heads, head_dim, cs.buf);
    Py_END_ALLOW_THREADS ret = Py_NewRef(Py_None);
done:
    PyBuffer_Release(&x);
    PyBuffer_Release(&cs);
    return ret;
}

static PyObject *py_silu_mul(PyObject *self, PyObject *args) {
    (void)self;
    const char *backend;
    Py_buffer gate, up, out;
    if (!PyArg_ParseTuple(args, "zO&O&O&", &backend, f32_in, &gate, f32_in, &up, f32_out, &out)) return NULL;
    PyObject *ret = NULL;
    const ek_kernels *k = kernels_named(backend);
    if (!k || need_bytes("up", &up, gate.len) || need_bytes("out", &out, gate.len)) goto done;
    Py_BEGIN_ALLOW_THREADS k->silu_mul(out.buf, gate.buf, up.buf, (int)(gate.len / sizeof(float)));
    Py_END_ALLOW_THREADS ret = Py_NewRef(Py_None);
done:
    PyBuffer_Release(&gate);
    PyBuffer_Release(&up);
    PyBuffer_Release(&out);
    return ret;
}

static PyObject *py_softmax(PyObject *self, PyObject *args) {
    (void)self;
    const char *backend;
    Py_buffer x;
    if (!PyArg_ParseTuple(args, "zO&", &backend, f32_out, &x)) return NULL;
    PyObject *ret = NULL;
    const ek_kernels *k = kernels_named(backend);
    if (!k) goto done;
    if (x.len < (Py_ssize_t)sizeof(float)) {
        PyErr_SetString(PyExc_ValueError, "softmax of an empty vector");
        goto done;
    }
    Py_BEGIN_ALLOW_THREADS k->softmax(x.buf, (int)(x.len / sizeof(float)));
    Py_END_ALLOW_THREADS ret = Py_NewRef(Py_None);
done:
    PyBuffer_Release(&x);
    return ret;
}

/* One head over n_pos cached positions; k and v are [n_pos] rows of
 * head_dim elements in kv_type, as the cache stores them. */
static PyObject *py_attention(PyObject *self, PyObject *args) {
    (void)self;
    const char *backend;
    int kv_type, n_pos, head_dim;
    float scale;
    Py_buffer q, kc, vc, out;
    if (!PyArg_ParseTuple(args, "zO&y*y*iiifO&", &backend, f32_in, &q, &kc, &vc, &kv_type, &n_pos,
                          &head_dim, &scale, f32_out, &out))
        return NULL;
    PyObject *ret = NULL;
    float *scores = NULL;
    const ek_kernels *k = kernels_named(backend);
    if (!k) goto done;
    if ((kv_type != EK_TYPE_F16 && kv_type != EK_TYPE_Q8_0) || n_pos < 1 || head_dim < 1 ||
        head_dim > 512 || need_block_multiple(kv_type, head_dim))
        goto fail_args;
    size_t row = ek_row_bytes(kv_type, head_dim);
    if (need_bytes("q", &q, (size_t)head_dim * sizeof(float)) ||
        need_bytes("k", &kc, (size_t)n_pos * row) || need_bytes("v", &vc, (size_t)n_pos * row) ||
        need_bytes("out", &out, (size_t)head_dim * sizeof(float)))
        goto done;
    scores = malloc((size_t)n_pos * sizeof(float));
    if (!scores) {
        PyErr_NoMemory();
        goto done;
    }
    Py_BEGIN_ALLOW_THREADS k->attention(out.buf, q.buf, kc.buf, vc.buf, row, kv_type, n_pos, head_dim,
                                        scale, scores);
    Py_END_ALLOW_THREADS ret = Py_NewRef(Py_None);
    goto done;
fail_args:
    if (!PyErr_Occurred())
        PyErr_SetString(PyExc_ValueError, "attention needs an F16 or Q8_0 cache and head size <= 512");
done:
    free(scores);
    PyBuffer_Release(&q);
    PyBuffer_Release(&kc);
    PyBuffer_Release(&vc);
    PyBuffer_Release(&out);
    return ret;
}

static PyObject *py_kv_store(PyObject *self, PyObject *args) {
    (void)self;
    const char *backend;
    int kv_type;
    Py_buffer src, dst;
    if (!PyArg_ParseTuple(args, "ziO&w*", &backend, &kv_type, f32_in, &src, &dst)) return NULL;
    PyObject *ret = NULL;
    const ek_kernels *k = kernels_named(backend);
    int n = (int)(src.len / sizeof(float));
    if (!k) goto done;
    if (kv_type != EK_TYPE_F16 && kv_type != EK_TYPE_Q8_0) {
        PyErr_SetString(PyExc_ValueError, "the cache holds F16 or Q8_0");
        goto done;
    }
    if (need_block_multiple(kv_type, n) || need_bytes("dst", &dst, ek_row_bytes(kv_type, n))) goto done;
    Py_BEGIN_ALLOW_THREADS k->kv_store(dst.buf, src.buf, n, kv_type);
    Py_END_ALLOW_THREADS ret = Py_NewRef(Py_None);
done:
    PyBuffer_Release(&src);
    PyBuffer_Release(&dst);
    return ret;
}

/* ---- the model ---- */

typedef struct {
    PyObject_HEAD
    ek_model *model;
    ek_config cfg;
    ek_model_params params;
    Py_buffer *bufs; /* every weight buffer, held for the model's lifetime */
    int n_bufs;
} ModelObject;

static void Model_dealloc(ModelObject *self) {
    ek_model_destroy(self->model);
    for (int i = 0; i < self->n_bufs; i++) PyBuffer_Release(&self->bufs[i]);
    PyMem_Free(self->bufs);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* A layer's tensors by their GGUF names (after "blk.N."); which optional
 * ones a family has is the Python side's business (edge_slm/model.py). */
static const struct {
    const char *name;
    size_t offset;
    int optional;
} layer_parts[] = {
    {"attn_norm.weight", offsetof(ek_layer, attn_norm), 0},
    {"attn_q.weight", offsetof(ek_layer, wq), 0},
    {"attn_k.weight", offsetof(ek_layer, wk), 0},
    {"attn_v.weight", offsetof(ek_layer, wv), 0},
    {"attn_q.bias", offsetof(ek_layer, bq), 1},
    {"attn_k.bias", offsetof(ek_layer, bk), 1},
    {"attn_v.bias", offsetof(ek_layer, bv), 1},
    {"attn_q_norm.weight", offsetof(ek_layer, q_norm), 1},
    {"attn_k_norm.weight", offsetof(ek_layer, k_norm), 1},
    {"attn_output.weight", offsetof(ek_layer, wo), 0},
    {"post_attention_norm.weight", offsetof(ek_layer, attn_post_norm), 1},
    {"ffn_norm.weight", offsetof(ek_layer, ffn_norm), 0},
    {"ffn_gate.weight", offsetof(ek_layer, w_gate), 0},
    {"ffn_up.weight", offsetof(ek_layer, w_up), 0},
    {"ffn_down.weight", offsetof(ek_layer, w_down), 0},
    {"post_ffw_norm.weight", offsetof(ek_layer, ffn_post_norm), 1},
};
#define LAYER_TENSORS (sizeof layer_parts / sizeof layer_parts[0])

/* tensors[name] = (buffer, type, rows, cols); names as in GGUF files. */
static int take_tensor(ModelObject *self, PyObject *tensors, const char *name, ek_tensor *t,
                       int optional) {
    PyObject *entry = PyDict_GetItemString(tensors, name);
    if (!entry) {
        if (optional) return 0;
        PyErr_Format(PyExc_KeyError, "tensor %s is missing", name);
        return -1;
    }
    PyObject *obj;
    if (!PyArg_ParseTuple(entry, "Oiii", &obj, &t->type, &t->rows, &t->cols)) return -1;
    Py_buffer *b = &self->bufs[self->n_bufs];
    if (PyObject_GetBuffer(obj, b, PyBUF_SIMPLE) < 0) return -1;
    self->n_bufs++;
    size_t want = t->rows > 0 ? (size_t)t->rows * ek_row_bytes(t->type, t->cols) : 0;
    if (!want || (size_t)b->len < want) {
        PyErr_Format(PyExc_ValueError, "tensor %s holds %zd bytes, expected %zu", name, b->len, want);
        return -1;
    }
    t->data = b->buf;
    return 0;
}

static int Model_init(ModelObject *self, PyObject *args, PyObject *kw) {
    static char *names[] = {"config", "tensors", "n_threads", "n_slots", "n_ctx", "max_batch",
                            "kv_type", "backend", "mapped", NULL};
    PyObject *config, *tensors;
    const char *backend = NULL;
    ek_model_params p = {1, 1, 0, 1, EK_TYPE_F16, NULL, 0};
    if (self->model) {
        PyErr_SetString(PyExc_RuntimeError, "Model is already initialised");
        return -1;
    }
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O!O!|iiiiizp", names, &PyDict_Type, &config,
                                     &PyDict_Type, &tensors, &p.n_threads, &p.n_slots, &p.n_ctx,
                                     &p.max_batch, &p.kv_type, &backend, &p.weights_mapped))
        return -1;
    if (!(p.kernels = kernels_named(backend))) return -1;

    ek_config c;
    if (parse_config(config, &c)) return -1;
    if (c.n_layer < 1 || c.n_layer > 1024) {
        PyErr_Format(PyExc_ValueError, "unreasonable layer count %d", c.n_layer);
        return -1;
    }
    if (p.n_ctx < 1) {
        PyErr_SetString(PyExc_ValueError, "n_ctx must be positive");
        return -1;
    }

    self->bufs = PyMem_Calloc((size_t)c.n_layer * LAYER_TENSORS + 4, sizeof(Py_buffer));
    ek_layer *layers = PyMem_Calloc((size_t)c.n_layer, sizeof(ek_layer));
    if (!self->bufs || !layers) {
        PyMem_Free(layers);
        PyErr_NoMemory();
        return -1;
    }
    ek_weights w = {.cfg = c, .layers = layers};
    int rc = -1;
    if (take_tensor(self, tensors, "token_embd.weight", &w.tok_embd, 0) ||
        take_tensor(self, tensors, "output_norm.weight", &w.out_norm, 0) ||
        take_tensor(self, tensors, "output.weight", &w.output, 1) ||
        take_tensor(self, tensors, "rope_freqs.weight", &w.rope_freqs, 1))
        goto done;
    if (!w.output.data) w.output = w.tok_embd; /* tied embedding */
    for (int l = 0; l < c.n_layer; l++) {
        for (size_t i = 0; i < LAYER_TENSORS; i++) {
            char name[64];
            snprintf(name, sizeof name, "blk.%d.%s", l, layer_parts[i].name);
            if (take_tensor(self, tensors, name, (ek_tensor *)((char *)&layers[l] + layer_parts[i].offset),
                            layer_parts[i].optional))
                goto done;
        }
    }
    char err[256] = "";
    int status;
    Py_BEGIN_ALLOW_THREADS status = ek_model_create(&w, &p, &self->model, err, sizeof err);
    Py_END_ALLOW_THREADS
    if (status == EK_ENOMEM) {
        PyErr_Format(PyExc_MemoryError, "%s", err);
        goto done;
    }
    if (status) {
        PyErr_Format(PyExc_ValueError, "%s", err);
        goto done;
    }
    self->cfg = c;
    self->params = p;
    rc = 0;
done:
    PyMem_Free(layers); /* the model keeps its own copy */
    return rc;
}

static int model_ready(ModelObject *self) {
    if (!self->model) PyErr_SetString(PyExc_RuntimeError, "Model is not initialised");
    return self->model != NULL;
}

/* forward(tokens int32[n], pos int32[n], slot int32[n], want uint8[n],
 *         logits float32[sum(want), vocab]) */
static PyObject *Model_forward(ModelObject *self, PyObject *args) {
    Py_buffer tok, pos, slot, want, logits;
    if (!model_ready(self)) return NULL;
    if (!PyArg_ParseTuple(args, "O&O&O&O&O&", i32_in, &tok, i32_in, &pos, i32_in, &slot, u8_in,
                          &want, f32_out, &logits)) return NULL;
    PyObject *ret = NULL;
    Py_ssize_t n = tok.len / (Py_ssize_t)sizeof(int32_t);
    if (n < 1 || n > self->params.max_batch) {
        PyErr_Format(PyExc_ValueError, "batch of %zd tokens, expected 1..%d", n, self->params.max_batch);
        goto done;
    }
    if (need_bytes("pos", &pos, (size_t)tok.len) || need_bytes("slot", &slot, (size_t)tok.len) ||
        need_bytes("want", &want, (size_t)n))
        goto done;
    size_t n_out = 0;
    for (Py_ssize_t i = 0; i < n; i++) n_out += ((const uint8_t *)want.buf)[i] != 0;
    if (need_bytes("logits", &logits, n_out * (size_t)self->cfg.vocab * sizeof(float))) goto done;
    int rc;
    Py_BEGIN_ALLOW_THREADS rc = ek_forward(self->model, (int)n, tok.buf, pos.buf, slot.buf, want.buf,
                                           logits.buf);
    Py_END_ALLOW_THREADS
    if (rc) {
        status_error(rc, "forward");
        goto done;
    }
    ret = Py_NewRef(Py_None);
done:
    PyBuffer_Release(&tok);
    PyBuffer_Release(&pos);
    PyBuffer_Release(&slot);
    PyBuffer_Release(&want);
    PyBuffer_Release(&logits);
    return ret;
}

static PyObject *Model_kv_shift(ModelObject *self, PyObject *args) {
    int slot, keep, n_drop, n_used, rc;
    if (!model_ready(self) || !PyArg_ParseTuple(args, "iiii", &slot, &keep, &n_drop, &n_used))
        return NULL;
    Py_BEGIN_ALLOW_THREADS rc = ek_kv_shift(self->model, slot, keep, n_drop, n_used);
    Py_END_ALLOW_THREADS
    return rc ? status_error(rc, "kv_shift") : Py_NewRef(Py_None);
}

static PyObject *Model_kv_copy(ModelObject *self, PyObject *args) {
    int src, dst, n, rc;
    if (!model_ready(self) || !PyArg_ParseTuple(args, "iii", &src, &dst, &n)) return NULL;
    Py_BEGIN_ALLOW_THREADS rc = ek_kv_copy(self->model, src, dst, n);
    Py_END_ALLOW_THREADS
    return rc ? status_error(rc, "kv_copy") : Py_NewRef(Py_None);
}

static PyObject *Model_kv_usable(ModelObject *self, PyObject *args) {
    int slot, n, kept;
    if (!model_ready(self) || !PyArg_ParseTuple(args, "ii", &slot, &n)) return NULL;
    kept = ek_kv_usable(self->model, slot, n);
    return kept < 0 ? status_error(-kept, "kv_usable") : PyLong_FromLong(kept);
}

/* profile(on) -> what was gathered since the last call:
 *   {"runs": n, "tokens": n, "ops": {name: (seconds, weight bytes)}}
 * with names embed, norm, ..., and gemm:<GGUF type id> per weight type. */
static PyObject *Model_profile(ModelObject *self, PyObject *args) {
    static const char *names[EK_PROF_GEMM] = {"embed",     "norm",    "quantize", "rope_kv",
                                              "attention", "ffn_act", "add",      "dispatch"};
    int on;
    if (!model_ready(self) || !PyArg_ParseTuple(args, "p", &on)) return NULL;
    ek_profile prof;
    ek_model_profile(self->model, on, &prof);
    PyObject *ops = PyDict_New();
    if (!ops) return NULL;
    for (int k = 0; k < EK_PROF_KINDS; k++) {
        if (k >= EK_PROF_GEMM && prof.seconds[k] == 0.0) continue;
        char gemm[24];
        if (k >= EK_PROF_GEMM) snprintf(gemm, sizeof gemm, "gemm:%d", k - EK_PROF_GEMM);
        PyObject *v = Py_BuildValue("(dd)", prof.seconds[k], prof.bytes[k]);
        if (!v || PyDict_SetItemString(ops, k < EK_PROF_GEMM ? names[k] : gemm, v) < 0) {
            Py_XDECREF(v);
            Py_DECREF(ops);
            return NULL;
        }
        Py_DECREF(v);
    }
    return Py_BuildValue("{s:L,s:L,s:N}", "runs", (long long)prof.runs, "tokens",
                         (long long)prof.tokens, "ops", ops);
}

static PyObject *Model_get_backend(ModelObject *self, void *closure) {
    (void)closure;
    if (!model_ready(self)) return NULL;
    return PyUnicode_FromString(ek_model_kernels(self->model)->name);
}

#define PARAM_GETTER(field)                                               \
    static PyObject *Model_get_##field(ModelObject *self, void *closure) { \
        (void)closure;                                                    \
        return PyLong_FromLong(self->params.field);                       \
    }
PARAM_GETTER(n_threads)
PARAM_GETTER(n_slots)
PARAM_GETTER(n_ctx)
PARAM_GETTER(max_batch)
PARAM_GETTER(kv_type)

static PyObject *Model_get_weight_bytes(ModelObject *self, void *closure) {
    (void)closure;
    if (!model_ready(self)) return NULL;
    return PyLong_FromSize_t(ek_model_weight_bytes(self->model));
}

static PyObject *Model_get_kv_ring(ModelObject *self, void *closure) {
    (void)closure;
    if (!model_ready(self)) return NULL;
    return PyLong_FromLong(ek_model_kv_ring(self->model));
}

static PyMethodDef Model_methods[] = {
    {"forward", (PyCFunction)Model_forward, METH_VARARGS,
     "forward(tokens, pos, slot, want, logits): evaluate a batch; logits rows for want != 0"},
    {"kv_shift", (PyCFunction)Model_kv_shift, METH_VARARGS,
     "kv_shift(slot, keep, n_drop, n_used): drop cached positions, re-rotating later keys"},
    {"kv_copy", (PyCFunction)Model_kv_copy, METH_VARARGS,
     "kv_copy(src, dst, n): copy the first n cached positions of one slot to another"},
    {"kv_usable", (PyCFunction)Model_kv_usable, METH_VARARGS,
     "kv_usable(slot, n): how many of the first n cached positions a continuation can keep"},
    {"profile", (PyCFunction)Model_profile, METH_VARARGS,
     "profile(on): time per op since the last call (then start afresh), and turn profiling on/off"},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Model_getset[] = {
    {"backend", (getter)Model_get_backend, NULL, "kernel table in use", NULL},
    {"n_threads", (getter)Model_get_n_threads, NULL, "threads in the pool", NULL},
    {"n_slots", (getter)Model_get_n_slots, NULL, "sequences the KV cache holds", NULL},
    {"n_ctx", (getter)Model_get_n_ctx, NULL, "positions per slot", NULL},
    {"max_batch", (getter)Model_get_max_batch, NULL, "tokens per forward call", NULL},
    {"kv_type", (getter)Model_get_kv_type, NULL, "cache element type (GGUF type id)", NULL},
    {"weight_bytes", (getter)Model_get_weight_bytes, NULL,
     "weight bytes the model holds, copied at creation (an untied token_embd stays mapped)",
     NULL},
    {"kv_ring", (getter)Model_get_kv_ring, NULL,
     "positions a sliding-window layer's ring holds (0: every layer keeps the context)", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject ModelType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "edge_slm._core.Model",
    .tp_basicsize = sizeof(ModelObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "A Llama model over its own copy of the weights (matrices repacked), with its KV cache and run state.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Model_init,
    .tp_dealloc = (destructor)Model_dealloc,
    .tp_methods = Model_methods,
    .tp_getset = Model_getset,
};

/* ---- memory accounting for the planner ---- */

static PyObject *py_model_bytes(PyObject *self, PyObject *args, PyObject *kw) {
    (void)self;
    static char *names[] = {"config", "n_slots", "n_ctx", "max_batch", "n_threads", "kv_type", NULL};
    PyObject *config;
    int n_slots, n_ctx, max_batch, n_threads, kv_type;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O!iiiii", names, &PyDict_Type, &config, &n_slots,
                                     &n_ctx, &max_batch, &n_threads, &kv_type))
        return NULL;
    ek_config c;
    if (parse_config(config, &c)) return NULL;
    if (kv_type != EK_TYPE_F16 && kv_type != EK_TYPE_Q8_0) {
        PyErr_SetString(PyExc_ValueError, "the cache holds F16 or Q8_0");
        return NULL;
    }
    return Py_BuildValue("(nn)", (Py_ssize_t)ek_model_kv_bytes(&c, n_slots, n_ctx, max_batch, kv_type),
                         (Py_ssize_t)ek_model_state_bytes(&c, max_batch, n_ctx, n_threads));
}

static PyObject *py_kv_ring(PyObject *self, PyObject *args, PyObject *kw) {
    (void)self;
    static char *names[] = {"config", "n_ctx", "max_batch", NULL};
    PyObject *config;
    int n_ctx, max_batch;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O!ii", names, &PyDict_Type, &config, &n_ctx, &max_batch))
        return NULL;
    ek_config c;
    if (parse_config(config, &c)) return NULL;
    return PyLong_FromLong(ek_swa_ring(&c, n_ctx, max_batch));
}

static PyObject *py_read_bandwidth(PyObject *self, PyObject *args) {
    (void)self;
    int n_threads, reps;
    Py_ssize_t bytes;
    if (!PyArg_ParseTuple(args, "ini", &n_threads, &bytes, &reps)) return NULL;
    if (bytes < 4096 || n_threads < 1 || n_threads > 256 || reps < 1) {
        PyErr_SetString(PyExc_ValueError, "need bytes >= 4096, 1..256 threads, reps >= 1");
        return NULL;
    }
    double gbs;
    Py_BEGIN_ALLOW_THREADS gbs = ek_read_bandwidth(n_threads, (size_t)bytes, reps);
    Py_END_ALLOW_THREADS
    if (gbs < 0) return status_error((int)-gbs, "read_bandwidth");
    return PyFloat_FromDouble(gbs);
}

static PyMethodDef module_methods[] = {
    {"backends", py_backends, METH_NOARGS, "kernel tables usable on this CPU, best first"},
    {"best_backend", py_best_backend, METH_NOARGS, "the table used by default ($EDGE_SLM_BACKEND)"},
    {"type_sizes", py_type_sizes, METH_NOARGS, "{type id: (block elements, block bytes)}"},
    {"quantize", py_quantize, METH_VARARGS, "quantize(backend, type, x, out)"},
    {"dequantize", py_dequantize, METH_VARARGS, "dequantize(backend, type, src, out)"},
    {"matmul", py_matmul, METH_VARARGS, "matmul(backend, type, rows, cols, w, x, y, x8=False)"},
    {"rmsnorm", py_rmsnorm, METH_VARARGS, "rmsnorm(backend, x, w, eps, out)"},
    {"rope", py_rope, METH_VARARGS, "rope(backend, x, n_heads, head_dim, cs)"},
    {"silu_mul", py_silu_mul, METH_VARARGS, "silu_mul(backend, gate, up, out)"},
    {"softmax", py_softmax, METH_VARARGS, "softmax(backend, x)"},
    {"attention", py_attention, METH_VARARGS,
     "attention(backend, q, k, v, kv_type, n_pos, head_dim, scale, out)"},
    {"kv_store", py_kv_store, METH_VARARGS, "kv_store(backend, kv_type, src, dst)"},
    {"read_bandwidth", py_read_bandwidth, METH_VARARGS,
     "read_bandwidth(n_threads, bytes, reps) -> best GB/s streaming reads"},
    {"model_bytes", (PyCFunction)(void (*)(void))py_model_bytes, METH_VARARGS | METH_KEYWORDS,
     "model_bytes(config, n_slots, n_ctx, max_batch, n_threads, kv_type) -> (kv, state)"},
    {"kv_ring", (PyCFunction)(void (*)(void))py_kv_ring, METH_VARARGS | METH_KEYWORDS,
     "kv_ring(config, n_ctx, max_batch) -> positions a sliding-window layer's ring holds (0: none)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT, "_core", "edge-slm C kernels and forward pass", -1, module_methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__core(void) {
    if (PyType_Ready(&ModelType) < 0) return NULL;
    PyObject *m = PyModule_Create(&module_def);
    if (!m) return NULL;
    if (PyModule_AddObjectRef(m, "Model", (PyObject *)&ModelType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
