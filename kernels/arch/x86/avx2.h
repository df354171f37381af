/* AVX2 kernels shared between the files of this directory: the AVX-VNNI
 * and AVX-512 VNNI tables reuse every AVX2 kernel except the integer gemms.
 * Included only by files built with (at least) -mavx2 -mfma -mf16c. */
#ifndef EDGE_KERNELS_X86_AVX2_H
#define EDGE_KERNELS_X86_AVX2_H

#include <immintrin.h>

#include "edge_kernels.h"
#include "../../ref/ref.h"

/* The tile loops take their sizes as constants: inlining them is what lets
 * the compiler keep every accumulator in a register. */
#define EK_INLINE static inline __attribute__((always_inline))

void quantize_row_q8_0_avx2(const float *x, void *y, int n);
void quantize_row_q8_1_avx2(const float *x, void *y, int n);
void quantize_row_q8_K_avx2(const float *x, void *y, int n);

void dequantize_row_q4_0_avx2(const void *x, float *y, int n);
void dequantize_row_q4_1_avx2(const void *x, float *y, int n);
void dequantize_row_q5_0_avx2(const void *x, float *y, int n);
void dequantize_row_q5_1_avx2(const void *x, float *y, int n);
void dequantize_row_iq4_nl_avx2(const void *x, float *y, int n);
void dequantize_row_q4_K_avx2(const void *x, float *y, int n);
void dequantize_row_q5_K_avx2(const void *x, float *y, int n);
void dequantize_row_q6_K_avx2(const void *x, float *y, int n);
void dequantize_row_q8_0_avx2(const void *x, float *y, int n);
void dequantize_row_f16_avx2(const void *x, float *y, int n);

void gemm_q4_0_q8_0_avx2(int n, const void *w, size_t w_stride, int nrows, const void *x,
                         size_t x_stride, int nx, float *y, size_t y_stride);
void gemm_q4_1_q8_1_avx2(int n, const void *w, size_t w_stride, int nrows, const void *x,
                         size_t x_stride, int nx, float *y, size_t y_stride);
void gemm_q8_0_q8_0_avx2(int n, const void *w, size_t w_stride, int nrows, const void *x,
                         size_t x_stride, int nx, float *y, size_t y_stride);
/* The 5-bit, IQ4_NL and K-quant gemms have no VNNI versions: every x86
 * table uses these. */
void gemm_q5_0_q8_0_avx2(int n, const void *w, size_t w_stride, int nrows, const void *x,
                         size_t x_stride, int nx, float *y, size_t y_stride);
void gemm_q5_1_q8_1_avx2(int n, const void *w, size_t w_stride, int nrows, const void *x,
                         size_t x_stride, int nx, float *y, size_t y_stride);
void gemm_iq4_nl_q8_0_avx2(int n, const void *w, size_t w_stride, int nrows, const void *x,
                           size_t x_stride, int nx, float *y, size_t y_stride);
void gemm_q4_K_q8_K_avx2(int n, const void *w, size_t w_stride, int nrows, const void *x,
                         size_t x_stride, int nx, float *y, size_t y_stride);
void gemm_q5_K_q8_K_avx2(int n, const void *w, size_t w_stride, int nrows, const void *x,
                         size_t x_stride, int nx, float *y, size_t y_stride);
void gemm_q6_K_q8_K_avx2(int n, const void *w, size_t w_stride, int nrows, const void *x,
                         size_t x_stride, int nx, float *y, size_t y_stride);
void gemm_f16_f32_avx2(int n, const void *w, size_t w_stride, int nrows, const void *x,
                       size_t x_stride, int nx, float *y, size_t y_stride);
void gemm_f32_f32_avx2(int n, const void *w, size_t w_stride, int nrows, const void *x,
                       size_t x_stride, int nx, float *y, size_t y_stride);

void rmsnorm_avx2(float *out, const float *x, const float *w, int n, float eps);
void rope_avx2(float *x, int n_heads, int head_dim, const float *cs);
void rope_neox_avx2(float *x, int n_heads, int head_dim, const float *cs);
void silu_mul_avx2(float *out, const float *gate, const float *up, int n);
void gelu_mul_avx2(float *out, const float *gate, const float *up, int n);
void softmax_avx2(float *x, int n);
void add_avx2(float *x, const float *y, int n);
void attention_avx2(float *out, const float *q, const void *k, const void *v, size_t kv_stride,
                    int kv_type, int n_pos, int head_dim, float scale, float *scores);
void kv_store_avx2(void *dst, const float *src, int n, int kv_type);

/* The x8 gemms of each x86 table (gemm_avx2.h, through its EK_GEMM_X8_ENTRY). */
EK_DECLARE_X8_GEMMS(avx2);
EK_DECLARE_X8_GEMMS(avx_vnni);
EK_DECLARE_X8_GEMMS(avx512_vnni);

/* The per-type entries of an x86 table, named by its suffix: its integer
 * gemms of the x8 types are gemm_<type>_<table> and gemm_x8_<type>_<table>;
 * the other block types keep the file's layout and share the AVX2 gemms. */
#define EK_AVX2_TYPE_OPS(table)                                                            \
    [EK_TYPE_F32] = {EK_TYPE_F32, NULL, gemm_f32_f32_avx2, dequantize_row_f32_ref, NULL},  \
    [EK_TYPE_F16] = {EK_TYPE_F32, NULL, gemm_f16_f32_avx2, dequantize_row_f16_avx2, NULL}, \
    [EK_TYPE_Q4_0] = {EK_TYPE_Q8_0, quantize_row_q8_0_avx2, gemm_q4_0_q8_0_##table,        \
                      dequantize_row_q4_0_avx2, gemm_x8_q4_0_q8_0_##table},                \
    [EK_TYPE_Q4_1] = {EK_TYPE_Q8_1, quantize_row_q8_1_avx2, gemm_q4_1_q8_1_##table,        \
                      dequantize_row_q4_1_avx2, gemm_x8_q4_1_q8_1_##table},                \
    [EK_TYPE_Q5_0] = {EK_TYPE_Q8_0, quantize_row_q8_0_avx2, gemm_q5_0_q8_0_avx2,           \
                      dequantize_row_q5_0_avx2, NULL},                                     \
    [EK_TYPE_Q5_1] = {EK_TYPE_Q8_1, quantize_row_q8_1_avx2, gemm_q5_1_q8_1_avx2,           \
                      dequantize_row_q5_1_avx2, NULL},                                     \
    [EK_TYPE_Q8_0] = {EK_TYPE_Q8_0, quantize_row_q8_0_avx2, gemm_q8_0_q8_0_##table,        \
                      dequantize_row_q8_0_avx2, gemm_x8_q8_0_q8_0_##table},                \
    [EK_TYPE_Q4_K] = {EK_TYPE_Q8_K, quantize_row_q8_K_avx2, gemm_q4_K_q8_K_avx2,           \
                      dequantize_row_q4_K_avx2, NULL},                                     \
    [EK_TYPE_Q5_K] = {EK_TYPE_Q8_K, quantize_row_q8_K_avx2, gemm_q5_K_q8_K_avx2,           \
                      dequantize_row_q5_K_avx2, NULL},                                     \
    [EK_TYPE_Q6_K] = {EK_TYPE_Q8_K, quantize_row_q8_K_avx2, gemm_q6_K_q8_K_avx2,           \
                      dequantize_row_q6_K_avx2, NULL},                                     \
    [EK_TYPE_IQ4_NL] = {EK_TYPE_Q8_0, quantize_row_q8_0_avx2, gemm_iq4_nl_q8_0_avx2,       \
                        dequantize_row_iq4_nl_avx2, NULL}

/* Every x86 table shares these entries. */
#define EK_AVX2_FLOAT_OPS                                                                  \
    .rmsnorm = rmsnorm_avx2, .rope = rope_avx2, .silu_mul = silu_mul_avx2,                 \
    .softmax = softmax_avx2, .add = add_avx2, .attention = attention_avx2,                 \
    .kv_store = kv_store_avx2, .gelu_mul = gelu_mul_avx2, .rope_neox = rope_neox_avx2

/* The same names as on ARM, so the code both share reads alike. */
EK_INLINE float f16_to_f32(ek_f16 h) { return _cvtsh_ss(h); }
EK_INLINE ek_f16 f32_to_f16(float f) { return _cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT); }

EK_INLINE float hsum_ps(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

EK_INLINE float hmax_ps(__m256 v) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    m = _mm_max_ss(m, _mm_movehdup_ps(m));
    return _mm_cvtss_f32(m);
}

/* 32 int32 (each in -128..127), in order, as 32 bytes. */
EK_INLINE __m256i pack_i32_to_i8(const __m256i q[4]) {
    /* the packs interleave 128-bit lanes; the permute restores element order */
    const __m256i q8 =
        _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
    return _mm256_permutevar8x32_epi32(q8, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
}

/* y[0..15] = d * q, plus m with with_m, for 16 signed bytes q: the
 * reference's operations (a multiply, then an add; no fused multiply-add),
 * so the dequantizers' results are identical to its. */
EK_INLINE void store_scaled16(float *y, __m128i q, __m256 d, __m256 m, const int with_m) {
#pragma GCC unroll 2
    for (int k = 0; k < 2; k++) {
        const __m128i part = k ? _mm_unpackhi_epi64(q, q) : q;
        __m256 f = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(part)), d);
        if (with_m) f = _mm256_add_ps(f, m);
        _mm256_storeu_ps(y + 8 * k, f);
    }
}

/* 32 nibbles of a Q4 block as bytes 0..15, in element order: the low
 * nibbles are elements 0..15, the high ones 16..31. */
EK_INLINE __m256i unpack_nibbles(const uint8_t *qs) {
    __m128i q = _mm_loadu_si128((const __m128i *)qs);
    __m256i both = _mm256_set_m128i(_mm_srli_epi16(q, 4), q);
    return _mm256_and_si256(both, _mm256_set1_epi8(0x0f));
}

/* IQ4_NL's grid in both 128-bit lanes: a byte shuffle by 4-bit codes
 * looks each one up. */
EK_INLINE __m256i iq4_nl_grid(void) {
    return _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)ek_iq4nl_values));
}

#endif
