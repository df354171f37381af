/* AVX2 kernels for the 32-element block formats: activation quantizers,
 * dequantizers and the gemm entries of the AVX2 table. */
#define EK_X86_VNNI 0
#include "gemm_avx2.h"

/* ---- activation quantizers ----
 * Bit-identical to the reference: the same scale arithmetic (a division,
 * not a reciprocal estimate) and roundf's rounding, half away from zero. */

EK_INLINE __m256i round_half_away_epi32(__m256 v) {
    const __m256 sign = _mm256_and_ps(v, _mm256_set1_ps(-0.0f));
    const __m256 t = _mm256_round_ps(v, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC);
    /* v - t is exact, so the tie test is exact too */
    const __m256 frac = _mm256_andnot_ps(_mm256_set1_ps(-0.0f), _mm256_sub_ps(v, t));
    const __m256 up = _mm256_and_ps(_mm256_cmp_ps(frac, _mm256_set1_ps(0.5f), _CMP_GE_OQ),
                                    _mm256_or_ps(sign, _mm256_set1_ps(1.0f)));
    return _mm256_cvttps_epi32(_mm256_add_ps(t, up));
}

/* Quantizes one block to qs; returns the f32 scale and the sum of the quants. */
EK_INLINE float quantize_block(const float *x, int8_t *qs, int *sum) {
    __m256 v[4];
    __m256 amax = _mm256_setzero_ps();
    for (int k = 0; k < 4; k++) {
        v[k] = _mm256_loadu_ps(x + 8 * k);
        amax = _mm256_max_ps(amax, _mm256_andnot_ps(_mm256_set1_ps(-0.0f), v[k]));
    }
    const float d = hmax_ps(amax) / 127.0f;
    const __m256 id = _mm256_set1_ps(d ? 1.0f / d : 0.0f);

    __m256i q[4];
    for (int k = 0; k < 4; k++) q[k] = round_half_away_epi32(_mm256_mul_ps(v[k], id));
    __m256i total = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
    __m128i t = _mm_add_epi32(_mm256_castsi256_si128(total), _mm256_extracti128_si256(total, 1));
    t = _mm_hadd_epi32(t, t);
    t = _mm_hadd_epi32(t, t);
    *sum = _mm_cvtsi128_si32(t);

    _mm256_storeu_si256((__m256i *)qs, pack_i32_to_i8(q));
    return d;
}

#include "../row_quantizers.h"
EK_ROW_QUANTIZERS(avx2)

/* ---- dequantizers ---- */

/* One block of 32 signed codes: y = d * q (+ m). */
EK_INLINE void store_scaled_i8(float *y, __m256i q, __m256 d, __m256 m, int with_m) {
    store_scaled16(y, _mm256_castsi256_si128(q), d, m, with_m);
    store_scaled16(y + 16, _mm256_extracti128_si256(q, 1), d, m, with_m);
}

void dequantize_row_q4_0_avx2(const void *vx, float *y, int n) {
    const block_q4_0 *x = vx;
    for (int b = 0; b < n / EK_QK; b++) {
        const __m256i q = _mm256_sub_epi8(unpack_nibbles(x[b].qs), _mm256_set1_epi8(8));
        store_scaled_i8(y + b * EK_QK, q, _mm256_set1_ps(f16_to_f32(x[b].d)), _mm256_setzero_ps(),
                        0);
    }
}

void dequantize_row_q4_1_avx2(const void *vx, float *y, int n) {
    const block_q4_1 *x = vx;
    for (int b = 0; b < n / EK_QK; b++)
        store_scaled_i8(y + b * EK_QK, unpack_nibbles(x[b].qs), _mm256_set1_ps(f16_to_f32(x[b].d)),
                        _mm256_set1_ps(f16_to_f32(x[b].m)), 1);
}

void dequantize_row_iq4_nl_avx2(const void *vx, float *y, int n) {
    const block_iq4_nl *x = vx;
    for (int b = 0; b < n / EK_QK; b++) {
        const __m256i q = _mm256_shuffle_epi8(iq4_nl_grid(), unpack_nibbles(x[b].qs));
        store_scaled_i8(y + b * EK_QK, q, _mm256_set1_ps(f16_to_f32(x[b].d)), _mm256_setzero_ps(),
                        0);
    }
}

/* A Q5 block's codes (0..31) in element order. */
EK_INLINE __m256i unpack_q5(const uint8_t *qs, const uint8_t *qh) {
    int32_t h;
    memcpy(&h, qh, sizeof h);
    /* element j's byte gets qh byte j / 8 */
    const __m256i spread = _mm256_shuffle_epi8(
        _mm256_set1_epi32(h), _mm256_setr_epi64x(0, 0x0101010101010101ll, 0x0202020202020202ll,
                                                 0x0303030303030303ll));
    return _mm256_or_si256(unpack_nibbles(qs), fifth_bit_bytes(spread));
}

void dequantize_row_q5_0_avx2(const void *vx, float *y, int n) {
    const block_q5_0 *x = vx;
    for (int b = 0; b < n / EK_QK; b++) {
        const __m256i q = _mm256_sub_epi8(unpack_q5(x[b].qs, x[b].qh), _mm256_set1_epi8(16));
        store_scaled_i8(y + b * EK_QK, q, _mm256_set1_ps(f16_to_f32(x[b].d)), _mm256_setzero_ps(),
                        0);
    }
}

void dequantize_row_q5_1_avx2(const void *vx, float *y, int n) {
    const block_q5_1 *x = vx;
    for (int b = 0; b < n / EK_QK; b++)
        store_scaled_i8(y + b * EK_QK, unpack_q5(x[b].qs, x[b].qh),
                        _mm256_set1_ps(f16_to_f32(x[b].d)), _mm256_set1_ps(f16_to_f32(x[b].m)), 1);
}

void dequantize_row_q8_0_avx2(const void *vx, float *y, int n) {
    const block_q8_0 *x = vx;
    for (int b = 0; b < n / EK_QK; b++)
        store_scaled_i8(y + b * EK_QK, _mm256_loadu_si256((const __m256i *)x[b].qs),
                        _mm256_set1_ps(f16_to_f32(x[b].d)), _mm256_setzero_ps(), 0);
}

void dequantize_row_f16_avx2(const void *vx, float *y, int n) {
    const ek_f16 *x = vx;
    int i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(y + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(x + i))));
    for (; i < n; i++) y[i] = f16_to_f32(x[i]);
}

/* ---- gemm entries ---- */

EK_GEMM_ENTRY(gemm_q4_0_q8_0_avx2, EK_TYPE_Q4_0)
EK_GEMM_ENTRY(gemm_q4_1_q8_1_avx2, EK_TYPE_Q4_1)
EK_GEMM_ENTRY(gemm_q5_0_q8_0_avx2, EK_TYPE_Q5_0)
EK_GEMM_ENTRY(gemm_q5_1_q8_1_avx2, EK_TYPE_Q5_1)
EK_GEMM_ENTRY(gemm_iq4_nl_q8_0_avx2, EK_TYPE_IQ4_NL)
EK_GEMM_ENTRY(gemm_q8_0_q8_0_avx2, EK_TYPE_Q8_0)
EK_GEMM_ENTRY(gemm_f16_f32_avx2, EK_TYPE_F16)
EK_GEMM_ENTRY(gemm_f32_f32_avx2, EK_TYPE_F32)
EK_GEMM_X8_ENTRY(gemm_x8_q4_0_q8_0_avx2, EK_TYPE_Q4_0)
EK_GEMM_X8_ENTRY(gemm_x8_q4_1_q8_1_avx2, EK_TYPE_Q4_1)
EK_GEMM_X8_ENTRY(gemm_x8_q8_0_q8_0_avx2, EK_TYPE_Q8_0)
