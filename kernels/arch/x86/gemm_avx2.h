/* The tiled gemm, written once for the AVX2 and the AVX-VNNI tables, and
 * the x8 gemm of those and of the AVX-512 VNNI table.
 *
 * They differ only in how 32 unsigned x signed byte products become eight
 * int32 sums: AVX2 needs maddubs (to int16) then madd (to int32), VNNI
 * does it in one dpbusd that also adds a starting value. The includer
 * defines EK_X86_VNNI before including this file: 0 for AVX2, 1 for
 * AVX-VNNI, 2 for AVX-512 VNNI's 256-bit form (the same dpbusd).
 *
 * Work is cut into tiles of up to 4 weight rows by 4 activation rows: each
 * weight block is unpacked once per tile and used for every activation row
 * of it, each activation block once for every weight row. Leftover weight
 * rows make one narrower tile, leftover activation rows another.
 */
#ifndef EDGE_KERNELS_X86_GEMM_AVX2_H
#define EDGE_KERNELS_X86_GEMM_AVX2_H

#include <string.h>

#include "avx2.h"
#include "../gemm_tiling.h"
#include "../x8_tiling.h"

#ifndef EK_X86_VNNI
#error "define EK_X86_VNNI before including gemm_avx2.h"
#endif


/* Eight int32 sums, each over four adjacent products u[k] * s[k], plus c. */
EK_INLINE __m256i dot_u8s8(__m256i c, __m256i u, __m256i s) {
#if EK_X86_VNNI == 2
    return _mm256_dpbusd_epi32(c, u, s);
#elif EK_X86_VNNI
    return _mm256_dpbusd_avx_epi32(c, u, s);
#else
    __m256i pairs = _mm256_maddubs_epi16(u, s); /* |u * s| <= 255 * 127: no saturation */
    return _mm256_add_epi32(c, _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
#endif
}

/* The same over two blocks of nibbles (u <= 15): AVX2 adds them while
 * still 16-bit (each pair sum is at most 2 * 15 * 127), saving a madd. */
EK_INLINE __m256i dot2_u4s8(__m256i c, __m256i u1, __m256i s1, __m256i u2, __m256i s2) {
#if EK_X86_VNNI
    return dot_u8s8(dot_u8s8(c, u1, s1), u2, s2);
#else
    const __m256i pairs =
        _mm256_add_epi16(_mm256_maddubs_epi16(u1, s1), _mm256_maddubs_epi16(u2, s2));
    return _mm256_add_epi32(c, _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
#endif
}

/* c plus k times the sums of s's bytes in groups of four. */
EK_INLINE __m256i sum4_times(int8_t k, __m256i c, __m256i s) {
    return dot_u8s8(c, _mm256_set1_epi8(k), s);
}

/* Block b of an activation row: its quants, and its scale and (for Q4_1's
 * Q8_1) d * sum of quants in every lane; s is 0 for Q8_0. */
EK_INLINE const int8_t *act_block(const int wtype, const char *row, int b, __m256 *dx, __m256 *s) {
    if (wtype == EK_TYPE_Q4_1) {
        const block_q8_1 *blk = (const block_q8_1 *)row + b;
        *dx = _mm256_set1_ps(blk->d);
        *s = _mm256_set1_ps(blk->s);
        return blk->qs;
    }
    const block_q8_0 *blk = (const block_q8_0 *)row + b;
    *dx = _mm256_set1_ps(f16_to_f32(blk->d));
    *s = _mm256_setzero_ps();
    return blk->qs;
}

/* The packed nibbles of two blocks, one per 128-bit lane. */
EK_INLINE __m256i load_pair(const uint8_t *a, const uint8_t *b) {
    return _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_loadu_si128((const __m128i *)a)),
                                   _mm_loadu_si128((const __m128i *)b), 1);
}

/* Q4 weights, two rows per register. The low nibbles of weight rows a and
 * b fill one register ([a 0..15 | b 0..15]), the high nibbles another, and
 * each half of the activation block is broadcast to both 128-bit lanes:
 * the two rows' sums land in the two lanes, so one conversion, scale and
 * accumulate serve both, and one load, shift and two ands unpack both.
 * RW is 1 to 4; an odd last row is paired with itself and not stored. */
EK_INLINE void gemm_tile_q4(const int wtype, const int RW, const int RX, int nb,
                            const char *w, size_t w_stride, const char *x, size_t x_stride,
                            float *y, size_t y_stride) {
    const int RP = (RW + 1) / 2;
    const size_t ahead = prefetch_ahead(w_stride);
    const __m256i nibble = _mm256_set1_epi8(0x0f);
    const char *rows[TILE_ROWS];
#pragma GCC unroll 4
    for (int i = 0; i < TILE_ROWS; i++) rows[i] = w + (i < RW ? i : RW - 1) * w_stride;

    __m256 acc[TILE_ROWS / 2][TILE_COLS];
#pragma GCC unroll 2
    for (int p = 0; p < RP; p++)
#pragma GCC unroll 4
        for (int j = 0; j < RX; j++) acc[p][j] = _mm256_setzero_ps();

    for (int b = 0; b < nb; b++) {
        __m256i lo[TILE_ROWS / 2], hi[TILE_ROWS / 2];
        __m256 dw[TILE_ROWS / 2], mw[TILE_ROWS / 2];
        /* the scales of the four rows in one conversion: 32 bits from each
         * block header bring d, and m for q4_1 (for q4_0 two quant bytes,
         * never used) */
        uint32_t dm[TILE_ROWS];
#pragma GCC unroll 4
        for (int i = 0; i < TILE_ROWS; i++) {
            const uint8_t *hdr = wtype == EK_TYPE_Q4_0
                                     ? (const uint8_t *)&((const block_q4_0 *)rows[i] + b)->d
                                     : (const uint8_t *)&((const block_q4_1 *)rows[i] + b)->d;
            memcpy(&dm[i], hdr, sizeof dm[i]);
        }
        const __m256 dmf = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)dm));
        const size_t bb = wtype == EK_TYPE_Q4_0 ? sizeof(block_q4_0) : sizeof(block_q4_1);
#pragma GCC unroll 4
        for (int i = 0; i < TILE_ROWS; i++)
            _mm_prefetch(rows[i] + ahead + b * bb, _MM_HINT_T0);
#pragma GCC unroll 2
        for (int p = 0; p < RP; p++) {
            const uint8_t *qa, *qb;
            if (wtype == EK_TYPE_Q4_0) {
                qa = ((const block_q4_0 *)rows[2 * p] + b)->qs;
                qb = ((const block_q4_0 *)rows[2 * p + 1] + b)->qs;
            } else {
                qa = ((const block_q4_1 *)rows[2 * p] + b)->qs;
                qb = ((const block_q4_1 *)rows[2 * p + 1] + b)->qs;
            }
            const __m256i q = load_pair(qa, qb);
            lo[p] = _mm256_and_si256(q, nibble);
            hi[p] = _mm256_and_si256(_mm256_srli_epi16(q, 4), nibble);
            /* dmf has row i's d in lane 2i, and its m (q4_1) in lane 2i + 1 */
            const int da = 4 * p;
            const __m256i pick_d =
                _mm256_setr_epi32(da, da, da, da, da + 2, da + 2, da + 2, da + 2);
            dw[p] = _mm256_permutevar8x32_ps(dmf, pick_d);
            /* m once per row: in lane 0 of each half, zero elsewhere */
            const __m256i pick_m = _mm256_setr_epi32(da + 1, 0, 0, 0, da + 3, 0, 0, 0);
            mw[p] = wtype == EK_TYPE_Q4_1
                        ? _mm256_and_ps(_mm256_permutevar8x32_ps(dmf, pick_m),
                                        _mm256_castsi256_ps(_mm256_setr_epi32(-1, 0, 0, 0, -1,
                                                                              0, 0, 0)))
                        : _mm256_setzero_ps();
        }

#pragma GCC unroll 4
        for (int j = 0; j < RX; j++) {
            __m256 dx, s;
            const int8_t *xs = act_block(wtype, x + j * x_stride, b, &dx, &s);
            const __m256i xlo = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)xs));
            const __m256i xhi =
                _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)(xs + 16)));
            /* q4_0: sum (w - 8) x = sum w x - 8 sum x, with w the raw nibbles */
            __m256i start = _mm256_setzero_si256();
            if (wtype == EK_TYPE_Q4_0)
                start = _mm256_sub_epi32(start, sum4_times(8, sum4_times(8, start, xlo), xhi));
#pragma GCC unroll 2
            for (int p = 0; p < RP; p++) {
                const __m256i sum = dot2_u4s8(start, lo[p], xlo, hi[p], xhi);
                acc[p][j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum), _mm256_mul_ps(dw[p], dx),
                                            acc[p][j]);
                if (wtype == EK_TYPE_Q4_1) acc[p][j] = _mm256_fmadd_ps(mw[p], s, acc[p][j]);
            }
        }
    }

#pragma GCC unroll 4
    for (int j = 0; j < RX; j++)
#pragma GCC unroll 4
        for (int i = 0; i < RW; i++) {
            const __m256 a = acc[i / 2][j];
            __m128 h = i % 2 ? _mm256_extractf128_ps(a, 1) : _mm256_castps256_ps128(a);
            h = _mm_add_ps(h, _mm_movehl_ps(h, h));
            h = _mm_add_ss(h, _mm_movehdup_ps(h));
            y[j * y_stride + i] = _mm_cvtss_f32(h);
        }
}

/* Q8_0 weights, one row per register. AVX2 multiplies |w| by x carrying
 * w's sign (maddubs wants one unsigned operand); VNNI instead makes x
 * unsigned by adding 128 and starts each sum at -128 * sum w, which costs
 * one op per weight block rather than one per product. */
EK_INLINE void gemm_tile_q8(const int RW, const int RX, int nb, const char *w, size_t w_stride,
                            const char *x, size_t x_stride, float *y, size_t y_stride) {
    const __m256i zero = _mm256_setzero_si256();
    const size_t ahead = prefetch_ahead(w_stride);
    __m256 acc[TILE_ROWS][TILE_COLS];
#pragma GCC unroll 4
    for (int i = 0; i < RW; i++)
#pragma GCC unroll 4
        for (int j = 0; j < RX; j++) acc[i][j] = _mm256_setzero_ps();

    for (int b = 0; b < nb; b++) {
        __m256i wq[TILE_ROWS], wprep[TILE_ROWS];
        __m256 wd[TILE_ROWS];
#pragma GCC unroll 4
        for (int i = 0; i < RW; i++) {
            const block_q8_0 *blk = (const block_q8_0 *)(w + i * w_stride) + b;
            _mm_prefetch((const char *)blk + ahead, _MM_HINT_T0);
            wq[i] = _mm256_loadu_si256((const __m256i *)blk->qs);
            wd[i] = _mm256_set1_ps(f16_to_f32(blk->d));
#if EK_X86_VNNI
            wprep[i] = _mm256_sub_epi32(zero, sum4_times(-128, zero, wq[i]));
#else
            wprep[i] = _mm256_abs_epi8(wq[i]);
#endif
        }
#pragma GCC unroll 4
        for (int j = 0; j < RX; j++) {
            const block_q8_0 *blk = (const block_q8_0 *)(x + j * x_stride) + b;
            const __m256i xq = _mm256_loadu_si256((const __m256i *)blk->qs);
            const __m256 dx = _mm256_set1_ps(f16_to_f32(blk->d));
#if EK_X86_VNNI
            const __m256i xu = _mm256_xor_si256(xq, _mm256_set1_epi8(-128));
#endif
#pragma GCC unroll 4
            for (int i = 0; i < RW; i++) {
#if EK_X86_VNNI
                const __m256i sum = dot_u8s8(wprep[i], xu, wq[i]);
#else
                const __m256i sum = dot_u8s8(zero, wprep[i], _mm256_sign_epi8(xq, wq[i]));
#endif
                acc[i][j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum), _mm256_mul_ps(wd[i], dx),
                                            acc[i][j]);
            }
        }
    }

#pragma GCC unroll 4
    for (int j = 0; j < RX; j++)
#pragma GCC unroll 4
        for (int i = 0; i < RW; i++) y[j * y_stride + i] = hsum_ps(acc[i][j]);
}

/* Float weights (f32 or f16) with f32 activations: eight elements a step,
 * then a scalar tail for n % 8. */
EK_INLINE __m256 load_w8(const int wtype, const char *row, int k) {
    if (wtype == EK_TYPE_F16)
        return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const ek_f16 *)row + k)));
    return _mm256_loadu_ps((const float *)row + k);
}


EK_INLINE void gemm_tile_f(const int wtype, const int RW, const int RX, int n,
                           const char *w, size_t w_stride, const char *x, size_t x_stride,
                           float *y, size_t y_stride) {
    __m256 acc[TILE_ROWS][TILE_COLS];
#pragma GCC unroll 4
    for (int i = 0; i < RW; i++)
#pragma GCC unroll 4
        for (int j = 0; j < RX; j++) acc[i][j] = _mm256_setzero_ps();

    int k = 0;
    for (; k + 8 <= n; k += 8) {
        __m256 wv[TILE_ROWS];
#pragma GCC unroll 4
        for (int i = 0; i < RW; i++) wv[i] = load_w8(wtype, w + i * w_stride, k);
#pragma GCC unroll 4
        for (int j = 0; j < RX; j++) {
            const __m256 xv = _mm256_loadu_ps((const float *)(x + j * x_stride) + k);
#pragma GCC unroll 4
            for (int i = 0; i < RW; i++) acc[i][j] = _mm256_fmadd_ps(wv[i], xv, acc[i][j]);
        }
    }

#pragma GCC unroll 4
    for (int j = 0; j < RX; j++) {
        const float *xr = (const float *)(x + j * x_stride);
#pragma GCC unroll 4
        for (int i = 0; i < RW; i++) {
            y[j * y_stride + i] =
                add_tail_f(hsum_ps(acc[i][j]), wtype, w + i * w_stride, xr, k, n);
        }
    }
}

EK_INLINE void gemm_tile(const int wtype, const int RW, const int RX, int n, const char *w,
                         size_t w_stride, const char *x, size_t x_stride, float *y,
                         size_t y_stride) {
    if (wtype == EK_TYPE_F32 || wtype == EK_TYPE_F16)
        gemm_tile_f(wtype, RW, RX, n, w, w_stride, x, x_stride, y, y_stride);
    else if (wtype == EK_TYPE_Q8_0)
        gemm_tile_q8(RW, RX, n / EK_QK, w, w_stride, x, x_stride, y, y_stride);
    else
        gemm_tile_q4(wtype, RW, RX, n / EK_QK, w, w_stride, x, x_stride, y, y_stride);
}

/* ---- the x8 layout ----
 * A group's 8 rows against RX activation rows. Each 32-byte load holds 4
 * columns of the 8 rows, row i in 32-bit lane i, and the 4 activations of
 * those columns are broadcast to every lane, so each lane sums its own
 * row: the block's 8 sums come out in order, and one conversion, scale and
 * accumulate serve 8 rows. */

/* The 4 activation bytes at xs, in every 32-bit lane. */
EK_INLINE __m256i piece_x(const int8_t *xs) {
    int32_t v;
    memcpy(&v, xs, sizeof v);
    return _mm256_set1_epi32(v);
}

/* 8 * sum of an activation block, in every lane (Q4_0's offset). */
EK_INLINE __m256i eight_sum_x(__m256i xq) {
    __m256i s = sum4_times(8, _mm256_setzero_si256(), xq);
    s = _mm256_add_epi32(s, _mm256_shuffle_epi32(s, _MM_SHUFFLE(1, 0, 3, 2)));
    s = _mm256_add_epi32(s, _mm256_shuffle_epi32(s, _MM_SHUFFLE(2, 3, 0, 1)));
    return _mm256_add_epi32(s, _mm256_permute2x128_si256(s, s, 0x01));
}

/* One block of 8 Q4 rows against one activation block: the 8 int sums of
 * the raw nibbles. AVX2 adds the pieces' products while 16-bit: a lane
 * holds at most 16 products of 15 * 127, 30480. */
EK_INLINE __m256i dot_x8_q4(const __m256i lo[4], const __m256i hi[4], const int8_t *xs) {
#if EK_X86_VNNI
    __m256i sum = _mm256_setzero_si256();
#pragma GCC unroll 4
    for (int c = 0; c < 4; c++)
        sum = dot_u8s8(dot_u8s8(sum, lo[c], piece_x(xs + 4 * c)), hi[c], piece_x(xs + 16 + 4 * c));
    return sum;
#else
    __m256i sum16 = _mm256_setzero_si256();
#pragma GCC unroll 4
    for (int c = 0; c < 4; c++)
        sum16 = _mm256_add_epi16(
            sum16, _mm256_add_epi16(_mm256_maddubs_epi16(lo[c], piece_x(xs + 4 * c)),
                                    _mm256_maddubs_epi16(hi[c], piece_x(xs + 16 + 4 * c))));
    return _mm256_madd_epi16(sum16, _mm256_set1_epi16(1));
#endif
}

/* One block of 8 Q8_0 rows (quants at q) against one activation block. */
EK_INLINE __m256i dot_x8_q8(const uint8_t *q, const int8_t *xs) {
    __m256i sum = _mm256_setzero_si256();
#if EK_X86_VNNI
    /* dpbusd wants one unsigned operand: x gets +128, and 128 * sum w,
     * summed alongside, is taken back out */
    __m256i offset = _mm256_setzero_si256();
    const __m256i k128 = _mm256_set1_epi8(-128);
#endif
#pragma GCC unroll 8
    for (int c = 0; c < 8; c++) {
        const __m256i w = _mm256_loadu_si256((const __m256i *)(q + 32 * c));
        const __m256i xb = piece_x(xs + 4 * c);
#if EK_X86_VNNI
        sum = dot_u8s8(sum, _mm256_xor_si256(xb, k128), w);
        offset = dot_u8s8(offset, k128, w);
#else
        sum = dot_u8s8(sum, _mm256_abs_epi8(w), _mm256_sign_epi8(xb, w));
#endif
    }
#if EK_X86_VNNI
    sum = _mm256_sub_epi32(sum, offset);
#endif
    return sum;
}

EK_INLINE void gemm_x8_tile(const int wtype, const int RX, int nb, const char *g, const char *x,
                            size_t x_stride, float *y, size_t y_stride) {
    const __m256i nibble = _mm256_set1_epi8(0x0f);
    const size_t step = ek_x8_step_bytes(wtype); /* one block of 8 rows */
    __m256 acc[TILE_COLS];
#pragma GCC unroll 4
    for (int j = 0; j < RX; j++) acc[j] = _mm256_setzero_ps();

    for (int b = 0; b < nb; b++) {
        /* the group is read front to back, scales then quants, a block's
         * bytes per step: fetch that far ahead over the whole group */
        const char *ahead = g + PREFETCH_BYTES + b * step;
        for (size_t line = 0; line < step; line += 64) _mm_prefetch(ahead + line, _MM_HINT_T0);
        const uint8_t *q = ek_x8_quants(wtype, g, nb, b);
        const ek_f16 *dm = ek_x8_d(wtype, g, b);
        const __m256 dw = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)dm));
        const __m256 mw = wtype == EK_TYPE_Q4_1
                              ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(dm + EK_X8_ROWS)))
                              : _mm256_setzero_ps();
        __m256i lo[4], hi[4];
        if (wtype != EK_TYPE_Q8_0) {
#pragma GCC unroll 4
            for (int c = 0; c < 4; c++) {
                const __m256i v = _mm256_loadu_si256((const __m256i *)(q + 32 * c));
                lo[c] = _mm256_and_si256(v, nibble);
                hi[c] = _mm256_and_si256(_mm256_srli_epi16(v, 4), nibble);
            }
        }

#pragma GCC unroll 4
        for (int j = 0; j < RX; j++) {
            __m256 dx, s;
            const int8_t *xs = act_block(wtype, x + j * x_stride, b, &dx, &s);
            __m256i sum;
            if (wtype == EK_TYPE_Q8_0) {
                sum = dot_x8_q8(q, xs);
            } else {
                sum = dot_x8_q4(lo, hi, xs);
                /* q4_0: sum (w - 8) x = sum w x - 8 sum x, with w the raw nibbles */
                if (wtype == EK_TYPE_Q4_0)
                    sum = _mm256_sub_epi32(
                        sum, eight_sum_x(_mm256_loadu_si256((const __m256i *)xs)));
            }
            acc[j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum), _mm256_mul_ps(dw, dx), acc[j]);
            if (wtype == EK_TYPE_Q4_1) acc[j] = _mm256_fmadd_ps(mw, s, acc[j]);
        }
    }
#pragma GCC unroll 4
    for (int j = 0; j < RX; j++) _mm256_storeu_ps(y + j * y_stride, acc[j]);
}

#endif
