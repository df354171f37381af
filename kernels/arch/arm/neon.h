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

void dequantize_row_q4_0_neon(const void *x, float *y, int n);
void dequantize_row_q4_1_neon(const void *x, float *y, int n);
void dequantize_row_q8_0_neon(const void *x, float *y, int n);
void dequantize_row_f16_neon(const void *x, float *y, int n);

void gemm_q4_0_q8_0_neon(int n, const void *w, size_t w_stride, int nrows, const void *x,
                         size_t x_stride, int nx, float *y, size_t y_stride);
void gemm_q4_1_q8_1_neon(int n, const void *w, size_t w_stride, int nrows, const void *x,
                         size_t x_stride, int nx, float *y, size_t y_stride);
void gemm_q8_0_q8_0_neon(int n, const void *w, size_t w_stride, int nrows, const void *x,
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

/* The x8 gemms of the plain and dotprod tables (gemm_neon.h). */
EK_DECLARE_X8_GEMMS(neon);
EK_DECLARE_X8_GEMMS(neon_dotprod);

void rmsnorm_neon(float *out, const float *x, const float *w, int n, float eps);
void rope_neon(float *x, int n_heads, int head_dim, const float *cs);
void silu_mul_neon(float *out, const float *gate, const float *up, int n);
void softmax_neon(float *x, int n);
void add_neon(float *x, const float *y, int n);
void attention_neon(float *out, const float *q, const void *k, const void *v, size_t kv_stride,
                    int kv_type, int n_pos, int head_dim, float scale, float *scores);
void kv_store_neon(void *dst, const float *src, int n, int kv_type);

/* The per-type entries of a NEON table, named by its suffix: its integer
 * gemms are gemm_<type>_<table> and gemm_x8_<type>_<table>. */
#define EK_NEON_TYPE_OPS(table)                                                            \
    [EK_TYPE_F32] = {EK_TYPE_F32, NULL, gemm_f32_f32_neon, dequantize_row_f32_ref, NULL},  \
    [EK_TYPE_F16] = {EK_TYPE_F32, NULL, gemm_f16_f32_neon, dequantize_row_f16_neon, NULL}, \
    [EK_TYPE_Q4_0] = {EK_TYPE_Q8_0, quantize_row_q8_0_neon, gemm_q4_0_q8_0_##table,        \
                      dequantize_row_q4_0_neon, gemm_x8_q4_0_q8_0_##table},                \
    [EK_TYPE_Q4_1] = {EK_TYPE_Q8_1, quantize_row_q8_1_neon, gemm_q4_1_q8_1_##table,        \
                      dequantize_row_q4_1_neon, gemm_x8_q4_1_q8_1_##table},                \
    [EK_TYPE_Q8_0] = {EK_TYPE_Q8_0, quantize_row_q8_0_neon, gemm_q8_0_q8_0_##table,        \
                      dequantize_row_q8_0_neon, gemm_x8_q8_0_q8_0_##table}

/* Every NEON table shares these entries. */
#define EK_NEON_FLOAT_OPS                                                                  \
    .rmsnorm = rmsnorm_neon, .rope = rope_neon, .silu_mul = silu_mul_neon,                 \
    .softmax = softmax_neon, .add = add_neon, .attention = attention_neon,                 \
    .kv_store = kv_store_neon, .gelu_mul = gelu_mul_ref, .rope_neox = rope_neox_ref

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

#endif
