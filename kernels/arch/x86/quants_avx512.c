/* The AVX2 table with AVX-512 VNNI for the integer gemms; every other
 * kernel is the AVX2 one.
 *
 * A tile's four weight rows share one zmm, one row per 128-bit lane: for
 * each block, one register holds elements 0..15 of the four rows and
 * another elements 16..31, and each half of an activation block is
 * broadcast to all four lanes. One dpbusd pair then gives the four rows'
 * sums (four int32 partial sums per row, as in the AVX2 tables), and one
 * conversion, scale and accumulate serve all four rows, where the ymm tiles
 * need one per pair of rows. Activation loads are likewise shared by four
 * rows instead of two. */
#include <string.h>

#include "avx2.h"
#include "../gemm_tiling.h"

/* The 16 bytes at offset off of each of four weight rows, row i in
 * 128-bit lane i. */
EK_INLINE __m512i load_lanes(const char *const rows[TILE_ROWS], size_t off) {
    const __m256i r01 = _mm256_inserti128_si256(
        _mm256_castsi128_si256(_mm_loadu_si128((const __m128i *)(rows[0] + off))),
        _mm_loadu_si128((const __m128i *)(rows[1] + off)), 1);
    const __m256i r23 = _mm256_inserti128_si256(
        _mm256_castsi128_si256(_mm_loadu_si128((const __m128i *)(rows[2] + off))),
        _mm_loadu_si128((const __m128i *)(rows[3] + off)), 1);
    return _mm512_inserti64x4(_mm512_castsi256_si512(r01), r23, 1);
}

/* A 16-byte activation slice in all four lanes. */
EK_INLINE __m512i broadcast_lanes(const int8_t *x) {
    return _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)x));
}

/* RW (1 to 4) weight rows of Q4_0, Q4_1 or Q8_0 by RX activation rows.
 * Rows past RW repeat the last one and are not stored. */
EK_INLINE void gemm_tile_q(const int wtype, const int RW, const int RX, int nb, const char *w,
                           size_t w_stride, const char *x, size_t x_stride, float *y,
                           size_t y_stride) {
    const size_t ahead = prefetch_ahead(w_stride);
    const size_t bb = wtype == EK_TYPE_Q4_0   ? sizeof(block_q4_0)
                      : wtype == EK_TYPE_Q4_1 ? sizeof(block_q4_1)
                                              : sizeof(block_q8_0);
    const size_t qoff = wtype == EK_TYPE_Q4_1 ? offsetof(block_q4_1, qs)
                        : wtype == EK_TYPE_Q4_0 ? offsetof(block_q4_0, qs)
                                                : offsetof(block_q8_0, qs);
    const __m512i nibble = _mm512_set1_epi8(0x0f);
    const __m512i zero = _mm512_setzero_si512();
    /* lane i of a zmm gets float 2i of the converted headers: row i's d */
    const __m512i pick_d = _mm512_setr_epi32(0, 0, 0, 0, 2, 2, 2, 2, 4, 4, 4, 4, 6, 6, 6, 6);
    const __m512i pick_m = _mm512_setr_epi32(1, 1, 1, 1, 3, 3, 3, 3, 5, 5, 5, 5, 7, 7, 7, 7);
    const char *rows[TILE_ROWS];
#pragma GCC unroll 4
    for (int i = 0; i < TILE_ROWS; i++) rows[i] = w + (i < RW ? i : RW - 1) * w_stride;

    __m512 acc[TILE_COLS];
#pragma GCC unroll 4
    for (int j = 0; j < TILE_COLS; j++) acc[j] = _mm512_setzero_ps();

    for (int b = 0; b < nb; b++) {
        const size_t at = b * bb;
        /* 32 bits from each block header: d, then m for q4_1 (quant bytes,
         * never used, otherwise); one conversion for the four rows */
        uint32_t dm[TILE_ROWS];
#pragma GCC unroll 4
        for (int i = 0; i < TILE_ROWS; i++) memcpy(&dm[i], rows[i] + at, sizeof dm[i]);
        const __m512 dmf = _mm512_castps256_ps512(
            _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)dm)));
        const __m512 dw = _mm512_permutexvar_ps(pick_d, dmf);
        /* m enters once per row: in the first float of its lane only */
        const __m512 mw = wtype == EK_TYPE_Q4_1 ? _mm512_maskz_permutexvar_ps(0x1111, pick_m, dmf)
                                                : _mm512_setzero_ps();
#pragma GCC unroll 4
        for (int i = 0; i < TILE_ROWS; i++) _mm_prefetch(rows[i] + ahead + at, _MM_HINT_T0);

        __m512i lo, hi, wstart = zero;
        if (wtype == EK_TYPE_Q8_0) {
            lo = load_lanes(rows, at + qoff);
            hi = load_lanes(rows, at + qoff + 16);
            /* dpbusd wants one unsigned operand: x gets +128 (below) and
             * each sum starts at -128 * sum w to take it back out */
            const __m512i k128 = _mm512_set1_epi8(-128);
            wstart = _mm512_sub_epi32(
                zero, _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(zero, k128, lo), k128, hi));
        } else {
            const __m512i q = load_lanes(rows, at + qoff);
            lo = _mm512_and_si512(q, nibble);
            hi = _mm512_and_si512(_mm512_srli_epi16(q, 4), nibble);
        }

#pragma GCC unroll 4
        for (int j = 0; j < RX; j++) {
            const char *col = x + j * x_stride;
            const int8_t *xs;
            __m512 dx, s = _mm512_setzero_ps();
            if (wtype == EK_TYPE_Q4_1) {
                const block_q8_1 *blk = (const block_q8_1 *)col + b;
                xs = blk->qs;
                dx = _mm512_set1_ps(blk->d);
                s = _mm512_set1_ps(blk->s);
            } else {
                const block_q8_0 *blk = (const block_q8_0 *)col + b;
                xs = blk->qs;
                dx = _mm512_set1_ps(f16_to_f32(blk->d));
            }
            const __m512i xlo = broadcast_lanes(xs), xhi = broadcast_lanes(xs + 16);
            __m512i sum;
            if (wtype == EK_TYPE_Q8_0) {
                const __m512i flip = _mm512_set1_epi8(-128);
                sum = _mm512_dpbusd_epi32(wstart, _mm512_xor_si512(xlo, flip), lo);
                sum = _mm512_dpbusd_epi32(sum, _mm512_xor_si512(xhi, flip), hi);
            } else {
                /* q4_0: sum (w - 8) x = sum w x - 8 sum x, w the raw nibbles */
                __m512i start = zero;
                if (wtype == EK_TYPE_Q4_0) {
                    const __m512i k8 = _mm512_set1_epi8(8);
                    start = _mm512_sub_epi32(
                        zero, _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(zero, k8, xlo), k8, xhi));
                }
                sum = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(start, lo, xlo), hi, xhi);
            }
            acc[j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), _mm512_mul_ps(dw, dx), acc[j]);
            if (wtype == EK_TYPE_Q4_1) acc[j] = _mm512_fmadd_ps(mw, s, acc[j]);
        }
    }

    /* Sum each lane's four floats for all columns at once: a 4 x 4
     * transpose-add leaves, in lane i, row i's totals for columns 0..3. */
    const __m512 s01 = _mm512_add_ps(_mm512_unpacklo_ps(acc[0], acc[1]),
                                     _mm512_unpackhi_ps(acc[0], acc[1]));
    const __m512 s23 = _mm512_add_ps(_mm512_unpacklo_ps(acc[2], acc[3]),
                                     _mm512_unpackhi_ps(acc[2], acc[3]));
    const __m512 tot = _mm512_add_ps(_mm512_shuffle_ps(s01, s23, _MM_SHUFFLE(1, 0, 1, 0)),
                                     _mm512_shuffle_ps(s01, s23, _MM_SHUFFLE(3, 2, 3, 2)));
    float out[TILE_ROWS * TILE_COLS];
    _mm512_storeu_ps(out, tot);
#pragma GCC unroll 4
    for (int j = 0; j < RX; j++)
#pragma GCC unroll 4
        for (int i = 0; i < RW; i++) y[j * y_stride + i] = out[i * TILE_COLS + j];
}

EK_INLINE void gemm_tile(const int wtype, const int RW, const int RX, int n, const char *w,
                         size_t w_stride, const char *x, size_t x_stride, float *y,
                         size_t y_stride) {
    gemm_tile_q(wtype, RW, RX, n / EK_QK, w, w_stride, x, x_stride, y, y_stride);
}

static EK_GEMM_ENTRY(gemm_q4_0_q8_0_avx512_vnni, EK_TYPE_Q4_0)
static EK_GEMM_ENTRY(gemm_q4_1_q8_1_avx512_vnni, EK_TYPE_Q4_1)
static EK_GEMM_ENTRY(gemm_q8_0_q8_0_avx512_vnni, EK_TYPE_Q8_0)

const ek_kernels ek_kernels_avx512_vnni = {
    .name = "avx512_vnni",
    .types = {EK_AVX2_TYPE_OPS(avx512_vnni)},
    EK_AVX2_FLOAT_OPS,
};
