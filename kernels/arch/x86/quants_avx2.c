/* AVX2 kernels for the block formats: activation quantizers, dequantizers
 * and the gemm entries of the AVX2 table. */
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
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    m = _mm_max_ss(m, _mm_movehdup_ps(m));
    const float d = _mm_cvtss_f32(m) / 127.0f;
    const __m256 id = _mm256_set1_ps(d ? 1.0f / d : 0.0f);

    __m256i q[4];
    for (int k = 0; k < 4; k++) q[k] = round_half_away_epi32(_mm256_mul_ps(v[k], id));
    __m256i total = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
    __m128i t = _mm_add_epi32(_mm256_castsi256_si128(total), _mm256_extracti128_si256(total, 1));
    t = _mm_hadd_epi32(t, t);
    t = _mm_hadd_epi32(t, t);
    *sum = _mm_cvtsi128_si32(t);

    /* the packs interleave 128-bit lanes; the permute restores element order */
    __m256i q16 =
        _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
    q16 = _mm256_permutevar8x32_epi32(q16, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    _mm256_storeu_si256((__m256i *)qs, q16);
    return d;
}

#include "../row_quantizers.h"
EK_ROW_QUANTIZERS(avx2)

/* ---- dequantizers ----
 * Same operations as the reference (a multiply, then an add for q4_1; no
 * fused multiply-add), so the results are identical. */

EK_INLINE void store_scaled_i8(float *y, __m256i q, __m256 d, __m256 m, int with_m) {
    const __m128i halves[2] = {_mm256_castsi256_si128(q), _mm256_extracti128_si256(q, 1)};
    for (int h = 0; h < 2; h++) {
        for (int k = 0; k < 2; k++) {
            __m128i part = k ? _mm_unpackhi_epi64(halves[h], halves[h]) : halves[h];
            __m256 f = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(part)), d);
            if (with_m) f = _mm256_add_ps(f, m);
            _mm256_storeu_ps(y + 16 * h + 8 * k, f);
        }
    }
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
EK_GEMM_ENTRY(gemm_q8_0_q8_0_avx2, EK_TYPE_Q8_0)
EK_GEMM_ENTRY(gemm_f16_f32_avx2, EK_TYPE_F16)
EK_GEMM_ENTRY(gemm_f32_f32_avx2, EK_TYPE_F32)
EK_GEMM_X8_ENTRY(gemm_x8_q4_0_q8_0_avx2, EK_TYPE_Q4_0)
EK_GEMM_X8_ENTRY(gemm_x8_q4_1_q8_1_avx2, EK_TYPE_Q4_1)
EK_GEMM_X8_ENTRY(gemm_x8_q8_0_q8_0_avx2, EK_TYPE_Q8_0)
