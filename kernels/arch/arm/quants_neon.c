/* NEON kernels for the block formats (plain armv8-a): activation
 * quantizers, dequantizers and the gemm entries of the NEON table. */
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
EK_GEMM_ENTRY(gemm_f16_f32_neon, EK_TYPE_F16)
EK_GEMM_ENTRY(gemm_f32_f32_neon, EK_TYPE_F32)
EK_GEMM_X8_ENTRY(gemm_x8_q4_0_q8_0_neon, EK_TYPE_Q4_0)
EK_GEMM_X8_ENTRY(gemm_x8_q4_1_q8_1_neon, EK_TYPE_Q4_1)
EK_GEMM_X8_ENTRY(gemm_x8_q8_0_q8_0_neon, EK_TYPE_Q8_0)
