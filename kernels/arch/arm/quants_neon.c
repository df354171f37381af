/* NEON kernels for the block formats (plain armv8-a): activation
 * quantizers, dequantizers and the gemm entries of the NEON table. */
#include <math.h>

#define EK_NEON_DOTPROD 0
#include "gemm_neon.h"

/* ---- activation quantizers ----
 * Bit-identical to the reference: the same scale arithmetic, and FCVTAS
 * rounds half away from zero exactly as roundf. */

/* Quantizes one block to qs; returns the f32 scale and the sum of the quants. */
EK_INLINE float quantize_block(const float *x, int8_t *qs, int *sum) {
    float32x4_t v[8];
    float32x4_t amax = vdupq_n_f32(0.0f);
    for (int k = 0; k < 8; k++) {
        v[k] = vld1q_f32(x + 4 * k);
        amax = vmaxq_f32(amax, vabsq_f32(v[k]));
    }
    const float d = vmaxvq_f32(amax) / 127.0f;
    const float id = d ? 1.0f / d : 0.0f;

    int32x4_t total = vdupq_n_s32(0);
    for (int k = 0; k < 8; k += 2) {
        const int32x4_t a = vcvtaq_s32_f32(vmulq_n_f32(v[k], id));
        const int32x4_t b = vcvtaq_s32_f32(vmulq_n_f32(v[k + 1], id));
        total = vaddq_s32(total, vaddq_s32(a, b));
        const int16x8_t h = vcombine_s16(vmovn_s32(a), vmovn_s32(b)); /* |q| <= 127 */
        vst1_s8(qs + 4 * k, vmovn_s16(h));
    }
    *sum = vaddvq_s32(total);
    return d;
}

#include "../row_quantizers.h"
EK_ROW_QUANTIZERS(neon)

/* Q8_K as the reference makes it: the scale from the element of largest
 * magnitude, sign included (the first of them at a tie between signs),
 * iscale = -127 / max, quants rounded half to even (FCVTNS, as rintf),
 * d = 1 / iscale. */
void quantize_row_q8_K_neon(const float *x, void *vy, int n) {
    block_q8_K *y = vy;
    for (int b = 0; b < n / EK_QK_K; b++, x += EK_QK_K) {
        float32x4_t hi = vld1q_f32(x), lo = hi;
        for (int k = 4; k < EK_QK_K; k += 4) {
            const float32x4_t v = vld1q_f32(x + k);
            hi = vmaxq_f32(hi, v);
            lo = vminq_f32(lo, v);
        }
        const float top = vmaxvq_f32(hi), bottom = vminvq_f32(lo);
        float max = top > -bottom ? top : bottom;
        if (top == -bottom)
            for (int j = 0; j < EK_QK_K; j++)
                if (fabsf(x[j]) == top) {
                    max = x[j];
                    break;
                }
        if (max == 0.0f) {
            memset(&y[b], 0, sizeof y[b]);
            continue;
        }
        const float iscale = -127.0f / max;
        for (int g = 0; g < EK_QK_K / 16; g++) {
            int32x4_t q[4];
            for (int k = 0; k < 4; k++)
                q[k] = vcvtnq_s32_f32(vmulq_n_f32(vld1q_f32(x + 16 * g + 4 * k), iscale));
            const int16x8_t h0 = vcombine_s16(vmovn_s32(q[0]), vmovn_s32(q[1]));
            const int16x8_t h1 = vcombine_s16(vmovn_s32(q[2]), vmovn_s32(q[3]));
            const int8x16_t q8 = vcombine_s8(vmovn_s16(h0), vmovn_s16(h1)); /* |q| <= 127 */
            vst1q_s8(y[b].qs + 16 * g, q8);
            y[b].bsums[g] = vaddlvq_s8(q8);
        }
        y[b].d = 1.0f / iscale;
    }
}

/* ---- dequantizers ----
 * Same operations as the reference (a multiply, then an add for q4_1; no
 * fused multiply-add), so the results are identical. */

EK_INLINE void store_scaled(float *y, int8x16_t q, float d, float m, int with_m) {
    const int16x8_t halves[2] = {vmovl_s8(vget_low_s8(q)), vmovl_s8(vget_high_s8(q))};
    for (int h = 0; h < 2; h++) {
        const int32x4_t parts[2] = {vmovl_s16(vget_low_s16(halves[h])),
                                    vmovl_s16(vget_high_s16(halves[h]))};
        for (int k = 0; k < 2; k++) {
            float32x4_t f = vmulq_n_f32(vcvtq_f32_s32(parts[k]), d);
            if (with_m) f = vaddq_f32(f, vdupq_n_f32(m));
            vst1q_f32(y + 8 * h + 4 * k, f);
        }
    }
}

void dequantize_row_q4_0_neon(const void *vx, float *y, int n) {
    const block_q4_0 *x = vx;
    for (int b = 0; b < n / EK_QK; b++) {
        const quants32 q = unpack_q4(x[b].qs, 8);
        const float d = f16_to_f32(x[b].d);
        store_scaled(y + b * EK_QK, q.lo, d, 0.0f, 0);
        store_scaled(y + b * EK_QK + 16, q.hi, d, 0.0f, 0);
    }
}

void dequantize_row_q4_1_neon(const void *vx, float *y, int n) {
    const block_q4_1 *x = vx;
    for (int b = 0; b < n / EK_QK; b++) {
        const quants32 q = unpack_q4(x[b].qs, 0);
        const float d = f16_to_f32(x[b].d), m = f16_to_f32(x[b].m);
        store_scaled(y + b * EK_QK, q.lo, d, m, 1);
        store_scaled(y + b * EK_QK + 16, q.hi, d, m, 1);
    }
}

void dequantize_row_q5_0_neon(const void *vx, float *y, int n) {
    const block_q5_0 *x = vx;
    for (int b = 0; b < n / EK_QK; b++) {
        const quants32 q = unpack_q5(x[b].qs, x[b].qh); /* q - 16 */
        const float d = f16_to_f32(x[b].d);
        store_scaled(y + b * EK_QK, q.lo, d, 0.0f, 0);
        store_scaled(y + b * EK_QK + 16, q.hi, d, 0.0f, 0);
    }
}

void dequantize_row_q5_1_neon(const void *vx, float *y, int n) {
    const block_q5_1 *x = vx;
    const int8x16_t sixteen = vdupq_n_s8(16);
    for (int b = 0; b < n / EK_QK; b++) {
        const quants32 q = unpack_q5(x[b].qs, x[b].qh); /* q - 16 */
        const float d = f16_to_f32(x[b].d), m = f16_to_f32(x[b].m);
        store_scaled(y + b * EK_QK, vaddq_s8(q.lo, sixteen), d, m, 1);
        store_scaled(y + b * EK_QK + 16, vaddq_s8(q.hi, sixteen), d, m, 1);
    }
}

void dequantize_row_iq4_nl_neon(const void *vx, float *y, int n) {
    const block_iq4_nl *x = vx;
    for (int b = 0; b < n / EK_QK; b++) {
        const quants32 q = unpack_iq4_nl(x[b].qs);
        const float d = f16_to_f32(x[b].d);
        store_scaled(y + b * EK_QK, q.lo, d, 0.0f, 0);
        store_scaled(y + b * EK_QK + 16, q.hi, d, 0.0f, 0);
    }
}

/* Q4_K and Q5_K: sub-block j's 6-bit scale and min (as the reference's
 * unpack_k_scales). */
static void k_scale_min(const uint8_t *s, int j, int *sc, int *mn) {
    if (j < 4) {
        *sc = s[j] & 0x3f;
        *mn = s[j + 4] & 0x3f;
    } else {
        *sc = (s[j + 4] & 0x0f) | (s[j - 4] >> 6) << 4;
        *mn = (s[j + 4] >> 4) | (s[j] >> 6) << 4;
    }
}

/* Q4_K and Q5_K: x = (d * sc) * q - dmin * mn per sub-block of 32, the
 * reference's order; the gemm's step unpacking gives q (Q5_K's as q - 16). */
EK_INLINE void dequantize_k_minned(const int wtype, const void *vx, float *y, int n) {
    const size_t bytes = block_bytes(wtype);
    const int8x16_t offset = vdupq_n_s8(wtype == EK_TYPE_Q5_K ? 16 : 0);
    for (int b = 0; b < n / EK_QK_K; b++, y += EK_QK_K) {
        const char *blk = (const char *)vx + b * bytes;
        const block_q4_K *head = (const block_q4_K *)blk; /* Q5_K begins the same */
        const float d = f16_to_f32(head->d), dmin = f16_to_f32(head->dmin);
        for (int g = 0; g < K_GROUPS; g++)
            for (int t = 0; t < 2; t++) {
                const int sub = 2 * g + t;
                int sc, mn;
                k_scale_min(head->scales, sub, &sc, &mn);
                int8x16_t q[2];
                k_step_weights(wtype, blk, g, t, q);
                for (int k = 0; k < 2; k++)
                    store_scaled(y + 32 * sub + 16 * k, vaddq_s8(q[k], offset), d * sc,
                                 -(dmin * mn), 1);
            }
    }
}

void dequantize_row_q4_K_neon(const void *vx, float *y, int n) {
    dequantize_k_minned(EK_TYPE_Q4_K, vx, y, n);
}

void dequantize_row_q5_K_neon(const void *vx, float *y, int n) {
    dequantize_k_minned(EK_TYPE_Q5_K, vx, y, n);
}

/* Q6_K: x = (d * scales[s]) * (q - 32); the steps give 4 (q - 32). */
void dequantize_row_q6_K_neon(const void *vx, float *y, int n) {
    const block_q6_K *x = vx;
    for (int b = 0; b < n / EK_QK_K; b++, y += EK_QK_K) {
        const float d = f16_to_f32(x[b].d);
        for (int g = 0; g < K_GROUPS; g++)
            for (int t = 0; t < 4; t++) {
                const int s = 8 * (g / 2) + g % 2 + 2 * t; /* the step's sub-block */
                int8x16_t q[2];
                k_step_weights(EK_TYPE_Q6_K, (const char *)&x[b], g, t, q);
                store_scaled(y + 16 * s, vshrq_n_s8(q[0], 2), d * x[b].scales[s], 0.0f, 0);
            }
    }
}

void dequantize_row_q8_0_neon(const void *vx, float *y, int n) {
    const block_q8_0 *x = vx;
    for (int b = 0; b < n / EK_QK; b++) {
        const quants32 q = load_q8(x[b].qs);
        const float d = f16_to_f32(x[b].d);
        store_scaled(y + b * EK_QK, q.lo, d, 0.0f, 0);
        store_scaled(y + b * EK_QK + 16, q.hi, d, 0.0f, 0);
    }
}

void dequantize_row_f16_neon(const void *vx, float *y, int n) {
    const ek_f16 *x = vx;
    int i = 0;
    for (; i + 4 <= n; i += 4)
        vst1q_f32(y + i, vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(x + i))));
    for (; i < n; i++) y[i] = f16_to_f32(x[i]);
}

/* ---- gemm entries ---- */

EK_GEMM_ENTRY(gemm_q4_0_q8_0_neon, EK_TYPE_Q4_0)
EK_GEMM_ENTRY(gemm_q4_1_q8_1_neon, EK_TYPE_Q4_1)
EK_GEMM_ENTRY(gemm_q8_0_q8_0_neon, EK_TYPE_Q8_0)
EK_GEMM_ENTRY(gemm_q5_0_q8_0_neon, EK_TYPE_Q5_0)
EK_GEMM_ENTRY(gemm_q5_1_q8_1_neon, EK_TYPE_Q5_1)
EK_GEMM_ENTRY(gemm_iq4_nl_q8_0_neon, EK_TYPE_IQ4_NL)
EK_GEMM_ENTRY(gemm_q4_K_q8_K_neon, EK_TYPE_Q4_K)
EK_GEMM_ENTRY(gemm_q5_K_q8_K_neon, EK_TYPE_Q5_K)
EK_GEMM_ENTRY(gemm_q6_K_q8_K_neon, EK_TYPE_Q6_K)
EK_GEMM_ENTRY(gemm_f16_f32_neon, EK_TYPE_F16)
EK_GEMM_ENTRY(gemm_f32_f32_neon, EK_TYPE_F32)
EK_GEMM_X8_ENTRY(gemm_x8_q4_0_q8_0_neon, EK_TYPE_Q4_0)
EK_GEMM_X8_ENTRY(gemm_x8_q4_1_q8_1_neon, EK_TYPE_Q4_1)
EK_GEMM_X8_ENTRY(gemm_x8_q8_0_q8_0_neon, EK_TYPE_Q8_0)
