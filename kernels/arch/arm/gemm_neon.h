/* The tiled gemm, written once for the plain NEON and the dotprod tables.
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
 * conversion per block.
 */
#ifndef EDGE_KERNELS_ARM_GEMM_NEON_H
#define EDGE_KERNELS_ARM_GEMM_NEON_H

#include "neon.h"
#include "../gemm_tiling.h"

#ifndef EK_NEON_DOTPROD
#error "define EK_NEON_DOTPROD before including gemm_neon.h"
#endif


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
/* Four products per 16-bit lane: only for Q4 weights (|w| <= 15, so a lane
 * holds at most 4 * 15 * 127 = 7620, and four rows folded 30480). */
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
    if (wtype != EK_TYPE_Q8_0) {
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
    const size_t block_bytes = wtype == EK_TYPE_Q4_0   ? sizeof(block_q4_0)
                               : wtype == EK_TYPE_Q4_1 ? sizeof(block_q4_1)
                                                       : sizeof(block_q8_0);

    for (int b = 0; b < nb; b++) {
        quants32 wq[TILE_ROWS];
        const ek_f16 *d[TILE_ROWS], *m[TILE_ROWS];
#pragma GCC unroll 4
        for (int i = 0; i < TILE_ROWS; i++) {
            const char *row = w + (i < RW ? i : 0) * w_stride; /* absent rows: any scale */
            __builtin_prefetch(row + ahead + b * block_bytes);
            if (wtype == EK_TYPE_Q4_0) {
                const block_q4_0 *blk = (const block_q4_0 *)row + b;
                if (i < RW) wq[i] = unpack_q4(blk->qs, 8);
                d[i] = m[i] = &blk->d;
            } else if (wtype == EK_TYPE_Q4_1) {
                const block_q4_1 *blk = (const block_q4_1 *)row + b;
                if (i < RW) wq[i] = unpack_q4(blk->qs, 0);
                d[i] = &blk->d;
                m[i] = &blk->m;
            } else {
                const block_q8_0 *blk = (const block_q8_0 *)row + b;
                if (i < RW) wq[i] = load_q8(blk->qs);
                d[i] = m[i] = &blk->d;
            }
        }
        const float32x4_t dw = f16x4_gather(d[0], d[1], d[2], d[3]);
        const float32x4_t mw =
            wtype == EK_TYPE_Q4_1 ? f16x4_gather(m[0], m[1], m[2], m[3]) : vdupq_n_f32(0.0f);

#pragma GCC unroll 4
        for (int j = 0; j < RX; j++) {
            const char *col = x + j * x_stride;
            quants32 xq;
            float dx, s = 0.0f;
            if (wtype == EK_TYPE_Q4_1) {
                const block_q8_1 *blk = (const block_q8_1 *)col + b;
                xq = load_q8(blk->qs);
                dx = blk->d;
                s = blk->s;
            } else {
                const block_q8_0 *blk = (const block_q8_0 *)col + b;
                xq = load_q8(blk->qs);
                dx = f16_to_f32(blk->d);
            }
            const int32x4_t sum = dot_rows(wtype, RW, wq, xq);
            acc[j] = vfmaq_f32(acc[j], vcvtq_f32_s32(sum), vmulq_n_f32(dw, dx));
            if (wtype == EK_TYPE_Q4_1) acc[j] = vfmaq_n_f32(acc[j], mw, s);
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

EK_INLINE void gemm_tile(const int wtype, const int RW, const int RX, int n, const char *w,
                         size_t w_stride, const char *x, size_t x_stride, float *y,
                         size_t y_stride) {
    if (wtype == EK_TYPE_F32 || wtype == EK_TYPE_F16)
        gemm_tile_f(wtype, RW, RX, n, w, w_stride, x, x_stride, y, y_stride);
    else
        gemm_tile_q(wtype, RW, RX, n / EK_QK, w, w_stride, x, x_stride, y, y_stride);
}

#endif
