/* NEON kernels for the float ops of the forward pass, and the NEON table. */
#include <math.h>

#include "neon.h"

/* e^x within a few ulp over the normal range: x = k ln2 + r, |r| <= ln2/2,
 * e^r by its Taylor series to r^7 (truncation below 1e-8 relative), 2^k
 * built in the exponent bits. Below the smallest normal result it returns 0
 * (the reference gives a subnormal), above ~88.37 infinity. */
EK_INLINE float32x4_t exp_f32x4(float32x4_t x) {
    const float32x4_t lo = vdupq_n_f32(-87.33654f), hi = vdupq_n_f32(88.37f);
    const float32x4_t xc = vminq_f32(vmaxq_f32(x, lo), hi);
    const float32x4_t k = vrndnq_f32(vmulq_n_f32(xc, 1.44269504f));
    /* ln 2 in two parts; k * the first is exact, having 15 significant bits */
    float32x4_t r = vfmsq_f32(xc, k, vdupq_n_f32(0.693145751953125f));
    r = vfmsq_f32(r, k, vdupq_n_f32(1.42860682e-6f));
    float32x4_t p = vdupq_n_f32(1.0f / 5040);
    p = vfmaq_f32(vdupq_n_f32(1.0f / 720), p, r);
    p = vfmaq_f32(vdupq_n_f32(1.0f / 120), p, r);
    p = vfmaq_f32(vdupq_n_f32(1.0f / 24), p, r);
    p = vfmaq_f32(vdupq_n_f32(1.0f / 6), p, r);
    p = vfmaq_f32(vdupq_n_f32(0.5f), p, r);
    p = vfmaq_f32(vdupq_n_f32(1.0f), p, r);
    p = vfmaq_f32(vdupq_n_f32(1.0f), p, r);
    const int32x4_t bits = vshlq_n_s32(vaddq_s32(vcvtq_s32_f32(k), vdupq_n_s32(127)), 23);
    float32x4_t e = vmulq_f32(p, vreinterpretq_f32_s32(bits));
    e = vbslq_f32(vcltq_f32(x, lo), vdupq_n_f32(0.0f), e);
    return vbslq_f32(vcgtq_f32(x, hi), vdupq_n_f32(INFINITY), e);
}

/* As the reference: squares rounded to float, summed in double, so the
 * scale does not depend on the order of summation. */
void rmsnorm_neon(float *out, const float *x, const float *w, int n, float eps) {
    float64x2_t acc0 = vdupq_n_f64(0.0), acc1 = vdupq_n_f64(0.0);
    int i = 0;
    for (; i + 4 <= n; i += 4) {
        const float32x4_t v = vld1q_f32(x + i);
        const float32x4_t sq = vmulq_f32(v, v);
        acc0 = vaddq_f64(acc0, vcvt_f64_f32(vget_low_f32(sq)));
        acc1 = vaddq_f64(acc1, vcvt_high_f64_f32(sq));
    }
    double ss = vaddvq_f64(vaddq_f64(acc0, acc1));
    for (; i < n; i++) ss += (double)(x[i] * x[i]);

    const float scale = 1.0f / sqrtf((float)(ss / n) + eps);
    i = 0;
    for (; i + 4 <= n; i += 4)
        vst1q_f32(out + i, vmulq_f32(vmulq_n_f32(vld1q_f32(x + i), scale), vld1q_f32(w + i)));
    for (; i < n; i++) out[i] = x[i] * scale * w[i];
}

void rope_neon(float *x, int n_heads, int head_dim, const float *cs) {
    for (int h = 0; h < n_heads; h++) {
        float *xh = x + h * head_dim;
        int i = 0;
        for (; i + 8 <= head_dim; i += 8) {
            /* de-interleaved: val[0] holds the pairs' first halves (a, cos),
             * val[1] the second (b, sin) */
            float32x4x2_t v = vld2q_f32(xh + i);
            const float32x4x2_t c = vld2q_f32(cs + i);
            const float32x4_t a = v.val[0], b = v.val[1];
            v.val[0] = vfmsq_f32(vmulq_f32(a, c.val[0]), b, c.val[1]);
            v.val[1] = vfmaq_f32(vmulq_f32(b, c.val[0]), a, c.val[1]);
            vst2q_f32(xh + i, v);
        }
        for (; i < head_dim; i += 2) {
            const float c = cs[i], s = cs[i + 1];
            const float a = xh[i], b = xh[i + 1];
            xh[i] = a * c - b * s;
            xh[i + 1] = a * s + b * c;
        }
    }
}

/* Element i of a head pairs with element i + head_dim / 2, rotated by
 * angle i (cs[2i] = cos, cs[2i+1] = sin): four pairs a step. */
void rope_neox_neon(float *x, int n_heads, int head_dim, const float *cs) {
    const int half = head_dim / 2;
    for (int h = 0; h < n_heads; h++) {
        float *a = x + h * head_dim, *b = a + half;
        int i = 0;
        for (; i + 4 <= half; i += 4) {
            const float32x4x2_t c = vld2q_f32(cs + 2 * i); /* cos, sin */
            const float32x4_t va = vld1q_f32(a + i), vb = vld1q_f32(b + i);
            vst1q_f32(a + i, vfmsq_f32(vmulq_f32(va, c.val[0]), vb, c.val[1]));
            vst1q_f32(b + i, vfmaq_f32(vmulq_f32(vb, c.val[0]), va, c.val[1]));
        }
        for (; i < half; i++) {
            const float c = cs[2 * i], s = cs[2 * i + 1];
            const float va = a[i], vb = b[i];
            a[i] = va * c - vb * s;
            b[i] = va * s + vb * c;
        }
    }
}

void silu_mul_neon(float *out, const float *gate, const float *up, int n) {
    int i = 0;
    for (; i + 4 <= n; i += 4) {
        const float32x4_t g = vld1q_f32(gate + i);
        const float32x4_t e = exp_f32x4(vnegq_f32(g));
        const float32x4_t silu = vdivq_f32(g, vaddq_f32(vdupq_n_f32(1.0f), e));
        vst1q_f32(out + i, vmulq_f32(silu, vld1q_f32(up + i)));
    }
    for (; i < n; i++) out[i] = gate[i] / (1.0f + expf(-gate[i])) * up[i];
}

/* GELU's tanh form through one exp: 0.5 (1 + tanh u) = 1 / (1 + e^(-2u)),
 * so gelu(g) = g / (1 + e^(-2u)), u = sqrt(2 / pi) (g + 0.044715 g^3). At
 * large |g| the exp saturates to 0 or infinity, giving g or 0. */
void gelu_mul_neon(float *out, const float *gate, const float *up, int n) {
    const float k = -2.0f * 0.7978845608028654f, c = 0.044715f;
    int i = 0;
    for (; i + 4 <= n; i += 4) {
        const float32x4_t g = vld1q_f32(gate + i);
        const float32x4_t u = vmulq_f32(vmulq_n_f32(g, k),
                                        vfmaq_f32(vdupq_n_f32(1.0f), vmulq_n_f32(g, c), g));
        const float32x4_t gelu = vdivq_f32(g, vaddq_f32(vdupq_n_f32(1.0f), exp_f32x4(u)));
        vst1q_f32(out + i, vmulq_f32(gelu, vld1q_f32(up + i)));
    }
    for (; i < n; i++) {
        const float g = gate[i];
        out[i] = g / (1.0f + expf(k * g * (1.0f + c * g * g))) * up[i];
    }
}

void softmax_neon(float *x, int n) {
    float32x4_t mv = vdupq_n_f32(-INFINITY);
    int i = 0;
    for (; i + 4 <= n; i += 4) mv = vmaxq_f32(mv, vld1q_f32(x + i));
    float mx = vmaxvq_f32(mv);
    for (; i < n; i++) mx = fmaxf(mx, x[i]);

    const float32x4_t mxv = vdupq_n_f32(mx);
    float32x4_t sv = vdupq_n_f32(0.0f);
    i = 0;
    for (; i + 4 <= n; i += 4) {
        const float32x4_t e = exp_f32x4(vsubq_f32(vld1q_f32(x + i), mxv));
        vst1q_f32(x + i, e);
        sv = vaddq_f32(sv, e);
    }
    float sum = vaddvq_f32(sv);
    for (; i < n; i++) {
        x[i] = expf(x[i] - mx);
        sum += x[i];
    }

    const float inv = 1.0f / sum;
    i = 0;
    for (; i + 4 <= n; i += 4) vst1q_f32(x + i, vmulq_n_f32(vld1q_f32(x + i), inv));
    for (; i < n; i++) x[i] *= inv;
}

void add_neon(float *x, const float *y, int n) {
    int i = 0;
    for (; i + 4 <= n; i += 4) vst1q_f32(x + i, vaddq_f32(vld1q_f32(x + i), vld1q_f32(y + i)));
    for (; i < n; i++) x[i] += y[i];
}

/* ---- attention over the KV cache ---- */

/* Eight cached values from element i on, before the block scale of Q8_0. */
EK_INLINE float32x4x2_t kv_load8(const void *row, int i, const int kv_type) {
    float32x4x2_t r;
    if (kv_type == EK_TYPE_F16) {
        const uint16x8_t h = vld1q_u16((const ek_f16 *)row + i);
        r.val[0] = vcvt_f32_f16(vreinterpret_f16_u16(vget_low_u16(h)));
        r.val[1] = vcvt_f32_f16(vreinterpret_f16_u16(vget_high_u16(h)));
    } else {
        const block_q8_0 *blk = (const block_q8_0 *)row + i / EK_QK;
        const int16x8_t q = vmovl_s8(vld1_s8(blk->qs + i % EK_QK));
        r.val[0] = vcvtq_f32_s32(vmovl_s16(vget_low_s16(q)));
        r.val[1] = vcvtq_f32_s32(vmovl_s16(vget_high_s16(q)));
    }
    return r;
}

/* The scale of the block holding element i (1 for F16). */
EK_INLINE float kv_scale(const void *row, int i, const int kv_type) {
    if (kv_type == EK_TYPE_F16) return 1.0f;
    return f16_to_f32(((const block_q8_0 *)row)[i / EK_QK].d);
}

/* Q8_0 rows have head_dim a multiple of 32; the narrower steps and the
 * scalar tails below are reached by F16 rows only. */
EK_INLINE float dot_q_kv(const float *q, const void *row, const int kv_type, int head_dim) {
    float32x4_t acc[4];
    for (int k = 0; k < 4; k++) acc[k] = vdupq_n_f32(0.0f);
    int i = 0;
    for (; i + 32 <= head_dim; i += 32) {
        const float d = kv_scale(row, i, kv_type);
        for (int k = 0; k < 4; k++) {
            const float32x4x2_t kv = kv_load8(row, i + 8 * k, kv_type);
            acc[k] = vfmaq_f32(acc[k], vld1q_f32(q + i + 8 * k), vmulq_n_f32(kv.val[0], d));
            acc[k] = vfmaq_f32(acc[k], vld1q_f32(q + i + 8 * k + 4), vmulq_n_f32(kv.val[1], d));
        }
    }
    for (; i + 8 <= head_dim; i += 8) {
        const float32x4x2_t kv = kv_load8(row, i, kv_type);
        acc[0] = vfmaq_f32(acc[0], vld1q_f32(q + i), kv.val[0]);
        acc[1] = vfmaq_f32(acc[1], vld1q_f32(q + i + 4), kv.val[1]);
    }
    float s = vaddvq_f32(vaddq_f32(vaddq_f32(acc[0], acc[1]), vaddq_f32(acc[2], acc[3])));
    for (; i < head_dim; i++) s += q[i] * f16_to_f32(((const ek_f16 *)row)[i]);
    return s;
}

EK_INLINE void attend(float *out, const float *q, const char *k, const char *v, size_t stride,
                      const int kv_type, int n_pos, int head_dim, float scale, float *scores) {
    for (int t = 0; t < n_pos; t++)
        scores[t] = dot_q_kv(q, k + t * stride, kv_type, head_dim) * scale;
    softmax_neon(scores, n_pos);

    /* 32 outputs at a time stay in registers across all positions */
    int i = 0;
    for (; i + 32 <= head_dim; i += 32) {
        float32x4_t a[8];
        for (int c = 0; c < 8; c++) a[c] = vdupq_n_f32(0.0f);
        for (int t = 0; t < n_pos; t++) {
            const char *row = v + t * stride;
            const float p = scores[t] * kv_scale(row, i, kv_type);
            for (int c = 0; c < 4; c++) {
                const float32x4x2_t kv = kv_load8(row, i + 8 * c, kv_type);
                a[2 * c] = vfmaq_n_f32(a[2 * c], kv.val[0], p);
                a[2 * c + 1] = vfmaq_n_f32(a[2 * c + 1], kv.val[1], p);
            }
        }
        for (int c = 0; c < 8; c++) vst1q_f32(out + i + 4 * c, a[c]);
    }
    for (; i + 8 <= head_dim; i += 8) {
        float32x4_t a0 = vdupq_n_f32(0.0f), a1 = vdupq_n_f32(0.0f);
        for (int t = 0; t < n_pos; t++) {
            const float32x4x2_t kv = kv_load8(v + t * stride, i, kv_type);
            a0 = vfmaq_n_f32(a0, kv.val[0], scores[t]);
            a1 = vfmaq_n_f32(a1, kv.val[1], scores[t]);
        }
        vst1q_f32(out + i, a0);
        vst1q_f32(out + i + 4, a1);
    }
    for (; i < head_dim; i++) {
        float a = 0.0f;
        for (int t = 0; t < n_pos; t++)
            a += scores[t] * f16_to_f32(((const ek_f16 *)(v + t * stride))[i]);
        out[i] = a;
    }
}

/* Specialised per cache type so no type test is left inside the loops. */
void attention_neon(float *out, const float *q, const void *k, const void *v, size_t kv_stride,
                    int kv_type, int n_pos, int head_dim, float scale, float *scores) {
    if (kv_type == EK_TYPE_F16)
        attend(out, q, k, v, kv_stride, EK_TYPE_F16, n_pos, head_dim, scale, scores);
    else
        attend(out, q, k, v, kv_stride, EK_TYPE_Q8_0, n_pos, head_dim, scale, scores);
}

void kv_store_neon(void *dst, const float *src, int n, int kv_type) {
    if (kv_type != EK_TYPE_F16) {
        quantize_row_q8_0_neon(src, dst, n);
        return;
    }
    ek_f16 *d = dst;
    int i = 0;
    for (; i + 4 <= n; i += 4)
        vst1_u16(d + i, vreinterpret_u16_f16(vcvt_f16_f32(vld1q_f32(src + i))));
    for (; i < n; i++) d[i] = f32_to_f16(src[i]);
}

const ek_kernels ek_kernels_neon = {
    .name = "neon",
    .types = {EK_NEON_TYPE_OPS(neon)},
    EK_NEON_FLOAT_OPS,
};
