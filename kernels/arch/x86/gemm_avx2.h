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

/* The same over two blocks of 4- or 5-bit codes (u <= 31): AVX2 adds them
 * while still 16-bit (the two pair sums are at most 4 * 31 * 127), saving a
 * madd. */
EK_INLINE __m256i dot2_u5s8(__m256i c, __m256i u1, __m256i s1, __m256i u2, __m256i s2) {
#if EK_X86_VNNI
    return dot_u8s8(dot_u8s8(c, u1, s1), u2, s2);
#else
    const __m256i pairs =
        _mm256_add_epi16(_mm256_maddubs_epi16(u1, s1), _mm256_maddubs_epi16(u2, s2));
    return _mm256_add_epi32(c, _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
#endif
}

/* The same for signed codes of any size (IQ4_NL's, -127..113): maddubs
 * wants one unsigned operand, so |w| is dotted with x carrying w's sign.
 * A pair of products may reach 2 * 127 * 127, so each block is widened to
 * 32 bits on its own. */
EK_INLINE __m256i dot2_s8s8(__m256i c, __m256i w1, __m256i x1, __m256i w2, __m256i x2) {
    c = dot_u8s8(c, _mm256_abs_epi8(w1), _mm256_sign_epi8(x1, w1));
    return dot_u8s8(c, _mm256_abs_epi8(w2), _mm256_sign_epi8(x2, w2));
}

/* c plus k times the sums of s's bytes in groups of four. */
EK_INLINE __m256i sum4_times(int8_t k, __m256i c, __m256i s) {
    return dot_u8s8(c, _mm256_set1_epi8(k), s);
}

/* The 32-element types with 4-bit codes (Q4_0, Q4_1, and IQ4_NL's indices
 * into its grid) or 5-bit ones (Q5_0, Q5_1, whose fifth bits sit in qh):
 * where a block keeps what. */
EK_INLINE int has_fifth_bit(const int wtype) {
    return wtype == EK_TYPE_Q5_0 || wtype == EK_TYPE_Q5_1;
}
/* Q4_1 and Q5_1 add an offset m, paired with Q8_1's d * sum(q). */
EK_INLINE int has_offset(const int wtype) {
    return wtype == EK_TYPE_Q4_1 || wtype == EK_TYPE_Q5_1;
}
/* Q4_0 and Q5_0 codes are centred: w = q - 8 or q - 16. */
EK_INLINE int8_t code_centre(const int wtype) {
    return wtype == EK_TYPE_Q4_0 ? 8 : wtype == EK_TYPE_Q5_0 ? 16 : 0;
}
EK_INLINE size_t block_bytes(const int wtype) {
    switch (wtype) {
    case EK_TYPE_Q4_0: return sizeof(block_q4_0);
    case EK_TYPE_Q4_1: return sizeof(block_q4_1);
    case EK_TYPE_Q5_0: return sizeof(block_q5_0);
    case EK_TYPE_IQ4_NL: return sizeof(block_iq4_nl);
    default: return sizeof(block_q5_1);
    }
}
EK_INLINE size_t qs_offset(const int wtype) {
    switch (wtype) {
    case EK_TYPE_Q4_0: return offsetof(block_q4_0, qs);
    case EK_TYPE_Q4_1: return offsetof(block_q4_1, qs);
    case EK_TYPE_Q5_0: return offsetof(block_q5_0, qs);
    case EK_TYPE_IQ4_NL: return offsetof(block_iq4_nl, qs);
    default: return offsetof(block_q5_1, qs);
    }
}
EK_INLINE size_t qh_offset(const int wtype) {
    return wtype == EK_TYPE_Q5_0 ? offsetof(block_q5_0, qh) : offsetof(block_q5_1, qh);
}

/* -c * sum(x), as eight int32 partial sums laid out as dot2_u5s8's: the
 * offset of a block of centred codes (w = q - c) against an activation
 * block's halves xlo and xhi (each in both 128-bit lanes). */
EK_INLINE __m256i centre_offset(const int8_t c, __m256i xlo, __m256i xhi) {
#if EK_X86_VNNI
    return _mm256_sub_epi32(_mm256_setzero_si256(),
                            sum4_times(c, sum4_times(c, _mm256_setzero_si256(), xlo), xhi));
#else
    /* the pair sums of both halves while 16-bit (at most 4 * 128), then -c once */
    const __m256i one = _mm256_set1_epi8(1);
    const __m256i pairs =
        _mm256_add_epi16(_mm256_maddubs_epi16(one, xlo), _mm256_maddubs_epi16(one, xhi));
    return _mm256_madd_epi16(pairs, _mm256_set1_epi16(-c));
#endif
}

/* Block b of an activation row: its quants, and its scale and (for the
 * Q8_1 of Q4_1 and Q5_1) d * sum of quants in every lane; s is 0 for Q8_0. */
EK_INLINE const int8_t *act_block(const int wtype, const char *row, int b, __m256 *dx, __m256 *s) {
    if (has_offset(wtype)) {
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

/* 0x10 in each byte whose fifth bit is set, from bytes that each hold the
 * qh byte with that bit, at bit (byte index % 8). */
EK_INLINE __m256i fifth_bit_bytes(__m256i spread) {
    const __m256i bit = _mm256_set1_epi64x(0x8040201008040201ll);
    const __m256i set = _mm256_cmpeq_epi8(_mm256_and_si256(spread, bit), bit);
    return _mm256_and_si256(set, _mm256_set1_epi8(0x10));
}

/* The fifth bits of a row pair, laid out as its low (lo) and high (hi)
 * nibbles are, ORed into them. head holds the first 8 bytes of the two
 * rows' blocks, with qh at byte qh_at: the first row's in the low 128-bit
 * lane, the second's at the same place of the high one. A shuffle copies
 * the qh byte holding each code's bit into that code's byte. */
EK_INLINE void add_fifth_bits(__m256i head, const size_t qh_at, __m256i *lo, __m256i *hi) {
    const long long rep = 0x0101010101010101ll, a = (long long)qh_at;
    const __m256i pick_lo = _mm256_setr_epi64x(rep * a, rep * (a + 1), rep * a, rep * (a + 1));
    const __m256i pick_hi =
        _mm256_setr_epi64x(rep * (a + 2), rep * (a + 3), rep * (a + 2), rep * (a + 3));
    *lo = _mm256_or_si256(*lo, fifth_bit_bytes(_mm256_shuffle_epi8(head, pick_lo)));
    *hi = _mm256_or_si256(*hi, fifth_bit_bytes(_mm256_shuffle_epi8(head, pick_hi)));
}

/* Pair p of a tile's rows (rows 2p and 2p + 1), at byte `at` of each (the
 * block being read): the codes, [row 2p | row 2p + 1] per register, low
 * nibbles (and fifth bits) in lo and high in hi; the rows' d's in every
 * element of each half in dw, and m's (Q4_1, Q5_1) in element 0 of each
 * half in mw. dmf and head are as gemm_tile_q4 gathers them. */
EK_INLINE void unpack_pair(const int wtype, const char *const rows[TILE_ROWS], size_t at,
                           __m256i head, __m256 dmf, const int p, __m256i *lo, __m256i *hi,
                           __m256 *dw, __m256 *mw) {
    const __m256i nibble = _mm256_set1_epi8(0x0f);
    const __m256i q = load_pair((const uint8_t *)rows[2 * p] + at + qs_offset(wtype),
                                (const uint8_t *)rows[2 * p + 1] + at + qs_offset(wtype));
    *lo = _mm256_and_si256(q, nibble);
    *hi = _mm256_and_si256(_mm256_srli_epi16(q, 4), nibble);
    if (has_fifth_bit(wtype))
        add_fifth_bits(p ? _mm256_srli_si256(head, 8) : head, qh_offset(wtype), lo, hi);
    if (wtype == EK_TYPE_IQ4_NL) {
        *lo = _mm256_shuffle_epi8(iq4_nl_grid(), *lo);
        *hi = _mm256_shuffle_epi8(iq4_nl_grid(), *hi);
    }
    *dw = _mm256_permute_ps(dmf, 0x55 * 2 * p);
    *mw = has_offset(wtype) ? _mm256_blend_ps(_mm256_setzero_ps(),
                                              _mm256_permute_ps(dmf, 0x55 * (2 * p + 1)), 0x11)
                            : _mm256_setzero_ps();
}

/* Q4, Q5 and IQ4_NL weights, two rows per register. The low nibbles of
 * weight rows a and b fill one register ([a 0..15 | b 0..15]), the high
 * nibbles another (Q5 ORs in the fifth bits), and each half of the
 * activation block is broadcast to both 128-bit lanes: the two rows' sums
 * land in the two lanes, so one conversion, scale and accumulate serve
 * both, and one load, shift and two ands unpack both. The codes are dotted
 * unsigned (at most 31) and a centred type's offset is taken out once per
 * activation block; IQ4_NL's are looked up in its grid (a shuffle per
 * register) and dotted signed.
 * RW is 1 to 4; an odd last row is paired with itself and not stored. */
EK_INLINE void gemm_tile_q4(const int wtype, const int RW, const int RX, int nb,
                            const char *w, size_t w_stride, const char *x, size_t x_stride,
                            float *y, size_t y_stride) {
    const int RP = (RW + 1) / 2;
    const size_t ahead = prefetch_ahead(w_stride), bb = block_bytes(wtype);
    const char *rows[TILE_ROWS];
#pragma GCC unroll 4
    for (int i = 0; i < TILE_ROWS; i++) rows[i] = w + (i < RW ? i : RW - 1) * w_stride;

    __m256 acc[TILE_ROWS / 2][TILE_COLS];
#pragma GCC unroll 2
    for (int p = 0; p < RP; p++)
#pragma GCC unroll 4
        for (int j = 0; j < RX; j++) acc[p][j] = _mm256_setzero_ps();

    for (int b = 0; b < nb; b++) {
        /* The four rows' scales in one conversion, rows 0 and 2 in the low
         * 128-bit lane and 1 and 3 in the high, so pair p's d's are lane
         * element 2p of both halves and its m's (q4_1, q5_1) element 2p + 1.
         * Q4 blocks bring d (and m) in their first 32 bits; of Q5 blocks
         * the first 64 are kept, rows laid out alike, for their qh too. */
        __m256 dmf;
        __m256i head = _mm256_setzero_si256();
        if (has_fifth_bit(wtype)) {
            int64_t h[TILE_ROWS];
#pragma GCC unroll 4
            for (int i = 0; i < TILE_ROWS; i++) memcpy(&h[i], rows[i] + b * bb, sizeof h[i]);
            head = _mm256_setr_epi64x(h[0], h[2], h[1], h[3]);
            const __m256i dm = _mm256_shuffle_epi8(
                head, _mm256_setr_epi8(0, 1, 2, 3, 8, 9, 10, 11, -1, -1, -1, -1, -1, -1, -1, -1,
                                       0, 1, 2, 3, 8, 9, 10, 11, -1, -1, -1, -1, -1, -1, -1, -1));
            dmf = _mm256_cvtph_ps(_mm256_castsi256_si128(_mm256_permute4x64_epi64(dm, 0x08)));
        } else {
            uint32_t dm[TILE_ROWS];
#pragma GCC unroll 4
            for (int i = 0; i < TILE_ROWS; i++) memcpy(&dm[i], rows[i] + b * bb, sizeof dm[i]);
            dmf = _mm256_cvtph_ps(_mm_setr_epi32(dm[0], dm[2], dm[1], dm[3]));
        }
#pragma GCC unroll 4
        for (int i = 0; i < TILE_ROWS; i++)
            _mm_prefetch(rows[i] + ahead + b * bb, _MM_HINT_T0);

        /* Pair p's codes and scales. With one activation row, each pair is
         * unpacked just before use, so few registers are live; with more,
         * every pair first, so each activation block is read once a tile. */
        __m256i lo[TILE_ROWS / 2], hi[TILE_ROWS / 2];
        __m256 dw[TILE_ROWS / 2], mw[TILE_ROWS / 2];
        if (RX > 1) {
#pragma GCC unroll 2
            for (int p = 0; p < RP; p++)
                unpack_pair(wtype, rows, b * bb, head, dmf, p, &lo[p], &hi[p], &dw[p], &mw[p]);
        }
#pragma GCC unroll 4
        for (int j = 0; j < RX; j++) {
            __m256 dx, s;
            const int8_t *xs = act_block(wtype, x + j * x_stride, b, &dx, &s);
            const __m256i xlo = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)xs));
            const __m256i xhi =
                _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)(xs + 16)));
            /* centred codes: sum (q - c) x = sum q x - c sum x */
            const __m256i start = code_centre(wtype) ? centre_offset(code_centre(wtype), xlo, xhi)
                                                     : _mm256_setzero_si256();
#pragma GCC unroll 2
            for (int p = 0; p < RP; p++) {
                if (RX == 1)
                    unpack_pair(wtype, rows, b * bb, head, dmf, p, &lo[p], &hi[p], &dw[p], &mw[p]);
                const __m256i sum = wtype == EK_TYPE_IQ4_NL
                                        ? dot2_s8s8(start, lo[p], xlo, hi[p], xhi)
                                        : dot2_u5s8(start, lo[p], xlo, hi[p], xhi);
                acc[p][j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum), _mm256_mul_ps(dw[p], dx),
                                            acc[p][j]);
                if (has_offset(wtype)) acc[p][j] = _mm256_fmadd_ps(mw[p], s, acc[p][j]);
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
