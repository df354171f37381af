/* The tiled gemm, and the x8 gemm, written once for the plain NEON and the
 * dotprod tables.
 * They differ only in how a block's 32 byte products are summed: armv8-a
 * widens to 16 bits (vmull/vmlal) then adds pairwise, dotprod sums four
 * products per 32-bit lane in one sdot. The includer defines
 * EK_NEON_DOTPROD as 0 or 1 before including this file.
 *
 * Work is cut into tiles of up to 4 weight rows by 4 activation rows: each
 * weight block is unpacked once per tile and used for every activation row
 * of it; leftover rows fill part of a tile. For the block types the rows'
 * sums are folded into the four lanes of one vector by pairwise adds, so
 * each activation row needs one accumulator and one int-to-float
 * conversion per block. The K-quants' tiles, with sub-block scales inside
 * each super-block, are in gemm_k_neon.h.
 */
#ifndef EDGE_KERNELS_ARM_GEMM_NEON_H
#define EDGE_KERNELS_ARM_GEMM_NEON_H

#include "neon.h"
#include "../gemm_tiling.h"
#include "../x8_tiling.h"

#ifndef EK_NEON_DOTPROD
#error "define EK_NEON_DOTPROD before including gemm_neon.h"
#endif


/* Block b of an activation row: its quants, scale and (for the Q8_1 of
 * Q4_1 and Q5_1) d * sum of quants; s is 0 for Q8_0. */
EK_INLINE quants32 act_block(const int wtype, const char *row, int b, float *dx, float *s) {
    if (has_min(wtype)) {
        const block_q8_1 *blk = (const block_q8_1 *)row + b;
        *dx = blk->d;
        *s = blk->s;
        return load_q8(blk->qs);
    }
    const block_q8_0 *blk = (const block_q8_0 *)row + b;
    *dx = f16_to_f32(blk->d);
    *s = 0.0f;
    return load_q8(blk->qs);
}

/* Sum of a block's 32 products in the four lanes of the result. The plain
 * version keeps two products per 16-bit lane, which holds for any int8
 * weight against activations in -127..127 (what the quantizers make). */
EK_INLINE int32x4_t dot_block(quants32 w, quants32 x) {
#if EK_NEON_DOTPROD
    return vdotq_s32(vdotq_s32(vdupq_n_s32(0), w.lo, x.lo), w.hi, x.hi);
#else
    int16x8_t p = vmull_s8(vget_low_s8(w.lo), vget_low_s8(x.lo));
    p = vmlal_s8(p, vget_high_s8(w.lo), vget_high_s8(x.lo));
    int16x8_t q = vmull_s8(vget_low_s8(w.hi), vget_low_s8(x.hi));
    q = vmlal_s8(q, vget_high_s8(w.hi), vget_high_s8(x.hi));
    return vpadalq_s16(vpaddlq_s16(p), q);
#endif
}

#if !EK_NEON_DOTPROD
/* Four products per 16-bit lane: only for weights within -16..16 (Q4, Q5
 * as q - 16, Q4_K and Q5_K; not Q8_0 or IQ4_NL's grid), so a lane holds at
 * most 4 * 16 * 127 = 8128, and four rows folded 32512. */
EK_INLINE int16x8_t dot_block_q4(quants32 w, quants32 x) {
    int16x8_t p = vmull_s8(vget_low_s8(w.lo), vget_low_s8(x.lo));
    p = vmlal_s8(p, vget_high_s8(w.lo), vget_high_s8(x.lo));
    p = vmlal_s8(p, vget_low_s8(w.hi), vget_low_s8(x.hi));
    return vmlal_s8(p, vget_high_s8(w.hi), vget_high_s8(x.hi));
}
#endif

/* The dot products of RW weight blocks with one activation block, row i
 * in lane i (lanes past RW are 0). */
EK_INLINE int32x4_t dot_rows(const int wtype, const int RW, const quants32 *w, quants32 x) {
#if !EK_NEON_DOTPROD
    if (wtype != EK_TYPE_Q8_0 && wtype != EK_TYPE_IQ4_NL) {
        int16x8_t p[TILE_ROWS];
#pragma GCC unroll 4
        for (int i = 0; i < TILE_ROWS; i++) p[i] = i < RW ? dot_block_q4(w[i], x) : vdupq_n_s16(0);
        return vpaddlq_s16(vpaddq_s16(vpaddq_s16(p[0], p[1]), vpaddq_s16(p[2], p[3])));
    }
#else
    (void)wtype;
#endif
    int32x4_t s[TILE_ROWS];
#pragma GCC unroll 4
    for (int i = 0; i < TILE_ROWS; i++) s[i] = i < RW ? dot_block(w[i], x) : vdupq_n_s32(0);
    return vpaddq_s32(vpaddq_s32(s[0], s[1]), vpaddq_s32(s[2], s[3]));
}

EK_INLINE void gemm_tile_q(const int wtype, const int RW, const int RX, int nb,
                           const char *w, size_t w_stride, const char *x, size_t x_stride,
                           float *y, size_t y_stride) {
    float32x4_t acc[TILE_COLS];
#pragma GCC unroll 4
    for (int j = 0; j < RX; j++) acc[j] = vdupq_n_f32(0.0f);
    const size_t ahead = prefetch_ahead(w_stride);

    for (int b = 0; b < nb; b++) {
        quants32 wq[TILE_ROWS];
        const ek_f16 *d[TILE_ROWS], *m[TILE_ROWS];
#pragma GCC unroll 4
        for (int i = 0; i < TILE_ROWS; i++) {
            /* absent rows: any scale; their quants are never used */
            const char *row = w + (i < RW ? i : 0) * w_stride;
            __builtin_prefetch(row + ahead + b * block_bytes(wtype));
            wq[i] = weight_quants(wtype, row, b, &d[i], &m[i]);
        }
        const float32x4_t dw = f16x4_gather(d[0], d[1], d[2], d[3]);
        const float32x4_t mw = has_min(wtype) ? block_offsets(wtype, dw, m[0], m[1], m[2], m[3])
                                              : vdupq_n_f32(0.0f);

#pragma GCC unroll 4
        for (int j = 0; j < RX; j++) {
            float dx, s;
            const quants32 xq = act_block(wtype, x + j * x_stride, b, &dx, &s);
            const int32x4_t sum = dot_rows(wtype, RW, wq, xq);
            acc[j] = vfmaq_f32(acc[j], vcvtq_f32_s32(sum), vmulq_n_f32(dw, dx));
            if (has_min(wtype)) acc[j] = vfmaq_n_f32(acc[j], mw, s);
        }
    }

#pragma GCC unroll 4
    for (int j = 0; j < RX; j++) {
        if (RW == TILE_ROWS) {
            vst1q_f32(y + j * y_stride, acc[j]);
        } else {
            float out[TILE_ROWS];
            vst1q_f32(out, acc[j]);
            for (int i = 0; i < RW; i++) y[j * y_stride + i] = out[i];
        }
    }
}

/* Float weights (f32 or f16) with f32 activations: four elements a step,
 * one accumulator per pair, then a scalar tail for n % 4. */
EK_INLINE float32x4_t load_w4(const int wtype, const char *row, int k) {
    if (wtype == EK_TYPE_F16)
        return vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16((const ek_f16 *)row + k)));
    return vld1q_f32((const float *)row + k);
}


EK_INLINE void gemm_tile_f(const int wtype, const int RW, const int RX, int n,
                           const char *w, size_t w_stride, const char *x, size_t x_stride,
                           float *y, size_t y_stride) {
    float32x4_t acc[TILE_ROWS][TILE_COLS];
#pragma GCC unroll 4
    for (int i = 0; i < RW; i++)
#pragma GCC unroll 4
        for (int j = 0; j < RX; j++) acc[i][j] = vdupq_n_f32(0.0f);

    int k = 0;
    for (; k + 4 <= n; k += 4) {
        float32x4_t wv[TILE_ROWS];
#pragma GCC unroll 4
        for (int i = 0; i < RW; i++) wv[i] = load_w4(wtype, w + i * w_stride, k);
#pragma GCC unroll 4
        for (int j = 0; j < RX; j++) {
            const float32x4_t xv = vld1q_f32((const float *)(x + j * x_stride) + k);
#pragma GCC unroll 4
            for (int i = 0; i < RW; i++) acc[i][j] = vfmaq_f32(acc[i][j], wv[i], xv);
        }
    }

#pragma GCC unroll 4
    for (int j = 0; j < RX; j++) {
        const float *xr = (const float *)(x + j * x_stride);
#pragma GCC unroll 4
        for (int i = 0; i < RW; i++) {
            y[j * y_stride + i] =
                add_tail_f(vaddvq_f32(acc[i][j]), wtype, w + i * w_stride, xr, k, n);
        }
    }
}

#include "gemm_k_neon.h"

EK_INLINE void gemm_tile(const int wtype, const int RW, const int RX, int n, const char *w,
                         size_t w_stride, const char *x, size_t x_stride, float *y,
                         size_t y_stride) {
    if (wtype == EK_TYPE_F32 || wtype == EK_TYPE_F16)
        gemm_tile_f(wtype, RW, RX, n, w, w_stride, x, x_stride, y, y_stride);
    else if (is_k_quant(wtype))
        gemm_tile_k(wtype, RW, RX, n / EK_QK_K, w, w_stride, x, x_stride, y, y_stride);
    else
        gemm_tile_q(wtype, RW, RX, n / EK_QK, w, w_stride, x, x_stride, y, y_stride);
}

/* ---- the x8 layout ----
 * A group's 8 rows against RX activation rows. Each 16-byte load holds the
 * same 4 columns of 4 rows, row i in 32-bit lane i, so each lane sums its
 * own row: dotprod's sdot by lane takes the 4 activations of those columns
 * from one lane of the activation vector; plain NEON widens the products
 * to 16 bits and adds pairs at the end of the block. */

/* One block of 8 rows against one activation block: the 8 int sums, rows
 * 0..3 in r[0] and 4..7 in r[1]. w[k] holds piece run k/2 (columns 4(k/2)
 * .. +3 of a half of the quants), rows 4(k%2).. +3: for Q4, w[0..7] are the
 * low nibbles then w[8..15] the high ones; for Q8, w[0..15] are the 8 runs. */
EK_INLINE void dot_x8(const int8x16_t w[16], quants32 x, int32x4_t r[2]) {
#if EK_NEON_DOTPROD
#pragma GCC unroll 2
    for (int h = 0; h < 2; h++) {
        int32x4_t a = vdupq_n_s32(0);
        a = vdotq_laneq_s32(a, w[0 + h], x.lo, 0);
        a = vdotq_laneq_s32(a, w[2 + h], x.lo, 1);
        a = vdotq_laneq_s32(a, w[4 + h], x.lo, 2);
        a = vdotq_laneq_s32(a, w[6 + h], x.lo, 3);
        a = vdotq_laneq_s32(a, w[8 + h], x.hi, 0);
        a = vdotq_laneq_s32(a, w[10 + h], x.hi, 1);
        a = vdotq_laneq_s32(a, w[12 + h], x.hi, 2);
        a = vdotq_laneq_s32(a, w[14 + h], x.hi, 3);
        r[h] = a;
    }
#else
    /* the 4 activations of run k in every 32-bit lane */
    int8x16_t xp[8];
    xp[0] = vreinterpretq_s8_s32(vdupq_laneq_s32(vreinterpretq_s32_s8(x.lo), 0));
    xp[1] = vreinterpretq_s8_s32(vdupq_laneq_s32(vreinterpretq_s32_s8(x.lo), 1));
    xp[2] = vreinterpretq_s8_s32(vdupq_laneq_s32(vreinterpretq_s32_s8(x.lo), 2));
    xp[3] = vreinterpretq_s8_s32(vdupq_laneq_s32(vreinterpretq_s32_s8(x.lo), 3));
    xp[4] = vreinterpretq_s8_s32(vdupq_laneq_s32(vreinterpretq_s32_s8(x.hi), 0));
    xp[5] = vreinterpretq_s8_s32(vdupq_laneq_s32(vreinterpretq_s32_s8(x.hi), 1));
    xp[6] = vreinterpretq_s8_s32(vdupq_laneq_s32(vreinterpretq_s32_s8(x.hi), 2));
    xp[7] = vreinterpretq_s8_s32(vdupq_laneq_s32(vreinterpretq_s32_s8(x.hi), 3));
#pragma GCC unroll 2
    for (int h = 0; h < 2; h++) {
        /* products of rows 4h, 4h+1 (lo) and 4h+2, 4h+3 (hi), four per row;
         * two runs per 32-bit sum keeps every 16-bit lane within range */
        int32x4_t lo = vdupq_n_s32(0), hi = vdupq_n_s32(0);
#pragma GCC unroll 4
        for (int k = 0; k < 8; k += 2) {
            int16x8_t pl = vmull_s8(vget_low_s8(w[2 * k + h]), vget_low_s8(xp[k]));
            pl = vmlal_s8(pl, vget_low_s8(w[2 * k + 2 + h]), vget_low_s8(xp[k + 1]));
            int16x8_t ph = vmull_high_s8(w[2 * k + h], xp[k]);
            ph = vmlal_high_s8(ph, w[2 * k + 2 + h], xp[k + 1]);
            lo = vpadalq_s16(lo, pl);
            hi = vpadalq_s16(hi, ph);
        }
        r[h] = vpaddq_s32(lo, hi);
    }
#endif
}

/* Block b's quants of a group as dot_x8 wants them. */
EK_INLINE void load_x8(const int wtype, const uint8_t *q, int8x16_t w[16]) {
    if (wtype == EK_TYPE_Q8_0) {
#pragma GCC unroll 16
        for (int k = 0; k < 16; k++) w[k] = vld1q_s8((const int8_t *)q + 16 * k);
        return;
    }
    const int8x16_t offset = vdupq_n_s8(wtype == EK_TYPE_Q4_0 ? 8 : 0);
#pragma GCC unroll 8
    for (int k = 0; k < 8; k++) {
        const uint8x16_t v = vld1q_u8(q + 16 * k);
        w[k] = vsubq_s8(vreinterpretq_s8_u8(vandq_u8(v, vdupq_n_u8(0x0f))), offset);
        w[8 + k] = vsubq_s8(vreinterpretq_s8_u8(vshrq_n_u8(v, 4)), offset);
    }
}

EK_INLINE void gemm_x8_tile(const int wtype, const int RX, int nb, const char *g, const char *x,
                            size_t x_stride, float *y, size_t y_stride) {
    float32x4_t acc[TILE_COLS][2];
#pragma GCC unroll 4
    for (int j = 0; j < RX; j++) acc[j][0] = acc[j][1] = vdupq_n_f32(0.0f);
    const size_t step = ek_x8_step_bytes(wtype); /* one block of 8 rows */

    for (int b = 0; b < nb; b++) {
        /* the group is read front to back, scales then quants, a block's
         * bytes per step: fetch that far ahead over the whole group */
        const char *ahead = g + PREFETCH_BYTES + b * step;
        for (size_t line = 0; line < step; line += 64) __builtin_prefetch(ahead + line);
        int8x16_t w[16];
        load_x8(wtype, ek_x8_quants(wtype, g, nb, b), w);
        const ek_f16 *dm = ek_x8_d(wtype, g, b);
        float32x4_t dw[2], mw[2] = {vdupq_n_f32(0.0f), vdupq_n_f32(0.0f)};
#pragma GCC unroll 2
        for (int h = 0; h < 2; h++) {
            dw[h] = vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(dm + 4 * h)));
            if (wtype == EK_TYPE_Q4_1)
                mw[h] = vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(dm + EK_X8_ROWS + 4 * h)));
        }
#pragma GCC unroll 4
        for (int j = 0; j < RX; j++) {
            float dx, s;
            const quants32 xq = act_block(wtype, x + j * x_stride, b, &dx, &s);
            int32x4_t sum[2];
            dot_x8(w, xq, sum);
#pragma GCC unroll 2
            for (int h = 0; h < 2; h++) {
                acc[j][h] = vfmaq_f32(acc[j][h], vcvtq_f32_s32(sum[h]), vmulq_n_f32(dw[h], dx));
                if (wtype == EK_TYPE_Q4_1) acc[j][h] = vfmaq_n_f32(acc[j][h], mw[h], s);
            }
        }
    }
#pragma GCC unroll 4
    for (int j = 0; j < RX; j++) {
        vst1q_f32(y + j * y_stride, acc[j][0]);
        vst1q_f32(y + j * y_stride + 4, acc[j][1]);
    }
}

#endif
