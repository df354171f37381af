/* NEON kernels shared between the files of this directory: the dotprod
 * and i8mm tables reuse every NEON kernel except the integer dot products
 * (and i8mm reuses the dotprod gemm for shapes too thin for its tiles). */
#ifndef EDGE_KERNELS_ARM_NEON_H
#define EDGE_KERNELS_ARM_NEON_H

#include <arm_neon.h>
#include <string.h>

#include "edge_kernels.h"
#include "../../ref/ref.h"

/* The tile loops take their sizes as constants: inlining them is what lets
 * the compiler keep every accumulator in a register. */
#define EK_INLINE static inline __attribute__((always_inline))

void quantize_row_q8_0_neon(const float *x, void *y, int n);
void quantize_row_q8_1_neon(const float *x, void *y, int n);
void quantize_row_q8_K_neon(const float *x, void *y, int n);

void dequantize_row_q4_0_neon(const void *x, float *y, int n);
void dequantize_row_q4_1_neon(const void *x, float *y, int n);
void dequantize_row_q5_0_neon(const void *x, float *y, int n);
void dequantize_row_q5_1_neon(const void *x, float *y, int n);
void dequantize_row_iq4_nl_neon(const void *x, float *y, int n);
void dequantize_row_q8_0_neon(const void *x, float *y, int n);
void dequantize_row_q4_K_neon(const void *x, float *y, int n);
void dequantize_row_q5_K_neon(const void *x, float *y, int n);
void dequantize_row_q6_K_neon(const void *x, float *y, int n);
void dequantize_row_f16_neon(const void *x, float *y, int n);

void gemm_q4_0_q8_0_neon(int n, const void *w, size_t w_stride, int nrows, const void *x,
                         size_t x_stride, int nx, float *y, size_t y_stride);
void gemm_q4_1_q8_1_neon(int n, const void *w, size_t w_stride, int nrows, const void *x,
                         size_t x_stride, int nx, float *y, size_t y_stride);
void gemm_q8_0_q8_0_neon(int n, const void *w, size_t w_stride, int nrows, const void *x,
                         size_t x_stride, int nx, float *y, size_t y_stride);
void gemm_q5_0_q8_0_neon(int n, const void *w, size_t w_stride, int nrows, const void *x,
                         size_t x_stride, int nx, float *y, size_t y_stride);
void gemm_q5_1_q8_1_neon(int n, const void *w, size_t w_stride, int nrows, const void *x,
                         size_t x_stride, int nx, float *y, size_t y_stride);
void gemm_iq4_nl_q8_0_neon(int n, const void *w, size_t w_stride, int nrows, const void *x,
                           size_t x_stride, int nx, float *y, size_t y_stride);
void gemm_q4_K_q8_K_neon(int n, const void *w, size_t w_stride, int nrows, const void *x,
                         size_t x_stride, int nx, float *y, size_t y_stride);
void gemm_q5_K_q8_K_neon(int n, const void *w, size_t w_stride, int nrows, const void *x,
                         size_t x_stride, int nx, float *y, size_t y_stride);
void gemm_q6_K_q8_K_neon(int n, const void *w, size_t w_stride, int nrows, const void *x,
                         size_t x_stride, int nx, float *y, size_t y_stride);
void gemm_f16_f32_neon(int n, const void *w, size_t w_stride, int nrows, const void *x,
                       size_t x_stride, int nx, float *y, size_t y_stride);
void gemm_f32_f32_neon(int n, const void *w, size_t w_stride, int nrows, const void *x,
                       size_t x_stride, int nx, float *y, size_t y_stride);

/* Built only when the compiler targets dotprod; called by the i8mm table. */
void gemm_q4_0_q8_0_neon_dotprod(int n, const void *w, size_t w_stride, int nrows,
                                 const void *x, size_t x_stride, int nx, float *y,
                                 size_t y_stride);
void gemm_q4_1_q8_1_neon_dotprod(int n, const void *w, size_t w_stride, int nrows,
                                 const void *x, size_t x_stride, int nx, float *y,
                                 size_t y_stride);
void gemm_q8_0_q8_0_neon_dotprod(int n, const void *w, size_t w_stride, int nrows,
                                 const void *x, size_t x_stride, int nx, float *y,
                                 size_t y_stride);
void gemm_q5_0_q8_0_neon_dotprod(int n, const void *w, size_t w_stride, int nrows,
                                 const void *x, size_t x_stride, int nx, float *y,
                                 size_t y_stride);
void gemm_q5_1_q8_1_neon_dotprod(int n, const void *w, size_t w_stride, int nrows,
                                 const void *x, size_t x_stride, int nx, float *y,
                                 size_t y_stride);
void gemm_iq4_nl_q8_0_neon_dotprod(int n, const void *w, size_t w_stride, int nrows,
                                   const void *x, size_t x_stride, int nx, float *y,
                                   size_t y_stride);
void gemm_q4_K_q8_K_neon_dotprod(int n, const void *w, size_t w_stride, int nrows,
                                 const void *x, size_t x_stride, int nx, float *y,
                                 size_t y_stride);
void gemm_q5_K_q8_K_neon_dotprod(int n, const void *w, size_t w_stride, int nrows,
                                 const void *x, size_t x_stride, int nx, float *y,
                                 size_t y_stride);
void gemm_q6_K_q8_K_neon_dotprod(int n, const void *w, size_t w_stride, int nrows,
                                 const void *x, size_t x_stride, int nx, float *y,
                                 size_t y_stride);

/* The x8 gemms of the plain and dotprod tables (gemm_neon.h). */
EK_DECLARE_X8_GEMMS(neon);
EK_DECLARE_X8_GEMMS(neon_dotprod);

void rmsnorm_neon(float *out, const float *x, const float *w, int n, float eps);
void rope_neon(float *x, int n_heads, int head_dim, const float *cs);
void rope_neox_neon(float *x, int n_heads, int head_dim, const float *cs);
void silu_mul_neon(float *out, const float *gate, const float *up, int n);
void gelu_mul_neon(float *out, const float *gate, const float *up, int n);
void softmax_neon(float *x, int n);
void add_neon(float *x, const float *y, int n);
void attention_neon(float *out, const float *q, const void *k, const void *v, size_t kv_stride,
                    int kv_type, int n_pos, int head_dim, float scale, float *scores);
void kv_store_neon(void *dst, const float *src, int n, int kv_type);

/* The per-type entries of a NEON table, named by its suffix: its integer
 * gemms are gemm_<type>_<table> and gemm_x8_<type>_<table>. The 5-bit
 * types, IQ4_NL and the K-quants keep the file's layout (no gemm_x8). */
#define EK_NEON_TYPE_OPS(table)                                                            \
    [EK_TYPE_F32] = {EK_TYPE_F32, NULL, gemm_f32_f32_neon, dequantize_row_f32_ref, NULL},  \
    [EK_TYPE_F16] = {EK_TYPE_F32, NULL, gemm_f16_f32_neon, dequantize_row_f16_neon, NULL}, \
    [EK_TYPE_Q4_0] = {EK_TYPE_Q8_0, quantize_row_q8_0_neon, gemm_q4_0_q8_0_##table,        \
                      dequantize_row_q4_0_neon, gemm_x8_q4_0_q8_0_##table},                \
    [EK_TYPE_Q4_1] = {EK_TYPE_Q8_1, quantize_row_q8_1_neon, gemm_q4_1_q8_1_##table,        \
                      dequantize_row_q4_1_neon, gemm_x8_q4_1_q8_1_##table},                \
    [EK_TYPE_Q5_0] = {EK_TYPE_Q8_0, quantize_row_q8_0_neon, gemm_q5_0_q8_0_##table,        \
                      dequantize_row_q5_0_neon, NULL},                                     \
    [EK_TYPE_Q5_1] = {EK_TYPE_Q8_1, quantize_row_q8_1_neon, gemm_q5_1_q8_1_##table,        \
                      dequantize_row_q5_1_neon, NULL},                                     \
    [EK_TYPE_Q8_0] = {EK_TYPE_Q8_0, quantize_row_q8_0_neon, gemm_q8_0_q8_0_##table,        \
                      dequantize_row_q8_0_neon, gemm_x8_q8_0_q8_0_##table},                \
    [EK_TYPE_Q4_K] = {EK_TYPE_Q8_K, quantize_row_q8_K_neon, gemm_q4_K_q8_K_##table,        \
                      dequantize_row_q4_K_neon, NULL},                                     \
    [EK_TYPE_Q5_K] = {EK_TYPE_Q8_K, quantize_row_q8_K_neon, gemm_q5_K_q8_K_##table,        \
                      dequantize_row_q5_K_neon, NULL},                                     \
    [EK_TYPE_Q6_K] = {EK_TYPE_Q8_K, quantize_row_q8_K_neon, gemm_q6_K_q8_K_##table,        \
                      dequantize_row_q6_K_neon, NULL},                                     \
    [EK_TYPE_IQ4_NL] = {EK_TYPE_Q8_0, quantize_row_q8_0_neon, gemm_iq4_nl_q8_0_##table,    \
                        dequantize_row_iq4_nl_neon, NULL}

/* Every NEON table shares these entries. */
#define EK_NEON_FLOAT_OPS                                                                  \
    .rmsnorm = rmsnorm_neon, .rope = rope_neon, .silu_mul = silu_mul_neon,                 \
    .softmax = softmax_neon, .add = add_neon, .attention = attention_neon,                 \
    .kv_store = kv_store_neon, .gelu_mul = gelu_mul_neon, .rope_neox = rope_neox_neon

EK_INLINE float f16_to_f32(ek_f16 h) {
    __fp16 v;
    memcpy(&v, &h, sizeof v);
    return (float)v;
}

EK_INLINE ek_f16 f32_to_f16(float f) { /* rounds to nearest even, as the reference */
    __fp16 v = (__fp16)f;
    ek_f16 h;
    memcpy(&h, &v, sizeof h);
    return h;
}

/* Four halves, one from each of four places, as f32 lanes. */
EK_INLINE float32x4_t f16x4_gather(const ek_f16 *a, const ek_f16 *b, const ek_f16 *c,
                                   const ek_f16 *d) {
    uint16x4_t h = vdup_n_u16(0);
    h = vld1_lane_u16(a, h, 0);
    h = vld1_lane_u16(b, h, 1);
    h = vld1_lane_u16(c, h, 2);
    h = vld1_lane_u16(d, h, 3);
    return vcvt_f32_f16(vreinterpret_f16_u16(h));
}

/* The 32 quants of a block as two signed vectors in element order; Q4
 * nibbles are 0..15 (the low nibbles are elements 0..15), minus 8 for
 * Q4_0. */
typedef struct {
    int8x16_t lo, hi;
} quants32;

EK_INLINE quants32 unpack_q4(const uint8_t *qs, int offset) {
    const uint8x16_t q = vld1q_u8(qs);
    quants32 r = {vreinterpretq_s8_u8(vandq_u8(q, vdupq_n_u8(0x0f))),
                  vreinterpretq_s8_u8(vshrq_n_u8(q, 4))};
    if (offset) {
        r.lo = vsubq_s8(r.lo, vdupq_n_s8((int8_t)offset));
        r.hi = vsubq_s8(r.hi, vdupq_n_s8((int8_t)offset));
    }
    return r;
}

EK_INLINE quants32 load_q8(const int8_t *qs) {
    quants32 r = {vld1q_s8(qs), vld1q_s8(qs + 16)};
    return r;
}

/* The quants of a Q5_0 or Q5_1 block as q - 16 (-16..15), in element
 * order: the low 4 bits as unpack_q4's, bit 4 of element j from bit j of
 * qh. Each byte of the inverted qh is spread over the 8 lanes of its
 * elements and tested against each lane's bit: all ones where bit 4 is
 * clear. In the high nibble, that is -16 there and 0 where it is set, so
 * one select (or insert) per half builds the signed quant. Q5_1
 * takes q - 16 too (its offset m gains 16 d): weights within -16..16 fit
 * the plain NEON dot's 16-bit lanes as Q4's do. The loads stay inside the
 * block: the 16 bytes from qh end within qs. */
EK_INLINE quants32 unpack_q5(const uint8_t *qs, const uint8_t *qh) {
    const uint8x16_t clear = vmvnq_u8(vld1q_u8(qh)); /* only bytes 0..3 are used */
    const uint8x16_t spread_lo = vcombine_u8(vdup_n_u8(0), vdup_n_u8(1));
    const uint8x16_t spread_hi = vcombine_u8(vdup_n_u8(2), vdup_n_u8(3));
    const uint8x16_t bit = vreinterpretq_u8_u64(vdupq_n_u64(0x8040201008040201ull));
    const uint8x16_t lo = vtstq_u8(vqtbl1q_u8(clear, spread_lo), bit);
    const uint8x16_t hi = vtstq_u8(vqtbl1q_u8(clear, spread_hi), bit);
    const uint8x16_t q = vld1q_u8(qs);
    /* (lo & 0xf0) | (q & 0x0f), a select that keeps q for the other half */
    quants32 r = {vreinterpretq_s8_u8(vbslq_u8(vdupq_n_u8(0x0f), q, lo)),
                  vreinterpretq_s8_u8(vsriq_n_u8(hi, q, 4))}; /* (hi & 0xf0) | (q >> 4) */
    return r;
}

/* The quants of an IQ4_NL block, in element order: Q4's nibbles, each
 * looked up in the grid. */
EK_INLINE quants32 unpack_iq4_nl(const uint8_t *qs) {
    const int8x16_t grid = vld1q_s8(ek_iq4nl_values);
    const quants32 idx = unpack_q4(qs, 0);
    quants32 r = {vqtbl1q_s8(grid, vreinterpretq_u8_s8(idx.lo)),
                  vqtbl1q_s8(grid, vreinterpretq_u8_s8(idx.hi))};
    return r;
}

/* Whether the weight type has an offset m (paired with Q8_1's sums). */
EK_INLINE int has_min(const int wtype) {
    return wtype == EK_TYPE_Q4_1 || wtype == EK_TYPE_Q5_1;
}

/* Block b of a weight row of a 32-element type: its quants as the dot
 * products take them (signed, Q4_0 and Q5's offset removed, IQ4_NL's
 * looked up) and where its d and (Q4_1, Q5_1) m are; *m is *d for the
 * types without. */
EK_INLINE quants32 weight_quants(const int wtype, const char *row, int b, const ek_f16 **d,
                                 const ek_f16 **m) {
    switch (wtype) {
    case EK_TYPE_Q4_0: {
        const block_q4_0 *blk = (const block_q4_0 *)row + b;
        *d = *m = &blk->d;
        return unpack_q4(blk->qs, 8);
    }
    case EK_TYPE_Q4_1: {
        const block_q4_1 *blk = (const block_q4_1 *)row + b;
        *d = &blk->d;
        *m = &blk->m;
        return unpack_q4(blk->qs, 0);
    }
    case EK_TYPE_Q5_0: {
        const block_q5_0 *blk = (const block_q5_0 *)row + b;
        *d = *m = &blk->d;
        return unpack_q5(blk->qs, blk->qh);
    }
    case EK_TYPE_Q5_1: {
        const block_q5_1 *blk = (const block_q5_1 *)row + b;
        *d = &blk->d;
        *m = &blk->m;
        return unpack_q5(blk->qs, blk->qh);
    }
    case EK_TYPE_IQ4_NL: {
        const block_iq4_nl *blk = (const block_iq4_nl *)row + b;
        *d = *m = &blk->d;
        return unpack_iq4_nl(blk->qs);
    }
    default: {
        const block_q8_0 *blk = (const block_q8_0 *)row + b;
        *d = *m = &blk->d;
        return load_q8(blk->qs);
    }
    }
}

/* The offsets of four rows' blocks, given their scales d: m, and for Q5_1
 * m + 16 d, since its quants come as q - 16. */
EK_INLINE float32x4_t block_offsets(const int wtype, float32x4_t d, const ek_f16 *m0,
                                    const ek_f16 *m1, const ek_f16 *m2, const ek_f16 *m3) {
    const float32x4_t m = f16x4_gather(m0, m1, m2, m3);
    return wtype == EK_TYPE_Q5_1 ? vfmaq_n_f32(m, d, 16.0f) : m;
}

EK_INLINE size_t block_bytes(const int wtype) {
    switch (wtype) {
    case EK_TYPE_Q4_0: return sizeof(block_q4_0);
    case EK_TYPE_Q4_1: return sizeof(block_q4_1);
    case EK_TYPE_Q5_0: return sizeof(block_q5_0);
    case EK_TYPE_Q5_1: return sizeof(block_q5_1);
    case EK_TYPE_IQ4_NL: return sizeof(block_iq4_nl);
    case EK_TYPE_Q4_K: return sizeof(block_q4_K);
    case EK_TYPE_Q5_K: return sizeof(block_q5_K);
    case EK_TYPE_Q6_K: return sizeof(block_q6_K);
    default: return sizeof(block_q8_0);
    }
}

#endif
