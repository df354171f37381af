/*
 * edge-slm kernels: block formats, the kernel table, and the forward pass.
 *
 * The block layouts are those of GGUF files (ggml's), so weights are used
 * straight from the memory map. Type ids are the GGUF ones; the Python side
 * (edge_slm/formats.py) mirrors them and a test checks the two agree.
 *
 * Kernels never allocate, print or exit: the caller (the CPython binding or
 * the forward pass) validates shapes once and owns every buffer.
 */
#ifndef EDGE_KERNELS_H
#define EDGE_KERNELS_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* ---- GGUF tensor types we understand (ids as in the file format) ---- */
enum ek_type {
    EK_TYPE_F32  = 0,
    EK_TYPE_F16  = 1,
    EK_TYPE_Q4_0 = 2,
    EK_TYPE_Q4_1 = 3,
    EK_TYPE_Q5_0 = 6,
    EK_TYPE_Q5_1 = 7,
    EK_TYPE_Q8_0 = 8,
    EK_TYPE_Q8_1 = 9, /* activations only: our Q8_1 keeps d and s in f32 */
    EK_TYPE_Q4_K = 12,
    EK_TYPE_Q5_K = 13,
    EK_TYPE_Q6_K = 14,
    EK_TYPE_Q8_K = 15, /* activations only, paired with the K-quants */
    EK_TYPE_IQ4_NL = 20,
    EK_TYPE_COUNT = 21
};

#define EK_QK 32   /* elements per block of the 32-element types */
#define EK_QK_K 256 /* elements per super-block of the K-quants */
#define EK_K_SCALE_BYTES 12 /* Q4_K and Q5_K: 8 6-bit scales and 8 6-bit mins */

typedef uint16_t ek_f16; /* IEEE half, stored as bits */

/* Q4_0: x = d * (q - 8); low nibbles hold elements 0..15, high 16..31. */
typedef struct { ek_f16 d; uint8_t qs[EK_QK / 2]; } block_q4_0;
/* Q4_1: x = d * q + m; same nibble order as Q4_0. */
typedef struct { ek_f16 d; ek_f16 m; uint8_t qs[EK_QK / 2]; } block_q4_1;
/* Q5_0: x = d * (q - 16); q's low 4 bits as Q4_0's nibbles, bit 4 of
 * element j is bit j of qh (read as a little-endian 32-bit word). */
typedef struct { ek_f16 d; uint8_t qh[4]; uint8_t qs[EK_QK / 2]; } block_q5_0;
/* Q5_1: x = d * q + m; q as Q5_0's. */
typedef struct { ek_f16 d; ek_f16 m; uint8_t qh[4]; uint8_t qs[EK_QK / 2]; } block_q5_1;
/* IQ4_NL: x = d * ek_iq4nl_values[q]; q's nibbles as Q4_0's. The values
 * are ggml's fixed non-linear grid (kvalues_iq4nl), denser near zero. */
typedef struct { ek_f16 d; uint8_t qs[EK_QK / 2]; } block_iq4_nl;
/* Q8_0: x = d * q. Used for weights, activations and the 8-bit KV cache. */
typedef struct { ek_f16 d; int8_t qs[EK_QK]; } block_q8_0;
/* Q8_1 (activations paired with Q4_1): x = d * q, s = d * sum(q) so the
 * Q4_1 offset m contributes m * s without touching the quants. Kept in f32:
 * it never reaches a file and f32 saves a conversion in every dot product. */
typedef struct { float d; float s; int8_t qs[EK_QK]; } block_q8_1;

/* The K-quants: super-blocks of 256 elements in sub-blocks with scales of
 * their own, themselves quantized against the super-block's d (and dmin).
 * Q4_K: 8 sub-blocks of 32, x = d * sc * q - dmin * mn, q 4 bits; sc and
 * mn are 6 bits, packed in scales[12] (sub-blocks 0..3 in the low 6 bits of
 * bytes 0..3 and 4..7, 4..7 split between the top 2 bits of those and the
 * nibbles of bytes 8..11). Each 32 bytes of qs hold two sub-blocks: low
 * nibbles the first, high nibbles the second. */
typedef struct { ek_f16 d; ek_f16 dmin; uint8_t scales[EK_K_SCALE_BYTES]; uint8_t qs[EK_QK_K / 2]; } block_q4_K;
/* Q5_K: Q4_K with a fifth bit per element in qh: bit 2i of qh[j] (i < 4)
 * for element j of sub-block 2i, bit 2i+1 for element j of sub-block 2i+1. */
typedef struct {
    ek_f16 d; ek_f16 dmin; uint8_t scales[EK_K_SCALE_BYTES]; uint8_t qh[EK_QK_K / 8]; uint8_t qs[EK_QK_K / 2];
} block_q5_K;
/* Q6_K: 16 sub-blocks of 16, x = d * scales[i] * (q - 32), q 6 bits: the
 * low 4 in ql, the high 2 in qh, laid out per 128 elements as ggml does. */
typedef struct { uint8_t ql[EK_QK_K / 2]; uint8_t qh[EK_QK_K / 4]; int8_t scales[EK_QK_K / 16]; ek_f16 d; } block_q6_K;
/* Q8_K (activations paired with the K-quants): x = d * q, with the sums
 * of each 16 quants so the min terms need no pass over the quants. */
typedef struct { float d; int8_t qs[EK_QK_K]; int16_t bsums[EK_QK_K / 16]; } block_q8_K;

_Static_assert(sizeof(block_q4_0) == 18, "block_q4_0 is 18 bytes in GGUF");
_Static_assert(sizeof(block_q4_1) == 20, "block_q4_1 is 20 bytes in GGUF");
_Static_assert(sizeof(block_q5_0) == 22, "block_q5_0 is 22 bytes in GGUF");
_Static_assert(sizeof(block_q5_1) == 24, "block_q5_1 is 24 bytes in GGUF");
_Static_assert(sizeof(block_iq4_nl) == 18, "block_iq4_nl is 18 bytes in GGUF");
_Static_assert(sizeof(block_q8_0) == 34, "block_q8_0 is 34 bytes in GGUF");
_Static_assert(sizeof(block_q8_1) == 40, "block_q8_1 is our own 40-byte layout");
_Static_assert(sizeof(block_q4_K) == 144, "block_q4_K is 144 bytes in GGUF");
_Static_assert(sizeof(block_q5_K) == 176, "block_q5_K is 176 bytes in GGUF");
_Static_assert(sizeof(block_q6_K) == 210, "block_q6_K is 210 bytes in GGUF");
_Static_assert(sizeof(block_q8_K) == 292, "block_q8_K is ggml's 292-byte layout");

/* IQ4_NL's 16 values, indexed by a block's 4-bit codes. */
extern const int8_t ek_iq4nl_values[16];

/* Elements per block and bytes per block, by type id (0 where unsupported). */
int    ek_type_block_elems(int type);
size_t ek_type_block_bytes(int type);
size_t ek_row_bytes(int type, int64_t n); /* n must be a multiple of the block */

float  ek_f16_to_f32(ek_f16 h);
ek_f16 ek_f32_to_f16(float f); /* round to nearest even */

/* ---- the x8 layout: weights as decoding streams them ------------------
 * Decoding reads every weight once per token, so the block types are
 * repacked once at load into groups of EK_X8_ROWS rows that a kernel reads
 * front to back: first the scales of every block (for block b: d of rows
 * 0..7 as f16, then for Q4_1 m of rows 0..7), then the quants of every
 * block. A block's quants (qs as in the file, 16 or 32 bytes a row) are
 * cut into 4-byte pieces and interleaved by row: piece 0 of rows 0..7,
 * piece 1 of rows 0..7, and so on. One 32-byte load then holds the same 4
 * columns of 8 rows, so a SIMD lane (or a dot-product lane) is a row: the
 * 8 rows' sums need no folding, and one activation piece, broadcast, serves
 * all 8. A group takes exactly the bytes of its 8 rows, so row r's group
 * starts at (r / 8) * 8 * row_bytes; rows past the last whole group keep
 * the file's layout. A table's gemm_x8 takes gemm's arguments, with w at
 * the start of a group and w_stride the file's row bytes. */
#define EK_X8_ROWS 8
#define EK_X8_PIECE 4 /* bytes of one row in a run of the interleave */

/* Whether type has the x8 layout (the block types). */
int ek_x8_layout(int type);
/* Scale bytes per block of a group (8 d's, and 8 m's for Q4_1). */
static inline size_t ek_x8_scale_bytes(int type) { return type == EK_TYPE_Q4_1 ? 32 : 16; }
/* Quant bytes of one row's block (qs). */
static inline size_t ek_x8_quant_bytes(int type) { return type == EK_TYPE_Q8_0 ? 32 : 16; }
/* Bytes of one block of a group's 8 rows, scales and quants: inline, so a
 * kernel's prefetch loop over them unrolls. */
static inline size_t ek_x8_step_bytes(int type) {
    return ek_x8_scale_bytes(type) + EK_X8_ROWS * ek_x8_quant_bytes(type);
}
/* Block b's 8 d's (and, 8 halves on, Q4_1's 8 m's). */
static inline const ek_f16 *ek_x8_d(int type, const void *group, int b) {
    return (const ek_f16 *)((const uint8_t *)group + (size_t)b * ek_x8_scale_bytes(type));
}
/* Block b's interleaved quants, 8 rows; nb blocks per row. */
static inline const uint8_t *ek_x8_quants(int type, const void *group, int nb, int b) {
    return (const uint8_t *)group + (size_t)nb * ek_x8_scale_bytes(type) +
           (size_t)b * EK_X8_ROWS * ek_x8_quant_bytes(type);
}

/* Repacks rows x cols weights of type from the file's layout (src) into
 * the x8 layout (dst, as many bytes). With release set, src is a read-only
 * file mapping whose pages are handed back to the kernel as they are
 * consumed (ek_release_mapped), so the weights are not resident twice. */
void ek_x8_pack(int type, const void *src, void *dst, int rows, int cols, int release);
/* Drops the pages of [lo, hi) of a read-only file mapping from this
 * process (rounded out to whole pages; they are read again if touched). */
void ek_release_mapped(const void *lo, const void *hi);
/* Block b of row i of a group, in the file's layout, at dst. */
void ek_x8_block(int type, const void *group, int nb, int i, int b, void *dst);

/* ---- the kernel table ------------------------------------------------
 * One table per implementation (ref, avx2, neon, ...). Each weight type
 * names the activation format it is dotted with and how to make it.
 *
 * gemm: y[j * y_stride + i] = dot(w row i, x row j), for i < nrows, j < nx.
 *   n        elements per row (a multiple of 32 for block types)
 *   w        first weight row; rows are w_stride bytes apart
 *   x        first activation row, in act_type; rows x_stride bytes apart
 * One entry covers a single dot product (nrows = nx = 1), a matrix-vector
 * product (decode) and a matrix-matrix product (prefill, batched decode):
 * SIMD versions tile rows x columns so each weight block is loaded once
 * for several activation rows.
 */
typedef void (*ek_gemm_fn)(int n, const void *w, size_t w_stride, int nrows,
                           const void *x, size_t x_stride, int nx,
                           float *y, size_t y_stride);
typedef void (*ek_quantize_fn)(const float *x, void *y, int n);
typedef void (*ek_dequantize_fn)(const void *x, float *y, int n);

typedef struct {
    int              act_type;   /* activation format: Q8_0, Q8_1, Q8_K or F32 */
    ek_quantize_fn   quantize;   /* f32 -> act_type (NULL when F32) */
    ek_gemm_fn       gemm;       /* NULL when the weight type is unsupported */
    ek_dequantize_fn dequantize; /* weight row -> f32 (embedding lookups) */
    ek_gemm_fn       gemm_x8;    /* the same product over the x8 layout (below);
                                    NULL for types that keep the file's layout */
} ek_type_ops;

typedef struct {
    const char *name;
    ek_type_ops types[EK_TYPE_COUNT];

    /* out[i] = x[i] / rms(x) * w[i]; out may alias x. The sum of squares is
     * taken in double, so every implementation gets the same scale. */
    void (*rmsnorm)(float *out, const float *x, const float *w, int n, float eps);
    /* Rotate adjacent pairs (x[2i], x[2i+1]) of each head by angle i:
     * cs[2i] = cos, cs[2i+1] = sin, for i < head_dim / 2. */
    void (*rope)(float *x, int n_heads, int head_dim, const float *cs);
    /* out[i] = silu(gate[i]) * up[i]; out may alias gate */
    void (*silu_mul)(float *out, const float *gate, const float *up, int n);
    /* out[i] = gelu(gate[i]) * up[i], GELU in its tanh form; out may alias gate */
    void (*gelu_mul)(float *out, const float *gate, const float *up, int n);
    /* rope, the NeoX way (Qwen, Gemma): element i of a head pairs with
     * element i + head_dim / 2, rotated by the same angle i as rope's pair i. */
    void (*rope_neox)(float *x, int n_heads, int head_dim, const float *cs);
    /* in place, numerically stable */
    void (*softmax)(float *x, int n);
    /* x[i] += y[i] */
    void (*add)(float *x, const float *y, int n);
    /* One query head over n_pos cached positions of one KV head.
     *   q        [head_dim] f32
     *   k, v     position 0 of this KV head, in kv_type (F16 or Q8_0);
     *            consecutive positions are kv_stride bytes apart
     *   scores   scratch, [n_pos]
     *   out      [head_dim] = sum_t softmax(scale * q.k_t)_t * v_t
     */
    void (*attention)(float *out, const float *q, const void *k, const void *v,
                      size_t kv_stride, int kv_type, int n_pos, int head_dim,
                      float scale, float *scores);
    /* Write one head vector into the cache in kv_type. */
    void (*kv_store)(void *dst, const float *src, int n, int kv_type);
} ek_kernels;

/* A SIMD table's x8 gemms, named gemm_x8_<type>_<table>, declared for the
 * files that build tables from them. */
#define EK_DECLARE_X8_GEMM(name)                                                            \
    void name(int n, const void *w, size_t w_stride, int nrows, const void *x,              \
              size_t x_stride, int nx, float *y, size_t y_stride)
#define EK_DECLARE_X8_GEMMS(table)                                                          \
    EK_DECLARE_X8_GEMM(gemm_x8_q4_0_q8_0_##table);                                          \
    EK_DECLARE_X8_GEMM(gemm_x8_q4_1_q8_1_##table);                                          \
    EK_DECLARE_X8_GEMM(gemm_x8_q8_0_q8_0_##table)

/* The scalar reference: the specification every other table is tested
 * against. Always built. */
extern const ek_kernels ek_kernels_ref;
#if defined(__x86_64__) || defined(_M_X64)
extern const ek_kernels ek_kernels_avx2;
extern const ek_kernels ek_kernels_avx_vnni; /* AVX2 with AVX-VNNI dot products */
extern const ek_kernels ek_kernels_avx512_vnni; /* AVX2 with AVX-512 VNNI gemms */
#endif
#if defined(__aarch64__)
extern const ek_kernels ek_kernels_neon;
extern const ek_kernels ek_kernels_neon_dotprod; /* armv8.2-a dotprod */
extern const ek_kernels ek_kernels_neon_i8mm;    /* armv8.6-a i8mm (and dotprod) */
#endif

/* Implementations usable on this CPU, best first, NULL-terminated. */
const ek_kernels *const *ek_available(void);
/* By name ("ref", "avx2", "neon", ...), NULL if unknown or unusable here. */
const ek_kernels *ek_find(const char *name);
/* The best usable table, or the one named by $EDGE_SLM_BACKEND. */
const ek_kernels *ek_best(void);

/* ---- error codes shared by the pool, the model and the binding ---- */
enum ek_status {
    EK_OK = 0,
    EK_ENOMEM = 1,
    EK_EINVAL = 2,
    EK_ERANGE = 3, /* a position beyond the context, a slot beyond n_slots */
    EK_ETYPE = 4,  /* a tensor type without a kernel */
    EK_EGONE = 5,  /* a window a sliding-window layer's ring no longer holds */
};

#ifdef __cplusplus
}
#endif
#endif
