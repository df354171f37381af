/*
 * The Llama forward pass over a batch of tokens, run by every pool thread
 * at once; the other families (Qwen2, Qwen3, Gemma 3) are Llama with the
 * differences ek_config and the optional tensors of ek_layer declare.
 * Each op (rows of a matmul, tokens of a norm, heads of attention)
 * is cut into pieces that the threads claim, and no thread starts an op
 * before the last one is finished, so the pass reads top to bottom like the
 * single-threaded maths.
 */
#define _DEFAULT_SOURCE /* madvise, posix_memalign */
#include <assert.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#include "edge_model.h"

#define MAX_HEAD_DIM 512 /* attention and the KV shift use stack rows */

struct ek_model {
    ek_config cfg;
    ek_weights w;
    ek_layer *layers; /* our copy of the caller's layer table */
    ek_model_params p;
    const ek_kernels *k;
    /* the family's RoPE pairing and FFN activation, chosen once */
    void (*rope)(float *x, int n_heads, int head_dim, const float *cs);
    void (*act_mul)(float *out, const float *gate, const float *up, int n);
    ek_pool *pool;
    uint8_t *weights;    /* every tensor the pass reads (own_weights) */
    size_t weight_bytes;
    int profiling;
    ek_profile prof;
    int q_dim, kv_dim;
    size_t kv_head_bytes; /* one head vector in kv_type */
    size_t kv_pos_bytes;  /* all KV heads of one position */

    /* KV cache, K and V apart: layer by layer, slot by slot, rows of
     * kv_pos_bytes. A layer keeps n_ctx rows per slot, a sliding-window
     * layer in a ring swa_rows (see swa_ring). */
    uint8_t *kv_k, *kv_v;
    size_t *row0;       /* [n_layer] the layer's first row */
    int ring, swa_rows; /* ring length in positions (0: no ring) and rows per slot */
    int *kv_lo, *kv_hi; /* [n_slots] the positions the sliding layers hold: [lo, hi) */
    uint8_t *ring_buf;  /* ring: 2 x ring rows, where a shift gathers the rows it moves */

    /* run state, B = max_batch */
    float *x;        /* [B, dim] residual stream */
    float *xb;       /* [B, max(dim, q_dim)] normed input, then attention output */
    float *xo;       /* [B, dim] a sublayer's output before the residual add */
    float *q;        /* [B, q_dim] */
    float *kb, *vb;  /* [B, kv_dim] this batch's keys and values */
    float *hb, *hb2; /* [B, hidden_dim] FFN gate and up */
    float *cs;       /* [B, head_dim] RoPE cos/sin pairs per token */
    float *cs_swa;   /* the same for the sliding-window layers' base (NULL: none slides) */
    float *scores;   /* [n_threads, n_ctx] attention weights */
    void *xq;        /* [B, widest activation row] quantized activations, sized in
                        Q8_1, the widest per element of the activation formats */
    double *inv_freq, *inv_freq_swa; /* [head_dim / 2] RoPE frequencies, scaling applied */
};

/* ---- creation and validation ---- */

static int check_tensor(const ek_kernels *k, const char *what, const ek_tensor *t, int rows, int cols,
                        int need_gemm, char *err, size_t err_len) {
    if (!t->data) {
        snprintf(err, err_len, "tensor %s is missing", what);
        return EK_EINVAL;
    }
    if (t->rows != rows || t->cols != cols) {
        snprintf(err, err_len, "tensor %s has shape [%d, %d], expected [%d, %d]", what, t->rows,
                 t->cols, rows, cols);
        return EK_EINVAL;
    }
    if (t->type < 0 || t->type >= EK_TYPE_COUNT || !k->types[t->type].dequantize ||
        (need_gemm && !k->types[t->type].gemm)) {
        snprintf(err, err_len, "tensor %s has unsupported type %d", what, t->type);
        return EK_ETYPE;
    }
    if (cols % ek_type_block_elems(t->type) != 0) {
        snprintf(err, err_len, "tensor %s: %d columns is not a whole number of blocks", what, cols);
        return EK_EINVAL;
    }
    return EK_OK;
}

/* A norm's weights, a bias or RoPE's factors: F32 [n]; absent is fine
 * when optional. */
static int check_vector(const char *what, const ek_tensor *t, int n, int optional, char *err,
                        size_t err_len) {
    if (!t->data && optional) return EK_OK;
    if (!t->data || t->type != EK_TYPE_F32 || t->cols != n || t->rows != 1) {
        snprintf(err, err_len, "tensor %s must be F32 [%d]", what, n);
        return EK_EINVAL;
    }
    return EK_OK;
}

static int validate(const ek_weights *w, const ek_model_params *p, char *err, size_t err_len) {
    const ek_config *c = &w->cfg;
    const ek_kernels *k = p->kernels;
    if (c->n_layer < 1 || c->dim < 1 || c->hidden_dim < 1 || c->n_head < 1 || c->n_kv_head < 1 ||
        c->vocab < 1 || c->n_head % c->n_kv_head != 0) {
        snprintf(err, err_len, "inconsistent configuration (%d heads, %d KV heads)", c->n_head,
                 c->n_kv_head);
        return EK_EINVAL;
    }
    if (c->head_dim < 2 || c->head_dim > MAX_HEAD_DIM || c->head_dim % 2 ||
        (p->kv_type == EK_TYPE_Q8_0 && c->head_dim % EK_QK)) {
        snprintf(err, err_len, "unsupported head size %d", c->head_dim);
        return EK_EINVAL;
    }
    if (p->kv_type != EK_TYPE_F16 && p->kv_type != EK_TYPE_Q8_0) {
        snprintf(err, err_len, "KV cache type %d is neither F16 nor Q8_0", p->kv_type);
        return EK_ETYPE;
    }
    if (p->n_slots < 1 || p->n_ctx < 1 || p->max_batch < 1 || p->n_threads < 1) {
        snprintf(err, err_len, "slots, context, batch and threads must be positive");
        return EK_EINVAL;
    }
    int q_dim = c->n_head * c->head_dim, kv_dim = c->n_kv_head * c->head_dim;
    int rc;
    if ((rc = check_tensor(k, "token_embd", &w->tok_embd, c->vocab, c->dim, 0, err, err_len)) ||
        (rc = check_tensor(k, "output", &w->output, c->vocab, c->dim, 1, err, err_len)) ||
        (rc = check_vector("output_norm", &w->out_norm, c->dim, 0, err, err_len)) ||
        (rc = check_vector("rope_freqs", &w->rope_freqs, c->head_dim / 2, 1, err, err_len)))
        return rc;
    if (c->swa_window < 0 || c->swa_pattern < 0 || c->ffn_act < EK_ACT_SILU || c->ffn_act > EK_ACT_GELU ||
        !(c->rope_scale >= 0) || !(c->embd_scale >= 0) || !(c->attn_scale >= 0) || !(c->rope_base_swa >= 0)) {
        snprintf(err, err_len, "inconsistent configuration (window, scales or FFN activation)");
        return EK_EINVAL;
    }
    for (int l = 0; l < c->n_layer; l++) {
        const ek_layer *L = &w->layers[l];
        char name[64];
#define CHECK(field, rows, cols)                                                           \
    snprintf(name, sizeof name, "blk.%d.%s", l, #field);                                    \
    if ((rc = check_tensor(k, name, &L->field, rows, cols, 1, err, err_len))) return rc;
        CHECK(wq, q_dim, c->dim)
        CHECK(wk, kv_dim, c->dim)
        CHECK(wv, kv_dim, c->dim)
        CHECK(wo, c->dim, q_dim)
        CHECK(w_gate, c->hidden_dim, c->dim)
        CHECK(w_up, c->hidden_dim, c->dim)
        CHECK(w_down, c->dim, c->hidden_dim)
#undef CHECK
#define VECTOR(field, n, optional)                                                         \
    snprintf(name, sizeof name, "blk.%d.%s", l, #field);                                    \
    if ((rc = check_vector(name, &L->field, n, optional, err, err_len))) return rc;
        VECTOR(attn_norm, c->dim, 0)
        VECTOR(ffn_norm, c->dim, 0)
        VECTOR(bq, q_dim, 1)
        VECTOR(bk, kv_dim, 1)
        VECTOR(bv, kv_dim, 1)
        VECTOR(q_norm, c->head_dim, 1)
        VECTOR(k_norm, c->head_dim, 1)
        VECTOR(attn_post_norm, c->dim, 1)
        VECTOR(ffn_post_norm, c->dim, 1)
#undef VECTOR
    }
    return EK_OK;
}

static int max3(int a, int b, int c) { return a > b ? (a > c ? a : c) : (b > c ? b : c); }

/*
 * A sliding-window layer reads, for the tokens of one batch, at most
 * window + max_batch - 1 consecutive positions: a ring of that many rows
 * holds them, position p in row p % ring. Its first window - 1 rows are
 * written twice, the second time past the ring's end, so that every window
 * is one contiguous run of rows for the attention kernel. The ring is used
 * when those rows are fewer than the context's. Returns the ring's length
 * (0: none) and sets *rows to a sliding layer's rows per slot.
 */
static int swa_ring(const ek_config *c, int n_ctx, int max_batch, int *rows) {
    *rows = n_ctx;
    if (c->swa_window <= 0) return 0;
    long ring = (long)c->swa_window + max_batch - 1, with_mirror = ring + c->swa_window - 1;
    if (with_mirror >= n_ctx) return 0;
    *rows = (int)with_mirror;
    return (int)ring;
}

static int layer_rows(const ek_config *c, int l, int n_ctx, int ring, int swa_rows) {
    return ring && ek_layer_slides(c, l) ? swa_rows : n_ctx;
}

size_t ek_model_kv_bytes(const ek_config *c, int n_slots, int n_ctx, int max_batch, int kv_type) {
    size_t pos_bytes = (size_t)c->n_kv_head * ek_row_bytes(kv_type, c->head_dim), rows = 0;
    int swa_rows, ring = swa_ring(c, n_ctx, max_batch, &swa_rows);
    for (int l = 0; l < c->n_layer; l++) rows += (size_t)layer_rows(c, l, n_ctx, ring, swa_rows);
    return 2 * rows * (size_t)n_slots * pos_bytes;
}

size_t ek_model_state_bytes(const ek_config *c, int B, int n_ctx, int n_threads) {
    int q_dim = c->n_head * c->head_dim, kv_dim = c->n_kv_head * c->head_dim;
    int widest = max3(c->dim, q_dim, c->hidden_dim);
    size_t floats = (size_t)B * (2 * (size_t)c->dim + (size_t)(q_dim > c->dim ? q_dim : c->dim) +
                                 (size_t)q_dim + 2 * (size_t)kv_dim + 2 * (size_t)c->hidden_dim +
                                 (size_t)c->head_dim * (c->swa_window > 0 ? 2 : 1)) +
                    (size_t)n_threads * (size_t)n_ctx;
    int swa_rows, ring = swa_ring(c, n_ctx, B, &swa_rows);
    /* a shift's scratch in the ring, counted at F16, the wider cache type */
    size_t ring_buf = 2 * (size_t)ring * c->n_kv_head * ek_row_bytes(EK_TYPE_F16, c->head_dim);
    return floats * sizeof(float) + (size_t)B * ek_row_bytes(EK_TYPE_Q8_1, widest) +
           (size_t)c->head_dim * sizeof(double) + ring_buf;
}

void ek_model_destroy(ek_model *m) {
    if (!m) return;
    ek_pool_destroy(m->pool);
    free(m->weights);
    free(m->layers);
    free(m->kv_k);
    free(m->kv_v);
    free(m->row0);
    free(m->kv_lo);
    free(m->kv_hi);
    free(m->ring_buf);
    free(m->x);
    free(m->xb);
    free(m->xo);
    free(m->q);
    free(m->kb);
    free(m->vb);
    free(m->hb);
    free(m->hb2);
    free(m->cs);
    free(m->cs_swa);
    free(m->scores);
    free(m->xq);
    free(m->inv_freq);
    free(m->inv_freq_swa);
    free(m);
}

static float *alloc_floats(size_t n) { return calloc(n ? n : 1, sizeof(float)); }

/* ---- the weights the model holds ----
 * Every tensor the pass reads is copied into one allocation at creation:
 * block-type matrices into the x8 layout where the table has an x8 gemm,
 * everything else (norms, float matrices) as it is. An untied token_embd
 * stays in place, as lookups touch only the rows of the tokens seen. With
 * weights_mapped, the mapping's pages are handed back as they are copied,
 * so the weights are resident once and, but for an untied embedding's
 * lookups, the pass never faults the file in. */

#define PACK_ALIGN 64 /* each tensor starts on a cache line */

/* The tensors the pass reads (those present), the output last: when it is
 * the tied embedding, token_embd is pointed at its copy afterwards. With
 * out NULL, only counts them. */
static int read_tensors(ek_model *m, ek_tensor **out) {
    int n = 0;
    for (int l = 0; l < m->cfg.n_layer; l++) {
        ek_layer *L = &m->layers[l];
        ek_tensor *all[] = {&L->attn_norm, &L->wq,       &L->wk,       &L->wv,     &L->bq,
                            &L->bk,        &L->bv,       &L->q_norm,   &L->k_norm, &L->wo,
                            &L->attn_post_norm, &L->ffn_norm, &L->w_gate, &L->w_up, &L->w_down,
                            &L->ffn_post_norm};
        for (size_t i = 0; i < sizeof all / sizeof all[0]; i++)
            if (all[i]->data) {
                if (out) out[n] = all[i];
                n++;
            }
    }
    if (out) {
        out[n] = &m->w.out_norm;
        out[n + 1] = &m->w.output;
    }
    return n + 2;
}

static int packable(const ek_model *m, const ek_tensor *t) {
    return ek_x8_layout(t->type) && m->k->types[t->type].gemm_x8 && t->rows >= EK_X8_ROWS;
}

static size_t tensor_bytes(const ek_tensor *t) {
    return (size_t)t->rows * ek_row_bytes(t->type, t->cols);
}

static size_t aligned_bytes(const ek_tensor *t) {
    return (tensor_bytes(t) + PACK_ALIGN - 1) / PACK_ALIGN * PACK_ALIGN;
}

/* Huge pages where the kernel offers them for the asking (transparent huge
 * pages in madvise mode): a token streams every weight, and with 4 KiB
 * pages that is a TLB miss, and a stop for the hardware prefetcher, every
 * 4 KiB. */
#define HUGE_PAGE (2u << 20)

static uint8_t *alloc_weights(size_t bytes) {
    void *p = NULL;
    /* not rounded up to a huge page: the part past the last whole one stays
     * in small pages, so no more than the weights becomes resident */
    if (posix_memalign(&p, HUGE_PAGE, bytes ? bytes : 1)) return NULL;
#ifdef MADV_HUGEPAGE
    madvise(p, bytes / HUGE_PAGE * HUGE_PAGE, MADV_HUGEPAGE); /* advice: else small pages */
#endif
    return p;
}

static int own_weights(ek_model *m) {
    const int count = read_tensors(m, NULL);
    ek_tensor **ts = malloc((size_t)count * sizeof *ts);
    if (!ts) return EK_ENOMEM;
    read_tensors(m, ts);
    size_t total = 0;
    for (int i = 0; i < count; i++) total += aligned_bytes(ts[i]);
    m->weights = alloc_weights(total);
    if (!m->weights) {
        free(ts);
        return EK_ENOMEM;
    }
    const int tied = m->w.output.data == m->w.tok_embd.data;
    const char *lo = ts[0]->data, *hi = lo; /* the span of the mapping read */
    for (int i = 0; i < count; i++) {
        const char *src = ts[i]->data;
        if (src < lo) lo = src;
        if (src + tensor_bytes(ts[i]) > hi) hi = src + tensor_bytes(ts[i]);
    }
    /* The tensors kept as they are first (norms; every matrix of a float
     * model), then the ones repacked, handing back the whole span after
     * each: reading a tensor maps its neighbours' pages in too
     * (fault-around), which releasing only its own would leave behind. */
    size_t at = 0;
    for (int pass = 0; pass < 2; pass++) {
        for (int i = 0; i < count; i++) {
            ek_tensor *t = ts[i];
            if (packable(m, t) != pass) continue;
            if (pass)
                ek_x8_pack(t->type, t->data, m->weights + at, t->rows, t->cols,
                           m->p.weights_mapped);
            else
                memcpy(m->weights + at, t->data, tensor_bytes(t));
            t->x8 = pass;
            t->data = m->weights + at;
            at += aligned_bytes(t);
            if (m->p.weights_mapped) ek_release_mapped(lo, hi);
        }
    }
    if (tied) m->w.tok_embd = m->w.output;
    m->weight_bytes = total;
    free(ts);
    return EK_OK;
}

size_t ek_model_weight_bytes(const ek_model *m) { return m->weight_bytes; }

int ek_model_create(const ek_weights *w, const ek_model_params *p, ek_model **out, char *err,
                    size_t err_len) {
    char scratch[8];
    if (!err) {
        err = scratch;
        err_len = sizeof scratch;
    }
    *out = NULL;
    int rc = validate(w, p, err, err_len);
    if (rc) return rc;

    ek_model *m = calloc(1, sizeof *m);
    if (!m) return EK_ENOMEM;
    const ek_config *c = &w->cfg;
    m->cfg = *c;
    m->w = *w;
    m->p = *p;
    m->k = p->kernels;
    m->rope = c->rope_neox ? m->k->rope_neox : m->k->rope;
    m->act_mul = c->ffn_act == EK_ACT_GELU ? m->k->gelu_mul : m->k->silu_mul;
    m->q_dim = c->n_head * c->head_dim;
    m->kv_dim = c->n_kv_head * c->head_dim;
    m->kv_head_bytes = ek_row_bytes(p->kv_type, c->head_dim);
    m->kv_pos_bytes = (size_t)c->n_kv_head * m->kv_head_bytes;

    size_t B = (size_t)p->max_batch;
    int widest = max3(c->dim, m->q_dim, c->hidden_dim);
    size_t kv_half = ek_model_kv_bytes(c, p->n_slots, p->n_ctx, p->max_batch, p->kv_type) / 2;
    m->layers = malloc((size_t)c->n_layer * sizeof(ek_layer));
    m->kv_k = calloc(kv_half, 1);
    m->kv_v = calloc(kv_half, 1);
    m->ring = swa_ring(c, p->n_ctx, p->max_batch, &m->swa_rows);
    m->row0 = calloc((size_t)c->n_layer, sizeof(size_t));
    m->kv_lo = calloc((size_t)p->n_slots, sizeof(int));
    m->kv_hi = calloc((size_t)p->n_slots, sizeof(int));
    if (m->ring) m->ring_buf = malloc(2 * (size_t)m->ring * m->kv_pos_bytes);
    m->x = alloc_floats(B * c->dim);
    m->xb = alloc_floats(B * (size_t)(m->q_dim > c->dim ? m->q_dim : c->dim));
    m->xo = alloc_floats(B * c->dim);
    m->q = alloc_floats(B * m->q_dim);
    m->kb = alloc_floats(B * m->kv_dim);
    m->vb = alloc_floats(B * m->kv_dim);
    m->hb = alloc_floats(B * c->hidden_dim);
    m->hb2 = alloc_floats(B * c->hidden_dim);
    m->cs = alloc_floats(B * c->head_dim);
    if (c->swa_window > 0) m->cs_swa = alloc_floats(B * c->head_dim);
    m->scores = alloc_floats((size_t)p->n_threads * p->n_ctx);
    m->xq = calloc(B, ek_row_bytes(EK_TYPE_Q8_1, widest));
    m->inv_freq = calloc((size_t)c->head_dim / 2, sizeof(double));
    m->inv_freq_swa = calloc((size_t)c->head_dim / 2, sizeof(double));
    m->pool = ek_pool_create(p->n_threads);
    if (!m->layers || !m->kv_k || !m->kv_v || !m->row0 || !m->kv_lo || !m->kv_hi ||
        (m->ring && !m->ring_buf) || !m->x || !m->xb || !m->xo || !m->q || !m->kb ||
        !m->vb || !m->hb || !m->hb2 || !m->cs || (c->swa_window > 0 && !m->cs_swa) || !m->scores ||
        !m->xq || !m->inv_freq || !m->inv_freq_swa || !m->pool) {
        ek_model_destroy(m);
        snprintf(err, err_len, "out of memory allocating the KV cache and run state");
        return EK_ENOMEM;
    }
    for (int l = 1; l < c->n_layer; l++)
        m->row0[l] = m->row0[l - 1] +
                     (size_t)p->n_slots * layer_rows(c, l - 1, p->n_ctx, m->ring, m->swa_rows);
    memcpy(m->layers, w->layers, (size_t)c->n_layer * sizeof(ek_layer));
    m->w.layers = m->layers;
    /* Angles as llama.cpp makes them: the global layers' scaled linearly and
     * divided by Llama 3's factors, the sliding-window layers' neither. */
    const float *factors = w->rope_freqs.data;
    double scale = c->rope_scale > 0 ? c->rope_scale : 1.0;
    double base_swa = c->rope_base_swa > 0 ? c->rope_base_swa : c->rope_base;
    for (int i = 0; i < c->head_dim / 2; i++) {
        m->inv_freq[i] = scale * pow((double)c->rope_base, -2.0 * i / c->head_dim) /
                         (factors ? (double)factors[i] : 1.0);
        m->inv_freq_swa[i] = pow(base_swa, -2.0 * i / c->head_dim);
    }
    if (own_weights(m)) {
        ek_model_destroy(m);
        snprintf(err, err_len, "out of memory copying the weights");
        return EK_ENOMEM;
    }
    *out = m;
    return EK_OK;
}

const ek_kernels *ek_model_kernels(const ek_model *m) { return m->k; }

/* ---- the pass ---- */

typedef struct {
    ek_model *m;
    int n;
    const int32_t *tokens, *pos, *slot;
    const uint8_t *want;
    float *logits;
    int n_out;
} fwd_job;

/* What the shared xq buffer holds, tracked per thread: every thread runs
 * the same sequence of ops, so the copies agree without being shared. */
typedef struct {
    const float *src;
    int act_type;
} act_tag;

/* One thread's view of the pass. */
typedef struct {
    const fwd_job *j;
    ek_model *m;
    ek_cursor cur;
    int ith, nth;
    act_tag tag;
    double t_mark; /* profiling: when the last op finished */
} worker;

/* The op just finished (every thread is past its wait): its wall time goes
 * to kind. Only the first thread keeps the profile. */
static void mark(worker *w, int kind) {
    if (w->ith != 0 || !w->m->profiling) return;
    double t = ek_now_s();
    w->m->prof.seconds[kind] += t - w->t_mark;
    w->t_mark = t;
}

/* Enough chunks per op that a descheduled thread's share is taken up by the
 * others, few enough that claiming stays cheap beside the work. */
#define CHUNKS_PER_THREAD 2

/* Splits n items, in multiples of align, into nth near-equal ranges. */
static void share(int n, int ith, int nth, int align, int *lo, int *hi) {
    int units = (n + align - 1) / align;
    int per = units / nth, extra = units % nth;
    int a = ith * per + (ith < extra ? ith : extra);
    int b = a + per + (ith < extra);
    *lo = a * align < n ? a * align : n;
    *hi = b * align < n ? b * align : n;
}

/* Claims the next piece [lo, hi) of an op over n items (cut at multiples of
 * align). Returns 0 when the op has no piece left, after waiting until every
 * piece is finished, so the next op may read what this one wrote. */
static int next_piece(worker *w, int n, int align, int *lo, int *hi) {
    int units = (n + align - 1) / align;
    int chunks = w->nth == 1 ? 1 : w->nth * CHUNKS_PER_THREAD;
    if (chunks > units) chunks = units;
    int i = ek_claim(&w->cur, chunks);
    if (i < 0) {
        ek_op_wait(&w->cur, chunks);
        return 0;
    }
    share(n, i, chunks, align, lo, hi);
    return 1;
}

/* A weight matrix and where its product goes. */
typedef struct {
    const ek_tensor *W;
    float *y; /* [n, W->rows] */
} proj;

/* Rows of a matmul claimed together: whole 4x4 tiles, and whole x8 groups
 * (the x8 gemms take a band's first row as a group's). */
#define ROW_BAND 16
_Static_assert(ROW_BAND % EK_X8_ROWS == 0, "a band starts an x8 group");

/* y = W x[t] for every token t and every projection of a group sharing the
 * input x (Q, K and V; gate and up). The activations are quantized once;
 * then bands of rows across all the group's matrices are claimed as one op. */
static void matmuls(worker *w, const float *x, int n, const proj *p, int np) {
    ek_model *m = w->m;
    int act_type = m->k->types[p[0].W->type].act_type, cols = p[0].W->cols;
    for (int i = 1; i < np; i++) {
        assert(p[i].W->cols == cols);
        if (m->k->types[p[i].W->type].act_type != act_type) {
            for (int k = 0; k < np; k++) matmuls(w, x, n, &p[k], 1);
            return;
        }
    }
    const void *xa = x;
    size_t x_stride = (size_t)cols * sizeof(float);
    int lo, hi;
    if (act_type != EK_TYPE_F32) {
        x_stride = ek_row_bytes(act_type, cols);
        if (w->tag.src != x || w->tag.act_type != act_type) {
            ek_quantize_fn quantize = m->k->types[p[0].W->type].quantize;
            while (next_piece(w, n, 1, &lo, &hi))
                for (int t = lo; t < hi; t++)
                    quantize(x + (size_t)t * cols, (char *)m->xq + t * x_stride, cols);
            w->tag = (act_tag){x, act_type};
            mark(w, EK_PROF_QUANTIZE);
        }
        xa = m->xq;
    }
    int bands = 0;
    for (int i = 0; i < np; i++) bands += (p[i].W->rows + ROW_BAND - 1) / ROW_BAND;
    while (next_piece(w, bands, 1, &lo, &hi)) {
        for (int i = 0, first = 0; i < np; first += (p[i].W->rows + ROW_BAND - 1) / ROW_BAND, i++) {
            const ek_tensor *W = p[i].W;
            int r0 = (lo > first ? lo - first : 0) * ROW_BAND;
            int r1 = (hi - first) * ROW_BAND;
            if (r1 > W->rows) r1 = W->rows;
            if (r1 <= r0) continue;
            size_t w_stride = ek_row_bytes(W->type, W->cols);
            const ek_type_ops *ops = &m->k->types[W->type];
            (W->x8 ? ops->gemm_x8 : ops->gemm)(W->cols, (const char *)W->data + r0 * w_stride, w_stride,
                                      r1 - r0, xa, x_stride, n, p[i].y + r0, (size_t)W->rows);
        }
    }
    if (w->ith == 0 && m->profiling) {
        double t = ek_now_s(), total = 0.0;
        for (int i = 0; i < np; i++) total += (double)tensor_bytes(p[i].W);
        for (int i = 0; i < np; i++) {
            double bytes = (double)tensor_bytes(p[i].W);
            m->prof.seconds[EK_PROF_GEMM + p[i].W->type] += (t - w->t_mark) * bytes / total;
            m->prof.bytes[EK_PROF_GEMM + p[i].W->type] += bytes;
        }
        w->t_mark = t;
    }
}

static int in_ring(const ek_model *m, int layer) { return m->ring && ek_layer_slides(&m->cfg, layer); }

/* The cache row of a slot's row in a layer (a position, or its place in the ring). */
static uint8_t *kv_at(const ek_model *m, uint8_t *base, int layer, int slot, int row) {
    int rows = in_ring(m, layer) ? m->swa_rows : m->p.n_ctx;
    return base + (m->row0[layer] + (size_t)slot * rows + row) * m->kv_pos_bytes;
}

static int kv_row(const ek_model *m, int layer, int pos) { return in_ring(m, layer) ? pos % m->ring : pos; }

/* After filing row r of a ring, its copy past the ring's end. */
static void mirror_row(const ek_model *m, int layer, int slot, int r) {
    if (!in_ring(m, layer) || r >= m->cfg.swa_window - 1) return;
    memcpy(kv_at(m, m->kv_k, layer, slot, r + m->ring), kv_at(m, m->kv_k, layer, slot, r), m->kv_pos_bytes);
    memcpy(kv_at(m, m->kv_v, layer, slot, r + m->ring), kv_at(m, m->kv_v, layer, slot, r), m->kv_pos_bytes);
}

/* out = rmsnorm(in) * w for every token (out may be in); the activations
 * in xq go stale. */
static void norm_tokens(worker *w, float *out, const float *in, const ek_tensor *norm) {
    ek_model *m = w->m;
    int dim = m->cfg.dim, lo, hi;
    while (next_piece(w, w->j->n, 1, &lo, &hi))
        for (int t = lo; t < hi; t++)
            m->k->rmsnorm(out + (size_t)t * dim, in + (size_t)t * dim, norm->data, dim,
                          m->cfg.norm_eps);
    w->tag.src = NULL;
    mark(w, EK_PROF_NORM);
}

/* One token's heads of Q or K: the bias added, each head normed, rotated. */
static void shape_heads(const ek_model *m, float *x, int n_heads, const ek_tensor *bias,
                        const ek_tensor *norm, const float *cs) {
    const ek_kernels *k = m->k;
    int hd = m->cfg.head_dim;
    if (bias->data) k->add(x, bias->data, n_heads * hd);
    if (norm->data)
        for (int h = 0; h < n_heads; h++) k->rmsnorm(x + h * hd, x + h * hd, norm->data, hd, m->cfg.norm_eps);
    m->rope(x, n_heads, hd, cs);
}

/* x += xo, the residual connection. */
static void residual_add(worker *w) {
    ek_model *m = w->m;
    int lo, hi;
    while (next_piece(w, w->j->n * m->cfg.dim, 16, &lo, &hi)) m->k->add(m->x + lo, m->xo + lo, hi - lo);
    mark(w, EK_PROF_ADD);
}

static void attention_block(worker *w, int l) {
    const fwd_job *j = w->j;
    ek_model *m = w->m;
    const ek_kernels *k = m->k;
    const ek_config *c = &m->cfg;
    const ek_layer *L = &m->layers[l];
    int n = j->n, hd = c->head_dim, lo, hi;

    const int slides = ek_layer_slides(c, l);
    norm_tokens(w, m->xb, m->x, &L->attn_norm);
    matmuls(w, m->xb, n, (proj[]){{&L->wq, m->q}, {&L->wk, m->kb}, {&L->wv, m->vb}}, 3);

    /* Rotate this batch's queries and keys, then file keys and values in the
     * cache: attention below reads every position, this batch's included. */
    while (next_piece(w, n, 1, &lo, &hi)) {
        for (int t = lo; t < hi; t++) {
            const float *cs = (slides ? m->cs_swa : m->cs) + (size_t)t * hd;
            float *kt = m->kb + (size_t)t * m->kv_dim, *vt = m->vb + (size_t)t * m->kv_dim;
            shape_heads(m, m->q + (size_t)t * m->q_dim, c->n_head, &L->bq, &L->q_norm, cs);
            shape_heads(m, kt, c->n_kv_head, &L->bk, &L->k_norm, cs);
            if (L->bv.data) k->add(vt, L->bv.data, m->kv_dim);
            int r = kv_row(m, l, j->pos[t]);
            uint8_t *kd = kv_at(m, m->kv_k, l, j->slot[t], r);
            uint8_t *vd = kv_at(m, m->kv_v, l, j->slot[t], r);
            for (int h = 0; h < c->n_kv_head; h++) {
                k->kv_store(kd + h * m->kv_head_bytes, kt + h * hd, hd, m->p.kv_type);
                k->kv_store(vd + h * m->kv_head_bytes, vt + h * hd, hd, m->p.kv_type);
            }
            mirror_row(m, l, j->slot[t], r);
        }
    }
    mark(w, EK_PROF_ROPE_KV);

    int group = c->n_head / c->n_kv_head;
    float scale = c->attn_scale > 0 ? c->attn_scale : 1.0f / sqrtf((float)hd);
    float *scores = m->scores + (size_t)w->ith * m->p.n_ctx;
    while (next_piece(w, n * c->n_head, 1, &lo, &hi)) {
        for (int i = lo; i < hi; i++) {
            int t = i / c->n_head, h = i % c->n_head, kvh = h / group;
            /* a sliding-window layer sees the last swa_window positions, itself included */
            int first = slides && j->pos[t] >= c->swa_window ? j->pos[t] - c->swa_window + 1 : 0;
            size_t off = kvh * m->kv_head_bytes;
            int r = kv_row(m, l, first);
            k->attention(m->xb + (size_t)t * m->q_dim + h * hd, m->q + (size_t)t * m->q_dim + h * hd,
                         kv_at(m, m->kv_k, l, j->slot[t], r) + off,
                         kv_at(m, m->kv_v, l, j->slot[t], r) + off, m->kv_pos_bytes, m->p.kv_type,
                         j->pos[t] + 1 - first, hd, scale, scores);
        }
    }
    w->tag.src = NULL;
    mark(w, EK_PROF_ATTENTION);
    matmuls(w, m->xb, n, &(proj){&L->wo, m->xo}, 1);
    if (L->attn_post_norm.data) norm_tokens(w, m->xo, m->xo, &L->attn_post_norm);
    residual_add(w);
}

static void ffn_block(worker *w, int l) {
    ek_model *m = w->m;
    const ek_layer *L = &m->layers[l];
    int n = w->j->n, lo, hi;

    norm_tokens(w, m->xb, m->x, &L->ffn_norm);
    matmuls(w, m->xb, n, (proj[]){{&L->w_gate, m->hb}, {&L->w_up, m->hb2}}, 2);
    while (next_piece(w, n * m->cfg.hidden_dim, 16, &lo, &hi))
        m->act_mul(m->hb + lo, m->hb + lo, m->hb2 + lo, hi - lo);
    w->tag.src = NULL;
    mark(w, EK_PROF_FFN_ACT);
    matmuls(w, m->hb, n, &(proj){&L->w_down, m->xo}, 1);
    if (L->ffn_post_norm.data) norm_tokens(w, m->xo, m->xo, &L->ffn_post_norm);
    residual_add(w);
}

/* out = the embedding of token, read from the x8 layout a block at a time
 * when the embedding is the packed output projection. */
static void embed_row(const ek_model *m, int token, float *out) {
    const ek_tensor *E = &m->w.tok_embd;
    ek_dequantize_fn dequantize = m->k->types[E->type].dequantize;
    const size_t row = ek_row_bytes(E->type, E->cols);
    if (!E->x8 || token >= E->rows / EK_X8_ROWS * EK_X8_ROWS) {
        dequantize((const char *)E->data + (size_t)token * row, out, E->cols);
        return;
    }
    const char *group = (const char *)E->data + (size_t)(token / EK_X8_ROWS) * EK_X8_ROWS * row;
    const int nb = E->cols / EK_QK;
    for (int b = 0; b < nb; b++) {
        block_q8_0 blk; /* the largest block type with an x8 layout */
        ek_x8_block(E->type, group, nb, token % EK_X8_ROWS, b, &blk);
        dequantize(&blk, out + b * EK_QK, EK_QK);
    }
}

static void embed(const ek_model *m, int token, float *out) {
    embed_row(m, token, out);
    if (m->cfg.embd_scale > 0)
        for (int i = 0; i < m->cfg.dim; i++) out[i] *= m->cfg.embd_scale;
}

/* RoPE's cos/sin pairs for position pos (or a shift by it, negative). */
static void rope_angles(const double *inv_freq, int head_dim, double pos, float *cs) {
    for (int i = 0; i < head_dim / 2; i++) {
        double theta = pos * inv_freq[i];
        cs[2 * i] = (float)cos(theta);
        cs[2 * i + 1] = (float)sin(theta);
    }
}

static void forward_worker(void *ctx, int ith, int nth) {
    const fwd_job *j = ctx;
    ek_model *m = j->m;
    const ek_config *c = &m->cfg;
    worker w = {j, m, ek_cursor_start(m->pool), ith, nth, {NULL, -1}, m->profiling ? ek_now_s() : 0.0};
    int lo, hi;

    while (next_piece(&w, j->n, 1, &lo, &hi)) {
        for (int t = lo; t < hi; t++) {
            embed(m, j->tokens[t], m->x + (size_t)t * c->dim);
            rope_angles(m->inv_freq, c->head_dim, j->pos[t], m->cs + (size_t)t * c->head_dim);
            if (m->cs_swa)
                rope_angles(m->inv_freq_swa, c->head_dim, j->pos[t], m->cs_swa + (size_t)t * c->head_dim);
        }
    }
    mark(&w, EK_PROF_EMBED);

    for (int l = 0; l < c->n_layer; l++) {
        attention_block(&w, l);
        ffn_block(&w, l);
    }

    /* Final norm only for the rows that want logits, packed to the front of
     * xb so the vocabulary matmul (the biggest of all) runs only for them. */
    while (next_piece(&w, j->n, 1, &lo, &hi)) {
        int o = 0;
        for (int t = 0; t < lo; t++) o += j->want[t] != 0;
        for (int t = lo; t < hi; t++)
            if (j->want[t])
                m->k->rmsnorm(m->xb + (size_t)o++ * c->dim, m->x + (size_t)t * c->dim,
                              m->w.out_norm.data, c->dim, c->norm_eps);
    }
    w.tag.src = NULL;
    mark(&w, EK_PROF_NORM);
    if (j->n_out) matmuls(&w, m->xb, j->n_out, &(proj){&m->w.output, j->logits}, 1);
    assert(w.cur.claimed == 0); /* a claimed chunk never reported hangs the next run */
}

/* What each slot of the batch will hold once it is evaluated. A batch that
 * starts a slot below where it ended rewinds it (a shared prefix, then a new
 * question); a sliding layer's ring must still hold each token's window,
 * all but the batch's own positions. Checked for the whole batch before
 * anything is written. */
static int track_slots(ek_model *m, int n, const int32_t *pos, const int32_t *slot) {
    int lo[n], hi[n], start[n], top[n], seen[n], n_seen = 0;
    for (int t = 0; t < n; t++) {
        int i = 0;
        while (i < n_seen && seen[i] != slot[t]) i++;
        if (i == n_seen) {
            seen[n_seen++] = slot[t];
            start[i] = top[i] = pos[t];
        }
        if (pos[t] < start[i]) start[i] = pos[t];
        if (pos[t] > top[i]) top[i] = pos[t];
    }
    for (int i = 0; i < n_seen; i++) {
        int s = seen[i];
        lo[i] = start[i] == 0 ? 0 : m->kv_lo[s];
        hi[i] = start[i] < m->kv_hi[s] ? start[i] : m->kv_hi[s];
    }
    if (m->ring)
        for (int t = 0; t < n; t++) {
            int i = 0, need = pos[t] - m->cfg.swa_window + 1;
            while (seen[i] != slot[t]) i++;
            if (need < 0) need = 0;
            if (need < start[i] && need < lo[i]) return EK_EGONE;
        }
    for (int i = 0; i < n_seen; i++) {
        int s = seen[i];
        m->kv_hi[s] = top[i] + 1 > hi[i] ? top[i] + 1 : hi[i];
        m->kv_lo[s] = m->ring && top[i] - m->ring + 1 > lo[i] ? top[i] - m->ring + 1 : lo[i];
    }
    return EK_OK;
}

int ek_forward(ek_model *m, int n, const int32_t *tokens, const int32_t *pos, const int32_t *slot,
               const uint8_t *want, float *logits) {
    if (n < 1 || n > m->p.max_batch) return EK_EINVAL;
    int n_out = 0;
    for (int t = 0; t < n; t++) {
        if (tokens[t] < 0 || tokens[t] >= m->cfg.vocab) return EK_EINVAL;
        if (pos[t] < 0 || pos[t] >= m->p.n_ctx || slot[t] < 0 || slot[t] >= m->p.n_slots)
            return EK_ERANGE;
        n_out += want[t] != 0;
        /* two tokens filing K and V in one cache cell would race */
        for (int u = 0; u < t; u++)
            if (pos[u] == pos[t] && slot[u] == slot[t]) return EK_EINVAL;
    }
    int rc = track_slots(m, n, pos, slot);
    if (rc) return rc;
    fwd_job job = {m, n, tokens, pos, slot, want, logits, n_out};
    if (!m->profiling) {
        ek_pool_run(m->pool, forward_worker, &job);
        return EK_OK;
    }
    double before = 0.0, t0 = ek_now_s();
    for (int k = 0; k < EK_PROF_KINDS; k++) before += m->prof.seconds[k];
    ek_pool_run(m->pool, forward_worker, &job);
    double after = 0.0, t1 = ek_now_s();
    for (int k = 0; k < EK_PROF_KINDS; k++) after += m->prof.seconds[k];
    m->prof.seconds[EK_PROF_DISPATCH] += (t1 - t0) - (after - before);
    m->prof.runs++;
    m->prof.tokens += n;
    return EK_OK;
}

void ek_model_profile(ek_model *m, int on, ek_profile *out) {
    if (out) *out = m->prof;
    memset(&m->prof, 0, sizeof m->prof);
    m->profiling = on;
}

/* ---- cache maintenance ---- */

/* A cached key re-rotated by the angles of cs, one position's heads. */
static void rotate_key(const ek_model *m, const uint8_t *src, uint8_t *dst, const float *cs) {
    int hd = m->cfg.head_dim;
    float row[MAX_HEAD_DIM];
    ek_dequantize_fn load = m->k->types[m->p.kv_type].dequantize;
    for (int h = 0; h < m->cfg.n_kv_head; h++) {
        load(src + h * m->kv_head_bytes, row, hd);
        m->rope(row, 1, hd, cs);
        m->k->kv_store(dst + h * m->kv_head_bytes, row, hd, m->p.kv_type);
    }
}

/* The shift in a ring: positions [first, n_used) move down by n_drop. Their
 * new rows can be rows not yet read, so they are gathered first. */
static void shift_ring(ek_model *m, int l, int slot, int first, int n_drop, int n_used, const float *cs) {
    size_t pb = m->kv_pos_bytes;
    uint8_t *keys = m->ring_buf, *values = m->ring_buf + (size_t)m->ring * pb;
    for (int p = first; p < n_used; p++) {
        int r = kv_row(m, l, p);
        rotate_key(m, kv_at(m, m->kv_k, l, slot, r), keys + (size_t)(p - first) * pb, cs);
        memcpy(values + (size_t)(p - first) * pb, kv_at(m, m->kv_v, l, slot, r), pb);
    }
    for (int p = first; p < n_used; p++) {
        int r = kv_row(m, l, p - n_drop);
        memcpy(kv_at(m, m->kv_k, l, slot, r), keys + (size_t)(p - first) * pb, pb);
        memcpy(kv_at(m, m->kv_v, l, slot, r), values + (size_t)(p - first) * pb, pb);
        mirror_row(m, l, slot, r);
    }
}

int ek_kv_shift(ek_model *m, int slot, int keep, int n_drop, int n_used) {
    if (slot < 0 || slot >= m->p.n_slots || keep < 0 || n_drop < 0 || n_used > m->p.n_ctx ||
        keep + n_drop > n_used)
        return EK_ERANGE;
    int lo = m->kv_lo[slot], hi = m->kv_hi[slot] < n_used ? m->kv_hi[slot] : n_used;
    m->kv_hi[slot] = hi >= keep + n_drop ? hi - n_drop : (hi < keep ? hi : keep);
    if (n_drop == 0) return EK_OK;
    const ek_config *c = &m->cfg;
    int hd = c->head_dim;
    float cs[MAX_HEAD_DIM], cs_swa[MAX_HEAD_DIM];
    rope_angles(m->inv_freq, hd, -(double)n_drop, cs);
    rope_angles(m->inv_freq_swa, hd, -(double)n_drop, cs_swa);
    for (int l = 0; l < c->n_layer; l++) {
        const float *angles = ek_layer_slides(c, l) ? cs_swa : cs;
        if (in_ring(m, l)) {
            shift_ring(m, l, slot, lo > keep + n_drop ? lo : keep + n_drop, n_drop, n_used, angles);
            continue;
        }
        for (int p = keep + n_drop; p < n_used; p++)
            rotate_key(m, kv_at(m, m->kv_k, l, slot, p), kv_at(m, m->kv_k, l, slot, p - n_drop), angles);
        memmove(kv_at(m, m->kv_v, l, slot, keep), kv_at(m, m->kv_v, l, slot, keep + n_drop),
                (size_t)(n_used - keep - n_drop) * m->kv_pos_bytes);
    }
    /* the kept start survives only if the ring still held it */
    if (lo > keep) m->kv_lo[slot] = lo - n_drop > keep ? lo - n_drop : keep;
    return EK_OK;
}

int ek_kv_copy(ek_model *m, int src, int dst, int n) {
    if (src < 0 || src >= m->p.n_slots || dst < 0 || dst >= m->p.n_slots || n < 0 ||
        n > m->p.n_ctx)
        return EK_ERANGE;
    if (src == dst) return EK_OK;
    for (int l = 0; l < m->cfg.n_layer; l++) {
        size_t bytes = (size_t)(in_ring(m, l) ? m->swa_rows : n) * m->kv_pos_bytes;
        memcpy(kv_at(m, m->kv_k, l, dst, 0), kv_at(m, m->kv_k, l, src, 0), bytes);
        memcpy(kv_at(m, m->kv_v, l, dst, 0), kv_at(m, m->kv_v, l, src, 0), bytes);
    }
    m->kv_lo[dst] = m->kv_lo[src];
    m->kv_hi[dst] = n < m->kv_hi[src] ? n : m->kv_hi[src];
    return EK_OK;
}

int ek_kv_usable(const ek_model *m, int slot, int n) {
    if (slot < 0 || slot >= m->p.n_slots || n < 0) return -EK_ERANGE;
    if (n > m->kv_hi[slot]) n = m->kv_hi[slot];
    int window = n - m->cfg.swa_window + 1;
    if (m->ring && n > 0 && (window > 0 ? window : 0) < m->kv_lo[slot]) return 0;
    return n;
}

int ek_model_kv_ring(const ek_model *m) { return m->ring; }

int ek_swa_ring(const ek_config *c, int n_ctx, int max_batch) {
    int rows;
    return swa_ring(c, n_ctx, max_batch, &rows);
}
