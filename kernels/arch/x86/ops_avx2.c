/* AVX2 kernels for the float ops of the forward pass, and the AVX2 table. */
#include <math.h>

#include "avx2.h"

/* e^x within a few ulp over the normal range: x = k ln2 + r, |r| <= ln2/2,
 * e^r by its Taylor series to r^7 (truncation below 1e-8 relative), 2^k
 * built in the exponent bits. Below the smallest normal result it returns 0
 * (the reference gives a subnormal), above ~88.37 infinity. */
EK_INLINE __m256 exp_ps(__m256 x) {
    const __m256 lo = _mm256_set1_ps(-87.33654f), hi = _mm256_set1_ps(88.37f);
    const __m256 xc = _mm256_min_ps(_mm256_max_ps(x, lo), hi);
    const __m256 k = _mm256_round_ps(_mm256_mul_ps(xc, _mm256_set1_ps(1.44269504f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    /* ln 2 in two parts; k * the first is exact, having 15 significant bits */
    __m256 r = _mm256_fnmadd_ps(k, _mm256_set1_ps(0.693145751953125f), xc);
    r = _mm256_fnmadd_ps(k, _mm256_set1_ps(1.42860682e-6f), r);
    __m256 p = _mm256_set1_ps(1.0f / 5040);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 720));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    const __m256i bits = _mm256_slli_epi32(
        _mm256_add_epi32(_mm256_cvtps_epi32(k), _mm256_set1_epi32(127)), 23);
    __m256 e = _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
    e = _mm256_andnot_ps(_mm256_cmp_ps(x, lo, _CMP_LT_OQ), e);
    return _mm256_blendv_ps(e, _mm256_set1_ps(INFINITY), _mm256_cmp_ps(x, hi, _CMP_GT_OQ));
}

/* As the reference: squares rounded to float, summed in double, so the
 * scale does not depend on the order of summation. */
void rmsnorm_avx2(float *out, const float *x, const float *w, int n, float eps) {
    __m256d acc0 = _mm256_setzero_pd(), acc1 = _mm256_setzero_pd();
    int i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m256 v = _mm256_loadu_ps(x + i);
        const __m256 sq = _mm256_mul_ps(v, v);
        acc0 = _mm256_add_pd(acc0, _mm256_cvtps_pd(_mm256_castps256_ps128(sq)));
        acc1 = _mm256_add_pd(acc1, _mm256_cvtps_pd(_mm256_extractf128_ps(sq, 1)));
    }
    const __m256d acc = _mm256_add_pd(acc0, acc1);
    __m128d s2 = _mm_add_pd(_mm256_castpd256_pd128(acc), _mm256_extractf128_pd(acc, 1));
    double ss = _mm_cvtsd_f64(_mm_add_sd(s2, _mm_unpackhi_pd(s2, s2)));
    for (; i < n; i++) ss += (double)(x[i] * x[i]);

    const float scale = 1.0f / sqrtf((float)(ss / n) + eps);
    const __m256 sv = _mm256_set1_ps(scale);
    i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(x + i), sv),
                                                _mm256_loadu_ps(w + i)));
    for (; i < n; i++) out[i] = x[i] * scale * w[i];
}

void rope_avx2(float *x, int n_heads, int head_dim, const float *cs) {
    for (int h = 0; h < n_heads; h++) {
        float *xh = x + h * head_dim;
        int i = 0;
        for (; i + 8 <= head_dim; i += 8) {
            /* pairs (a, b) and (cos, sin) sit in adjacent lanes: even lanes
             * get a cos - b sin, odd lanes b cos + a sin */
            const __m256 v = _mm256_loadu_ps(xh + i), c = _mm256_loadu_ps(cs + i);
            const __m256 swapped = _mm256_permute_ps(v, 0xb1);
            const __m256 rot = _mm256_mul_ps(swapped, _mm256_movehdup_ps(c));
            _mm256_storeu_ps(xh + i, _mm256_fmaddsub_ps(v, _mm256_moveldup_ps(c), rot));
        }
        for (; i < head_dim; i += 2) {
            const float c = cs[i], s = cs[i + 1];
            const float a = xh[i], b = xh[i + 1];
            xh[i] = a * c - b * s;
            xh[i + 1] = a * s + b * c;
        }
    }
}

/* Eight pairs (x[i], x[i + half]) at a time: their eight angles' (cos, sin)
 * are interleaved in cs, and come apart with a shuffle that leaves them in
 * the order [0 1 4 5 | 2 3 6 7] and a permute that restores it. */
void rope_neox_avx2(float *x, int n_heads, int head_dim, const float *cs) {
    const int half = head_dim / 2;
    for (int h = 0; h < n_heads; h++) {
        float *xh = x + h * head_dim;
        int i = 0;
        for (; i + 8 <= half; i += 8) {
            const __m256 p0 = _mm256_loadu_ps(cs + 2 * i), p1 = _mm256_loadu_ps(cs + 2 * i + 8);
            const __m256 c = _mm256_castpd_ps(_mm256_permute4x64_pd(
                _mm256_castps_pd(_mm256_shuffle_ps(p0, p1, _MM_SHUFFLE(2, 0, 2, 0))), 0xd8));
            const __m256 s = _mm256_castpd_ps(_mm256_permute4x64_pd(
                _mm256_castps_pd(_mm256_shuffle_ps(p0, p1, _MM_SHUFFLE(3, 1, 3, 1))), 0xd8));
            const __m256 a = _mm256_loadu_ps(xh + i), b = _mm256_loadu_ps(xh + i + half);
            _mm256_storeu_ps(xh + i, _mm256_fmsub_ps(a, c, _mm256_mul_ps(b, s)));
            _mm256_storeu_ps(xh + i + half, _mm256_fmadd_ps(a, s, _mm256_mul_ps(b, c)));
        }
        for (; i < half; i++) {
            const float c = cs[2 * i], s = cs[2 * i + 1];
            const float a = xh[i], b = xh[i + half];
            xh[i] = a * c - b * s;
            xh[i + half] = a * s + b * c;
        }
    }
}

void silu_mul_avx2(float *out, const float *gate, const float *up, int n) {
    const __m256 one = _mm256_set1_ps(1.0f);
    int i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m256 g = _mm256_loadu_ps(gate + i);
        const __m256 e = exp_ps(_mm256_sub_ps(_mm256_setzero_ps(), g));
        const __m256 silu = _mm256_div_ps(g, _mm256_add_ps(one, e));
        _mm256_storeu_ps(out + i, _mm256_mul_ps(silu, _mm256_loadu_ps(up + i)));
    }
    for (; i < n; i++) out[i] = gate[i] / (1.0f + expf(-gate[i])) * up[i];
}

/* GELU's tanh form through the identity 0.5 (1 + tanh(u)) = 1 / (1 + e^-2u):
 * gelu(g) = g / (1 + e^(-2u)), u = sqrt(2 / pi) g (1 + 0.044715 g^2). Where
 * tanh(u) is near -1 this is the more accurate of the two (the reference
 * loses bits to 1 + tanh there), by far less than the tests' tolerance. */
void gelu_mul_avx2(float *out, const float *gate, const float *up, int n) {
    const float k1 = -2.0f * 0.7978845608028654f, k3 = k1 * 0.044715f; /* -2u = g (k1 + k3 g^2) */
    const __m256 one = _mm256_set1_ps(1.0f);
    int i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m256 g = _mm256_loadu_ps(gate + i);
        const __m256 t = _mm256_fmadd_ps(_mm256_mul_ps(g, g), _mm256_set1_ps(k3), _mm256_set1_ps(k1));
        const __m256 e = exp_ps(_mm256_mul_ps(g, t));
        const __m256 gelu = _mm256_div_ps(g, _mm256_add_ps(one, e));
        _mm256_storeu_ps(out + i, _mm256_mul_ps(gelu, _mm256_loadu_ps(up + i)));
    }
    gelu_mul_ref(out + i, gate + i, up + i, n - i);
}

void softmax_avx2(float *x, int n) {
    __m256 mv = _mm256_set1_ps(-INFINITY);
    int i = 0;
    for (; i + 8 <= n; i += 8) mv = _mm256_max_ps(mv, _mm256_loadu_ps(x + i));
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(mv), _mm256_extractf128_ps(mv, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
    float mx = _mm_cvtss_f32(m4);
    for (; i < n; i++) mx = fmaxf(mx, x[i]);

    const __m256 mxv = _mm256_set1_ps(mx);
    __m256 sv = _mm256_setzero_ps();
    i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m256 e = exp_ps(_mm256_sub_ps(_mm256_loadu_ps(x + i), mxv));
        _mm256_storeu_ps(x + i, e);
        sv = _mm256_add_ps(sv, e);
    }
    float sum = hsum_ps(sv);
    for (; i < n; i++) {
        x[i] = expf(x[i] - mx);
        sum += x[i];
    }

    const float inv = 1.0f / sum;
    const __m256 iv = _mm256_set1_ps(inv);
    i = 0;
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(x + i, _mm256_mul_ps(_mm256_loadu_ps(x + i), iv));
    for (; i < n; i++) x[i] *= inv;
}

void add_avx2(float *x, const float *y, int n) {
    int i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(x + i, _mm256_add_ps(_mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
    for (; i < n; i++) x[i] += y[i];
}

/* ---- attention over the KV cache ---- */

/* Eight cached values from element i on, before the block scale of Q8_0. */
EK_INLINE __m256 kv_load8(const void *row, int i, const int kv_type) {
    if (kv_type == EK_TYPE_F16)
        return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const ek_f16 *)row + i)));
    const block_q8_0 *blk = (const block_q8_0 *)row + i / EK_QK;
    const __m128i q = _mm_loadl_epi64((const __m128i *)(blk->qs + i % EK_QK));
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q));
}

/* The scale of the block holding element i (1 for F16). */
EK_INLINE __m256 kv_scale(const void *row, int i, const int kv_type) {
    if (kv_type == EK_TYPE_F16) return _mm256_set1_ps(1.0f);
    return _mm256_set1_ps(f16_to_f32(((const block_q8_0 *)row)[i / EK_QK].d));
}

/* Q8_0 rows have head_dim a multiple of 32; the narrower steps and the
 * scalar tails below are reached by F16 rows only. */
EK_INLINE float dot_q_kv(const float *q, const void *row, const int kv_type, int head_dim) {
    __m256 acc[4];
    for (int k = 0; k < 4; k++) acc[k] = _mm256_setzero_ps();
    int i = 0;
    for (; i + 32 <= head_dim; i += 32) {
        const __m256 d = kv_scale(row, i, kv_type);
        for (int k = 0; k < 4; k++)
            acc[k] = _mm256_fmadd_ps(_mm256_loadu_ps(q + i + 8 * k),
                                     _mm256_mul_ps(kv_load8(row, i + 8 * k, kv_type), d), acc[k]);
    }
    for (; i + 8 <= head_dim; i += 8)
        acc[0] = _mm256_fmadd_ps(_mm256_loadu_ps(q + i), kv_load8(row, i, kv_type), acc[0]);
    float s = hsum_ps(_mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3])));
    for (; i < head_dim; i++) s += q[i] * f16_to_f32(((const ek_f16 *)row)[i]);
    return s;
}

EK_INLINE void attend(float *out, const float *q, const char *k, const char *v, size_t stride,
                      const int kv_type, int n_pos, int head_dim, float scale, float *scores) {
    for (int t = 0; t < n_pos; t++)
        scores[t] = dot_q_kv(q, k + t * stride, kv_type, head_dim) * scale;
    softmax_avx2(scores, n_pos);

    /* 32 outputs at a time stay in registers across all positions; two
     * positions a step give eight independent accumulation chains */
    int i = 0;
    for (; i + 32 <= head_dim; i += 32) {
        __m256 a[4], b[4];
        for (int c = 0; c < 4; c++) a[c] = b[c] = _mm256_setzero_ps();
        int t = 0;
        for (; t + 2 <= n_pos; t += 2) {
            const char *r0 = v + t * stride, *r1 = r0 + stride;
            const __m256 p0 = _mm256_mul_ps(_mm256_set1_ps(scores[t]), kv_scale(r0, i, kv_type));
            const __m256 p1 =
                _mm256_mul_ps(_mm256_set1_ps(scores[t + 1]), kv_scale(r1, i, kv_type));
            for (int c = 0; c < 4; c++) {
                a[c] = _mm256_fmadd_ps(p0, kv_load8(r0, i + 8 * c, kv_type), a[c]);
                b[c] = _mm256_fmadd_ps(p1, kv_load8(r1, i + 8 * c, kv_type), b[c]);
            }
        }
        if (t < n_pos) {
            const char *r0 = v + t * stride;
            const __m256 p0 = _mm256_mul_ps(_mm256_set1_ps(scores[t]), kv_scale(r0, i, kv_type));
            for (int c = 0; c < 4; c++)
                a[c] = _mm256_fmadd_ps(p0, kv_load8(r0, i + 8 * c, kv_type), a[c]);
        }
        for (int c = 0; c < 4; c++) _mm256_storeu_ps(out + i + 8 * c, _mm256_add_ps(a[c], b[c]));
    }
    for (; i + 8 <= head_dim; i += 8) {
        __m256 a = _mm256_setzero_ps();
        for (int t = 0; t < n_pos; t++)
            a = _mm256_fmadd_ps(_mm256_set1_ps(scores[t]), kv_load8(v + t * stride, i, kv_type), a);
        _mm256_storeu_ps(out + i, a);
    }
    for (; i < head_dim; i++) {
        float a = 0.0f;
        for (int t = 0; t < n_pos; t++)
            a += scores[t] * f16_to_f32(((const ek_f16 *)(v + t * stride))[i]);
        out[i] = a;
    }
}

/* Specialised per cache type so no type test is left inside the loops. */
void attention_avx2(float *out, const float *q, const void *k, const void *v, size_t kv_stride,
                    int kv_type, int n_pos, int head_dim, float scale, float *scores) {
    if (kv_type == EK_TYPE_F16)
        attend(out, q, k, v, kv_stride, EK_TYPE_F16, n_pos, head_dim, scale, scores);
    else
        attend(out, q, k, v, kv_stride, EK_TYPE_Q8_0, n_pos, head_dim, scale, scores);
}

void kv_store_avx2(void *dst, const float *src, int n, int kv_type) {
    if (kv_type != EK_TYPE_F16) {
        quantize_row_q8_0_avx2(src, dst, n);
        return;
    }
    ek_f16 *d = dst;
    int i = 0;
    for (; i + 8 <= n; i += 8)
        _mm_storeu_si128((__m128i *)(d + i),
                         _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT));
    for (; i < n; i++) d[i] = f32_to_f16(src[i]);
}

const ek_kernels ek_kernels_avx2 = {
    .name = "avx2",
    .types = {EK_AVX2_TYPE_OPS(avx2)},
    EK_AVX2_FLOAT_OPS,
};
