/* AVX2 kernels for the K-quants (Q4_K, Q5_K, Q6_K, dotted with Q8_K
 * activations): the activation quantizer, the dequantizers and the gemm
 * entries, which every x86 table shares.
 *
 * A super-block's codes are dotted unsigned with the activations (maddubs:
 * 32 products to 16 int16 pair sums), and each sub-block's pair sums are
 * multiplied by its integer scale as they are added to int32 (madd), so a
 * super-block costs one conversion to float per weight row and activation
 * row. The terms that do not depend on the codes come from the
 * activations' sums of 16: Q4_K and Q5_K take dmin * mn * sum(x) off each
 * sub-block, in float; Q6_K's codes are q + 32, and 32 * sc * sum(x) is
 * taken out of the integer sum.
 */
#include <string.h>

#include "avx2.h"
#include "../gemm_tiling.h"

/* v, as a value the compiler must hold at this point. Without it GCC
 * reassociates a tile's running integer sums into one tree per sum, all of
 * whose terms are live at once and spill. */
EK_INLINE __m256i settle(__m256i v) {
    __asm__("" : "+x"(v));
    return v;
}

/* ---- Q8_K activations ---- */

/* Bit-identical to the reference: the scale from the first element of
 * largest magnitude, sign included (iscale = -127 / it), quants rounded
 * half to even (the conversion's default rounding, as rintf), d stored as
 * 1 / iscale; and the sums of each 16 quants. */
void quantize_row_q8_K_avx2(const float *x, void *vy, int n) {
    block_q8_K *y = vy;
    const __m256 sign = _mm256_set1_ps(-0.0f);
    for (int b = 0; b < n / EK_QK_K; b++, x += EK_QK_K) {
        /* max_ps returns its second operand when the first is NaN: NaNs
         * are passed over, as the reference's comparisons pass them over */
        __m256 amax8 = _mm256_setzero_ps();
        for (int k = 0; k < EK_QK_K; k += 8)
            amax8 = _mm256_max_ps(_mm256_andnot_ps(sign, _mm256_loadu_ps(x + k)), amax8);
        const float amax = hmax_ps(amax8);
        if (amax == 0.0f) {
            memset(&y[b], 0, sizeof y[b]);
            continue;
        }
        /* some element has magnitude amax; the first one gives the sign */
        int k = 0, at;
        while (!(at = _mm256_movemask_ps(_mm256_cmp_ps(
                     _mm256_andnot_ps(sign, _mm256_loadu_ps(x + k)), _mm256_set1_ps(amax),
                     _CMP_EQ_OQ))))
            k += 8;
        const float iscale = -127.0f / x[k + __builtin_ctz((unsigned)at)];
        const __m256 is = _mm256_set1_ps(iscale);

        /* quants 32 at a time; of each, the sums of 4 (int32), then of 16 */
        __m256i sums4[EK_QK_K / 32];
        for (int c = 0; c < EK_QK_K / 32; c++) {
            __m256i q[4];
            for (int v = 0; v < 4; v++)
                q[v] = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + 32 * c + 8 * v), is));
            const __m256i q8 = pack_i32_to_i8(q);
            _mm256_storeu_si256((__m256i *)(y[b].qs + 32 * c), q8);
            sums4[c] = _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_set1_epi8(1), q8),
                                         _mm256_set1_epi16(1));
        }
        /* sums4[c] has group 2c's sums of 4 in its low lane, 2c + 1's in the
         * high; two rounds of pairwise adds leave [g0 g2 g4 g6 | g1 g3 g5 g7]
         * (and g8.. likewise), which the packs and unpacks put in order */
        __m256i g[2];
        for (int h = 0; h < 2; h++)
            g[h] = _mm256_hadd_epi32(_mm256_hadd_epi32(sums4[4 * h], sums4[4 * h + 1]),
                                     _mm256_hadd_epi32(sums4[4 * h + 2], sums4[4 * h + 3]));
        const __m256i g16 = _mm256_packs_epi32(g[0], g[1]);
        const __m128i even = _mm256_castsi256_si128(g16), odd = _mm256_extracti128_si256(g16, 1);
        _mm_storeu_si128((__m128i *)y[b].bsums, _mm_unpacklo_epi16(even, odd));
        _mm_storeu_si128((__m128i *)(y[b].bsums + 8), _mm_unpackhi_epi16(even, odd));
        y[b].d = 1.0f / iscale;
    }
}

/* ---- Q4_K and Q5_K ---- */

/* The 8 sub-block scales then the 8 mins of a Q4_K or Q5_K super-block, as
 * 16 bytes, from its first 16 bytes (d, dmin, then scales[12], so scale
 * byte k is byte 4 + k). Sub-blocks 0..3 keep their 6 bits in the low bits
 * of bytes 0..3 (scales) and 4..7 (mins); sub-blocks 4..7 keep the low 4 in
 * the nibbles of bytes 8..11 and the top 2 in the top bits of 0..3 and 4..7. */
EK_INLINE __m128i k_scales_mins(__m128i head) {
    /* scales 0..3, the low nibbles of 8..11, mins 0..3, the high nibbles of 8..11 */
    const __m128i low = _mm_shuffle_epi8(
        head, _mm_setr_epi8(4, 5, 6, 7, 12, 13, 14, 15, 8, 9, 10, 11, 12, 13, 14, 15));
    const __m128i low_bits = _mm_or_si128(
        _mm_and_si128(low, _mm_setr_epi32(0x3f3f3f3f, 0x0f0f0f0f, 0x3f3f3f3f, 0)),
        _mm_and_si128(_mm_srli_epi16(low, 4), _mm_setr_epi32(0, 0, 0, 0x0f0f0f0f)));
    const __m128i top = _mm_shuffle_epi8(
        head, _mm_setr_epi8(-1, -1, -1, -1, 4, 5, 6, 7, -1, -1, -1, -1, 8, 9, 10, 11));
    const __m128i top_bits =
        _mm_and_si128(_mm_srli_epi16(top, 2), _mm_setr_epi32(0, 0x30303030, 0, 0x30303030));
    return _mm_or_si128(low_bits, top_bits);
}

/* Bit `bit` of every byte of v, moved to bit 4 (the fifth bit of a code).
 * The 16-bit shifts carry bits across bytes, but only into bits the mask drops. */
EK_INLINE __m256i bit_to_4(__m256i v, const int bit) {
    const __m256i moved = bit < 4   ? _mm256_slli_epi16(v, 4 - bit)
                          : bit > 4 ? _mm256_srli_epi16(v, bit - 4)
                                    : v;
    return _mm256_and_si256(moved, _mm256_set1_epi8(0x10));
}

/* The codes of sub-blocks 2c (lo) and 2c + 1 (hi), 32 each in element
 * order, of a Q4_K or Q5_K super-block: qs's 32 bytes c hold them in their
 * low and high nibbles, and for Q5_K bits 2c and 2c + 1 of qh's 32 bytes
 * are their fifth bits. */
EK_INLINE void k_codes(const int wtype, const uint8_t *qs, __m256i qh, const int c, __m256i *lo,
                       __m256i *hi) {
    const __m256i nibble = _mm256_set1_epi8(0x0f);
    const __m256i v = _mm256_loadu_si256((const __m256i *)(qs + 32 * c));
    *lo = _mm256_and_si256(v, nibble);
    *hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), nibble);
    if (wtype == EK_TYPE_Q5_K) {
        *lo = _mm256_or_si256(*lo, bit_to_4(qh, 2 * c));
        *hi = _mm256_or_si256(*hi, bit_to_4(qh, 2 * c + 1));
    }
}

/* Q4_K and Q5_K share their first 16 bytes (d, dmin, scales) and qs' layout. */
EK_INLINE const uint8_t *k_qs(const int wtype, const char *blk) {
    return wtype == EK_TYPE_Q4_K ? ((const block_q4_K *)blk)->qs : ((const block_q5_K *)blk)->qs;
}

EK_INLINE __m256i k_qh(const int wtype, const char *blk) {
    return wtype == EK_TYPE_Q5_K
               ? _mm256_loadu_si256((const __m256i *)((const block_q5_K *)blk)->qh)
               : _mm256_setzero_si256();
}

/* ---- Q6_K ---- */

/* The codes (q + 32, 0..63) of half h (128 elements) of a Q6_K
 * super-block, 32 per register in element order: quarter k takes its low
 * 4 bits from ql's 32 bytes k % 2 of the half (the low nibbles for k < 2,
 * the high for k >= 2) and its top 2 from bits 2k, 2k + 1 of qh's 32. */
EK_INLINE void q6_codes(const block_q6_K *q, const int h, __m256i codes[4]) {
    const __m256i nibble = _mm256_set1_epi8(0x0f), top = _mm256_set1_epi8(0x30);
    const __m256i l0 = _mm256_loadu_si256((const __m256i *)(q->ql + 64 * h));
    const __m256i l1 = _mm256_loadu_si256((const __m256i *)(q->ql + 64 * h + 32));
    const __m256i hb = _mm256_loadu_si256((const __m256i *)(q->qh + 32 * h));
    codes[0] = _mm256_or_si256(_mm256_and_si256(l0, nibble),
                               _mm256_and_si256(_mm256_slli_epi16(hb, 4), top));
    codes[1] = _mm256_or_si256(_mm256_and_si256(l1, nibble),
                               _mm256_and_si256(_mm256_slli_epi16(hb, 2), top));
    codes[2] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l0, 4), nibble),
                               _mm256_and_si256(hb, top));
    codes[3] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l1, 4), nibble),
                               _mm256_and_si256(_mm256_srli_epi16(hb, 2), top));
}

/* The int16 scales of quarter r's two sub-blocks of 16: the first's in
 * the low 128-bit lane, the second's in the high. half holds the 8 scales
 * of a half, as int16, in both lanes. */
EK_INLINE __m256i q6_scale_pair(__m256i half, const int r) {
    /* int16 k of a lane is its bytes 2k, 2k + 1: the mask repeats them */
    const long long rep = 0x0001000100010001ll;
    const long long first = (long long)(4 * r + 256 * (4 * r + 1)) * rep;
    const long long second = (long long)(4 * r + 2 + 256 * (4 * r + 3)) * rep;
    return _mm256_shuffle_epi8(half, _mm256_setr_epi64x(first, first, second, second));
}

/* ---- dequantizers (embedding rows) ---- */

/* Q4_K and Q5_K: x = (d * sc) * q - dmin * mn per sub-block of 32. */
EK_INLINE void dequantize_k_minned(const int wtype, const void *vx, float *y, int n) {
    const size_t bb = wtype == EK_TYPE_Q4_K ? sizeof(block_q4_K) : sizeof(block_q5_K);
    for (int b = 0; b < n / EK_QK_K; b++, y += EK_QK_K) {
        const char *blk = (const char *)vx + b * bb;
        const __m128i head = _mm_loadu_si128((const __m128i *)blk);
        uint8_t sm[16];
        _mm_storeu_si128((__m128i *)sm, k_scales_mins(head));
        const float d = f16_to_f32(((const block_q4_K *)blk)->d);
        const float dmin = f16_to_f32(((const block_q4_K *)blk)->dmin);
        const __m256i qh = k_qh(wtype, blk);
        for (int c = 0; c < 4; c++) {
            __m256i codes[2];
            k_codes(wtype, k_qs(wtype, blk), qh, c, &codes[0], &codes[1]);
            for (int k = 0; k < 2; k++) {
                const int s = 2 * c + k;
                const __m256 ds = _mm256_set1_ps(d * sm[s]), ms = _mm256_set1_ps(-(dmin * sm[8 + s]));
                store_scaled16(y + 32 * s, _mm256_castsi256_si128(codes[k]), ds, ms, 1);
                store_scaled16(y + 32 * s + 16, _mm256_extracti128_si256(codes[k], 1), ds, ms, 1);
            }
        }
    }
}

void dequantize_row_q4_K_avx2(const void *x, float *y, int n) {
    dequantize_k_minned(EK_TYPE_Q4_K, x, y, n);
}

void dequantize_row_q5_K_avx2(const void *x, float *y, int n) {
    dequantize_k_minned(EK_TYPE_Q5_K, x, y, n);
}

/* Q6_K: x = (d * scales[s]) * (q - 32) per sub-block of 16. */
void dequantize_row_q6_K_avx2(const void *vx, float *y, int n) {
    const block_q6_K *x = vx;
    for (int b = 0; b < n / EK_QK_K; b++, y += EK_QK_K) {
        const float d = f16_to_f32(x[b].d);
        for (int h = 0; h < 2; h++) {
            __m256i codes[4];
            q6_codes(&x[b], h, codes);
            for (int k = 0; k < 4; k++) {
                const __m256i q = _mm256_sub_epi8(codes[k], _mm256_set1_epi8(32));
                const int s = 8 * h + 2 * k;
                store_scaled16(y + 16 * s, _mm256_castsi256_si128(q),
                               _mm256_set1_ps(d * x[b].scales[s]), _mm256_setzero_ps(), 0);
                store_scaled16(y + 16 * s + 16, _mm256_extracti128_si256(q, 1),
                               _mm256_set1_ps(d * x[b].scales[s + 1]), _mm256_setzero_ps(), 0);
            }
        }
    }
}

/* ---- the gemm ----
 * Tiles as in gemm_tiling.h: each weight super-block is unpacked once for
 * the tile's activation rows. */

/* Super-block b of activation row j of a tile. */
EK_INLINE const block_q8_K *act_sb(const char *x, size_t x_stride, int j, int b) {
    return (const block_q8_K *)(x + j * x_stride) + b;
}

EK_INLINE size_t k_block_bytes(const int wtype) {
    return wtype == EK_TYPE_Q4_K   ? sizeof(block_q4_K)
           : wtype == EK_TYPE_Q5_K ? sizeof(block_q5_K)
                                   : sizeof(block_q6_K);
}

/* One Q4_K or Q5_K super-block (blk) against RX activation rows: the
 * integer sums of sc * (q . x) into isum; its d and dmin * mn as floats. */
EK_INLINE void sb_dot_k_minned(const int wtype, const int RX, const char *blk, const char *x,
                               size_t x_stride, int b, __m256i isum[TILE_COLS], __m256 *dw,
                               __m256 *mins) {
    const __m128i head = _mm_loadu_si128((const __m128i *)blk);
    const __m128 dd = _mm_cvtph_ps(head); /* d, dmin */
    *dw = _mm256_broadcastss_ps(dd);
    const __m128i sm = k_scales_mins(head);
    *mins = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(sm, 8))),
                          _mm256_broadcastss_ps(_mm_movehdup_ps(dd)));
    const __m256i sm2 = _mm256_broadcastsi128_si256(sm);
    const __m256i qh = k_qh(wtype, blk);
#pragma GCC unroll 4
    for (int j = 0; j < RX; j++) isum[j] = _mm256_setzero_si256();
#pragma GCC unroll 4
    for (int c = 0; c < 4; c++) {
        __m256i lo, hi;
        k_codes(wtype, k_qs(wtype, blk), qh, c, &lo, &hi);
        /* each sub-block's scale in every int16 lane */
        const __m256i sc_lo = _mm256_shuffle_epi8(sm2, _mm256_set1_epi16((short)(0x8000 | (2 * c))));
        const __m256i sc_hi =
            _mm256_shuffle_epi8(sm2, _mm256_set1_epi16((short)(0x8000 | (2 * c + 1))));
#pragma GCC unroll 4
        for (int j = 0; j < RX; j++) {
            const int8_t *xs = act_sb(x, x_stride, j, b)->qs + 64 * c;
            const __m256i plo = _mm256_maddubs_epi16(lo, _mm256_loadu_si256((const __m256i *)xs));
            const __m256i phi =
                _mm256_maddubs_epi16(hi, _mm256_loadu_si256((const __m256i *)(xs + 32)));
            isum[j] = settle(_mm256_add_epi32(isum[j], _mm256_add_epi32(_mm256_madd_epi16(sc_lo, plo),
                                                                        _mm256_madd_epi16(sc_hi, phi))));
        }
    }
}

/* One Q6_K super-block against RX activation rows: the integer sums of
 * sc * (q - 32) . x into isum; its d. */
EK_INLINE void sb_dot_q6_K(const int RX, const block_q6_K *q, const char *x, size_t x_stride,
                           int b, __m256i isum[TILE_COLS], __m256 *dw) {
    *dw = _mm256_set1_ps(f16_to_f32(q->d));
    const __m256i sc = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)q->scales));
    /* the codes are q + 32: each sum starts at -32 * sum_s sc_s * (sum of x over s) */
    const __m256i sc_m32 = _mm256_sub_epi16(_mm256_setzero_si256(), _mm256_slli_epi16(sc, 5));
#pragma GCC unroll 4
    for (int j = 0; j < RX; j++)
        isum[j] = _mm256_madd_epi16(
            sc_m32, _mm256_loadu_si256((const __m256i *)act_sb(x, x_stride, j, b)->bsums));
#pragma GCC unroll 2
    for (int h = 0; h < 2; h++) {
        const __m256i half = _mm256_permute4x64_epi64(sc, h ? 0xee : 0x44);
        __m256i codes[4];
        q6_codes(q, h, codes);
#pragma GCC unroll 4
        for (int r = 0; r < 4; r++) {
            const __m256i scale = q6_scale_pair(half, r);
#pragma GCC unroll 4
            for (int j = 0; j < RX; j++) {
                const int8_t *xs = act_sb(x, x_stride, j, b)->qs + 128 * h + 32 * r;
                const __m256i p =
                    _mm256_maddubs_epi16(codes[r], _mm256_loadu_si256((const __m256i *)xs));
                isum[j] = settle(_mm256_add_epi32(isum[j], _mm256_madd_epi16(scale, p)));
            }
        }
    }
}

/* RW weight rows by RX activation rows, nb super-blocks. */
EK_INLINE void gemm_tile_k(const int wtype, const int RW, const int RX, int nb, const char *w,
                           size_t w_stride, const char *x, size_t x_stride, float *y,
                           size_t y_stride) {
    const size_t bb = k_block_bytes(wtype), ahead = prefetch_ahead(w_stride);
    __m256 acc[TILE_ROWS][TILE_COLS];
#pragma GCC unroll 4
    for (int i = 0; i < RW; i++)
#pragma GCC unroll 4
        for (int j = 0; j < RX; j++) acc[i][j] = _mm256_setzero_ps();

    for (int b = 0; b < nb; b++) {
        /* the activations' d, and for Q4_K and Q5_K d times their sums over
         * each sub-block of 32 (two sums of 16), for the mins */
        __m256 dx[TILE_COLS], dsum[TILE_COLS];
#pragma GCC unroll 4
        for (int j = 0; j < RX; j++) {
            const block_q8_K *xb = act_sb(x, x_stride, j, b);
            dx[j] = _mm256_set1_ps(xb->d);
            if (wtype != EK_TYPE_Q6_K) {
                const __m256i sums16 = _mm256_loadu_si256((const __m256i *)xb->bsums);
                const __m256i sums32 = _mm256_madd_epi16(sums16, _mm256_set1_epi16(1));
                dsum[j] = _mm256_mul_ps(_mm256_cvtepi32_ps(sums32), dx[j]);
            }
        }
        /* one row at a time: a row's sums and codes fill the registers, and
         * the accumulators are touched once a super-block */
#pragma GCC unroll 1
        for (int i = 0; i < RW; i++) {
            const char *blk = w + i * w_stride + b * bb;
#pragma GCC unroll 4
            for (size_t line = 0; line < bb; line += 64)
                _mm_prefetch(blk + ahead + line, _MM_HINT_T0);
            __m256i isum[TILE_COLS];
            __m256 dw, mins = _mm256_setzero_ps();
            if (wtype == EK_TYPE_Q6_K)
                sb_dot_q6_K(RX, (const block_q6_K *)blk, x, x_stride, b, isum, &dw);
            else
                sb_dot_k_minned(wtype, RX, blk, x, x_stride, b, isum, &dw, &mins);
#pragma GCC unroll 4
            for (int j = 0; j < RX; j++) {
                acc[i][j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum[j]), _mm256_mul_ps(dw, dx[j]),
                                            acc[i][j]);
                if (wtype != EK_TYPE_Q6_K) acc[i][j] = _mm256_fnmadd_ps(mins, dsum[j], acc[i][j]);
            }
        }
    }

#pragma GCC unroll 4
    for (int j = 0; j < RX; j++)
#pragma GCC unroll 4
        for (int i = 0; i < RW; i++) y[j * y_stride + i] = hsum_ps(acc[i][j]);
}

EK_INLINE void gemm_tile(const int wtype, const int RW, const int RX, int n, const char *w,
                         size_t w_stride, const char *x, size_t x_stride, float *y,
                         size_t y_stride) {
    gemm_tile_k(wtype, RW, RX, n / EK_QK_K, w, w_stride, x, x_stride, y, y_stride);
}

EK_GEMM_ENTRY(gemm_q4_K_q8_K_avx2, EK_TYPE_Q4_K)
EK_GEMM_ENTRY(gemm_q5_K_q8_K_avx2, EK_TYPE_Q5_K)
EK_GEMM_ENTRY(gemm_q6_K_q8_K_avx2, EK_TYPE_Q6_K)
