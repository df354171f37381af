/* The NEON table with smmla (armv8.6-a+i8mm) for prefill.
 *
 * smmla multiplies a 2x8 by an 8x2 int8 matrix into a 2x2 int32 tile, so
 * one instruction serves two weight rows times two activation rows: twice
 * the products of an sdot. Tiles are 4 weight rows by 4 activation rows
 * (2 x 2 smmla tiles). A single activation row (decode) or a leftover
 * single row or column would waste half of each smmla, so those go to the
 * dotprod gemm, which every i8mm CPU has. Other kernels are plain NEON.
 */
#include "neon.h"
#include "../prefetch.h"

/* Two rows' blocks interleaved for smmla: v[k] holds elements 8k..8k+7 of
 * the first row, then the same of the second. */
typedef struct {
    int8x16_t v[4];
} block_pair;

EK_INLINE int8x16_t zip_lo64(int8x16_t a, int8x16_t b) {
    return vreinterpretq_s8_s64(vzip1q_s64(vreinterpretq_s64_s8(a), vreinterpretq_s64_s8(b)));
}

EK_INLINE int8x16_t zip_hi64(int8x16_t a, int8x16_t b) {
    return vreinterpretq_s8_s64(vzip2q_s64(vreinterpretq_s64_s8(a), vreinterpretq_s64_s8(b)));
}

EK_INLINE block_pair interleave(quants32 a, quants32 b) {
    block_pair p = {{zip_lo64(a.lo, b.lo), zip_hi64(a.lo, b.lo), zip_lo64(a.hi, b.hi),
                     zip_hi64(a.hi, b.hi)}};
    return p;
}

/* [w0.x0, w0.x1, w1.x0, w1.x1] over one block. */
EK_INLINE int32x4_t mmla_block(block_pair w, block_pair x) {
    int32x4_t r = vmmlaq_s32(vdupq_n_s32(0), w.v[0], x.v[0]);
    r = vmmlaq_s32(r, w.v[1], x.v[1]);
    r = vmmlaq_s32(r, w.v[2], x.v[2]);
    return vmmlaq_s32(r, w.v[3], x.v[3]);
}

EK_INLINE float32x4_t f32_abab(float a, float b) {
    const float32x2_t ab = vset_lane_f32(b, vdup_n_f32(a), 1);
    return vcombine_f32(ab, ab);
}

/* Block b of two activation rows, x_stride apart, interleaved for smmla;
 * their scales and (Q8_1) d * sums as [row 0, row 1, row 0, row 1]. */
EK_INLINE block_pair act_pair(const int wtype, const char *row, size_t x_stride, int b,
                              float32x4_t *dx, float32x4_t *s) {
    if (has_min(wtype)) {
        const block_q8_1 *b0 = (const block_q8_1 *)row + b;
        const block_q8_1 *b1 = (const block_q8_1 *)(row + x_stride) + b;
        *dx = f32_abab(b0->d, b1->d);
        *s = f32_abab(b0->s, b1->s);
        return interleave(load_q8(b0->qs), load_q8(b1->qs));
    }
    const block_q8_0 *b0 = (const block_q8_0 *)row + b;
    const block_q8_0 *b1 = (const block_q8_0 *)(row + x_stride) + b;
    *dx = f16x4_gather(&b0->d, &b1->d, &b0->d, &b1->d);
    *s = vdupq_n_f32(0.0f);
    return interleave(load_q8(b0->qs), load_q8(b1->qs));
}

/* RP pairs of weight rows by CP pairs of activation rows. */
EK_INLINE void gemm_tile_mmla(const int wtype, const int RP, const int CP, int nb,
                              const char *w, size_t w_stride, const char *x, size_t x_stride,
                              float *y, size_t y_stride) {
    float32x4_t acc[2][2];
#pragma GCC unroll 2
    for (int p = 0; p < RP; p++)
#pragma GCC unroll 2
        for (int c = 0; c < CP; c++) acc[p][c] = vdupq_n_f32(0.0f);

    for (int b = 0; b < nb; b++) {
        block_pair wp[2];
        float32x4_t dw[2], mw[2]; /* [row 0, row 0, row 1, row 1], as the tile's lanes */
#pragma GCC unroll 2
        for (int p = 0; p < RP; p++) {
            const ek_f16 *d0, *d1, *m0, *m1;
            const char *row = w + 2 * p * w_stride;
            const quants32 q0 = weight_quants(wtype, row, b, &d0, &m0);
            const quants32 q1 = weight_quants(wtype, row + w_stride, b, &d1, &m1);
            wp[p] = interleave(q0, q1);
            dw[p] = f16x4_gather(d0, d0, d1, d1);
            mw[p] = has_min(wtype) ? block_offsets(wtype, dw[p], m0, m0, m1, m1)
                                   : vdupq_n_f32(0.0f);
        }
#pragma GCC unroll 2
        for (int c = 0; c < CP; c++) {
            float32x4_t dx, s; /* [col 0, col 1, col 0, col 1] */
            const block_pair xp = act_pair(wtype, x + 2 * c * x_stride, x_stride, b, &dx, &s);
#pragma GCC unroll 2
            for (int p = 0; p < RP; p++) {
                const float32x4_t sum = vcvtq_f32_s32(mmla_block(wp[p], xp));
                acc[p][c] = vfmaq_f32(acc[p][c], sum, vmulq_f32(dw[p], dx));
                if (has_min(wtype)) acc[p][c] = vfmaq_f32(acc[p][c], mw[p], s);
            }
        }
    }

    for (int p = 0; p < RP; p++)
        for (int c = 0; c < CP; c++) {
            float *y00 = y + 2 * c * y_stride + 2 * p, *y01 = y00 + y_stride;
            y00[0] = vgetq_lane_f32(acc[p][c], 0);
            y01[0] = vgetq_lane_f32(acc[p][c], 1);
            y00[1] = vgetq_lane_f32(acc[p][c], 2);
            y01[1] = vgetq_lane_f32(acc[p][c], 3);
        }
}

/* 2 * RP weight rows against all nx activation rows. */
EK_INLINE void gemm_rows_mmla(const int wtype, const int RP, int n, const char *w,
                              size_t w_stride, const char *x, size_t x_stride, int nx, float *y,
                              size_t y_stride, ek_gemm_fn thin) {
    const int nb = n / EK_QK;
    int j = 0;
    for (; j + 4 <= nx; j += 4)
        gemm_tile_mmla(wtype, RP, 2, nb, w, w_stride, x + j * x_stride, x_stride,
                       y + j * y_stride, y_stride);
    if (nx - j >= 2) {
        gemm_tile_mmla(wtype, RP, 1, nb, w, w_stride, x + j * x_stride, x_stride,
                       y + j * y_stride, y_stride);
        j += 2;
    }
    if (j < nx)
        thin(n, w, w_stride, 2 * RP, x + j * x_stride, x_stride, 1, y + j * y_stride, y_stride);
}

EK_INLINE void gemm_mmla(const int wtype, int n, const void *w, size_t w_stride, int nrows,
                         const void *x, size_t x_stride, int nx, float *y, size_t y_stride,
                         ek_gemm_fn thin) {
    if (nx < 2) {
        thin(n, w, w_stride, nrows, x, x_stride, nx, y, y_stride);
        return;
    }
    const char *wr = w;
    int i = 0;
    for (; i + 4 <= nrows; i += 4)
        gemm_rows_mmla(wtype, 2, n, wr + i * w_stride, w_stride, x, x_stride, nx, y + i,
                       y_stride, thin);
    if (nrows - i >= 2) {
        gemm_rows_mmla(wtype, 1, n, wr + i * w_stride, w_stride, x, x_stride, nx, y + i,
                       y_stride, thin);
        i += 2;
    }
    if (i < nrows) thin(n, wr + i * w_stride, w_stride, 1, x, x_stride, nx, y + i, y_stride);
}

static void gemm_q4_0_q8_0_neon_i8mm(int n, const void *w, size_t w_stride, int nrows,
                                     const void *x, size_t x_stride, int nx, float *y,
                                     size_t y_stride) {
    gemm_mmla(EK_TYPE_Q4_0, n, w, w_stride, nrows, x, x_stride, nx, y, y_stride,
              gemm_q4_0_q8_0_neon_dotprod);
}

static void gemm_q4_1_q8_1_neon_i8mm(int n, const void *w, size_t w_stride, int nrows,
                                     const void *x, size_t x_stride, int nx, float *y,
                                     size_t y_stride) {
    gemm_mmla(EK_TYPE_Q4_1, n, w, w_stride, nrows, x, x_stride, nx, y, y_stride,
              gemm_q4_1_q8_1_neon_dotprod);
}

static void gemm_q8_0_q8_0_neon_i8mm(int n, const void *w, size_t w_stride, int nrows,
                                     const void *x, size_t x_stride, int nx, float *y,
                                     size_t y_stride) {
    gemm_mmla(EK_TYPE_Q8_0, n, w, w_stride, nrows, x, x_stride, nx, y, y_stride,
              gemm_q8_0_q8_0_neon_dotprod);
}

static void gemm_q5_0_q8_0_neon_i8mm(int n, const void *w, size_t w_stride, int nrows,
                                     const void *x, size_t x_stride, int nx, float *y,
                                     size_t y_stride) {
    gemm_mmla(EK_TYPE_Q5_0, n, w, w_stride, nrows, x, x_stride, nx, y, y_stride,
              gemm_q5_0_q8_0_neon_dotprod);
}

static void gemm_q5_1_q8_1_neon_i8mm(int n, const void *w, size_t w_stride, int nrows,
                                     const void *x, size_t x_stride, int nx, float *y,
                                     size_t y_stride) {
    gemm_mmla(EK_TYPE_Q5_1, n, w, w_stride, nrows, x, x_stride, nx, y, y_stride,
              gemm_q5_1_q8_1_neon_dotprod);
}

static void gemm_iq4_nl_q8_0_neon_i8mm(int n, const void *w, size_t w_stride, int nrows,
                                       const void *x, size_t x_stride, int nx, float *y,
                                       size_t y_stride) {
    gemm_mmla(EK_TYPE_IQ4_NL, n, w, w_stride, nrows, x, x_stride, nx, y, y_stride,
              gemm_iq4_nl_q8_0_neon_dotprod);
}

/* The K-quants take the dotprod gemms whole: the boards this targets
 * (Cortex-A72, A76) have no i8mm, and an smmla tile for them (both
 * operands interleaved, per-sub-block scales for each pair of rows) is
 * not written yet. */
#define gemm_q4_K_q8_K_neon_i8mm gemm_q4_K_q8_K_neon_dotprod
#define gemm_q5_K_q8_K_neon_i8mm gemm_q5_K_q8_K_neon_dotprod
#define gemm_q6_K_q8_K_neon_i8mm gemm_q6_K_q8_K_neon_dotprod

/* ---- the x8 layout ----
 * Each 16-byte load holds the same 4 columns of 4 rows (row i in 32-bit
 * lane i), so one zip of two such loads gives smmla its two rows' 8
 * consecutive bytes: lanes 0 and 1 of the zip are row 0, lanes 2 and 3
 * row 1. */

EK_INLINE int8x16_t zip_lo32(int8x16_t a, int8x16_t b) {
    return vreinterpretq_s8_s32(vzip1q_s32(vreinterpretq_s32_s8(a), vreinterpretq_s32_s8(b)));
}

EK_INLINE int8x16_t zip_hi32(int8x16_t a, int8x16_t b) {
    return vreinterpretq_s8_s32(vzip2q_s32(vreinterpretq_s32_s8(a), vreinterpretq_s32_s8(b)));
}

/* Rows 2p and 2p+1 of a group's block, as mmla_block wants them. */
EK_INLINE block_pair x8_pair(const int wtype, const uint8_t *q, int p) {
    const int h = p / 2; /* which 16 bytes of a run: rows 0..3 or 4..7 */
    int8x16_t r[8];      /* the block's runs, this half of them */
    const int runs = wtype == EK_TYPE_Q8_0 ? 8 : 4;
    for (int c = 0; c < runs; c++) r[c] = vld1q_s8((const int8_t *)q + 32 * c + 16 * h);
    block_pair out;
    if (wtype == EK_TYPE_Q8_0) {
        for (int k = 0; k < 4; k++)
            out.v[k] = p % 2 ? zip_hi32(r[2 * k], r[2 * k + 1]) : zip_lo32(r[2 * k], r[2 * k + 1]);
        return out;
    }
    const int8x16_t offset = vdupq_n_s8(wtype == EK_TYPE_Q4_0 ? 8 : 0);
    for (int k = 0; k < 2; k++) {
        const uint8x16_t bytes = vreinterpretq_u8_s8(
            p % 2 ? zip_hi32(r[2 * k], r[2 * k + 1]) : zip_lo32(r[2 * k], r[2 * k + 1]));
        out.v[k] = vsubq_s8(vreinterpretq_s8_u8(vandq_u8(bytes, vdupq_n_u8(0x0f))), offset);
        out.v[2 + k] = vsubq_s8(vreinterpretq_s8_u8(vshrq_n_u8(bytes, 4)), offset);
    }
    return out;
}

/* A group's 8 rows by CP pairs of activation rows. */
EK_INLINE void gemm_x8_tile_mmla(const int wtype, const int CP, int nb, const char *g,
                                 const char *x, size_t x_stride, float *y, size_t y_stride) {
    float32x4_t acc[4][2];
#pragma GCC unroll 4
    for (int p = 0; p < 4; p++)
#pragma GCC unroll 2
        for (int c = 0; c < CP; c++) acc[p][c] = vdupq_n_f32(0.0f);
    const size_t step = ek_x8_step_bytes(wtype);

    for (int b = 0; b < nb; b++) {
        const char *ahead = g + PREFETCH_BYTES + b * step;
        for (size_t line = 0; line < step; line += 64) __builtin_prefetch(ahead + line);
        const uint8_t *q = ek_x8_quants(wtype, g, nb, b);
        const ek_f16 *dm = ek_x8_d(wtype, g, b);
        block_pair wp[4];
        float32x4_t dw[4], mw[4]; /* [row 0, row 0, row 1, row 1] of each pair */
#pragma GCC unroll 4
        for (int p = 0; p < 4; p++) wp[p] = x8_pair(wtype, q, p);
#pragma GCC unroll 2
        for (int h = 0; h < 2; h++) {
            const float32x4_t d4 = vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(dm + 4 * h)));
            dw[2 * h] = vzip1q_f32(d4, d4);
            dw[2 * h + 1] = vzip2q_f32(d4, d4);
            const float32x4_t m4 =
                wtype == EK_TYPE_Q4_1
                    ? vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(dm + EK_X8_ROWS + 4 * h)))
                    : vdupq_n_f32(0.0f);
            mw[2 * h] = vzip1q_f32(m4, m4);
            mw[2 * h + 1] = vzip2q_f32(m4, m4);
        }
#pragma GCC unroll 2
        for (int c = 0; c < CP; c++) {
            float32x4_t dx, s; /* [col 0, col 1, col 0, col 1] */
            const block_pair xp = act_pair(wtype, x + 2 * c * x_stride, x_stride, b, &dx, &s);
#pragma GCC unroll 4
            for (int p = 0; p < 4; p++) {
                const float32x4_t sum = vcvtq_f32_s32(mmla_block(wp[p], xp));
                acc[p][c] = vfmaq_f32(acc[p][c], sum, vmulq_f32(dw[p], dx));
                if (wtype == EK_TYPE_Q4_1) acc[p][c] = vfmaq_f32(acc[p][c], mw[p], s);
            }
        }
    }

    for (int p = 0; p < 4; p++)
        for (int c = 0; c < CP; c++) {
            float *y00 = y + 2 * c * y_stride + 2 * p, *y01 = y00 + y_stride;
            y00[0] = vgetq_lane_f32(acc[p][c], 0);
            y01[0] = vgetq_lane_f32(acc[p][c], 1);
            y00[1] = vgetq_lane_f32(acc[p][c], 2);
            y01[1] = vgetq_lane_f32(acc[p][c], 3);
        }
}

/* The x8 gemm: one activation row (decode), and an odd last one, go to the
 * dotprod x8 gemm, as in the file's layout above. */
EK_INLINE void gemm_x8_mmla(const int wtype, int n, const void *w, size_t w_stride, int nrows,
                            const void *x, size_t x_stride, int nx, float *y, size_t y_stride,
                            ek_gemm_fn thin, ek_gemm_fn rest) {
    if (nx < 2) {
        thin(n, w, w_stride, nrows, x, x_stride, nx, y, y_stride);
        return;
    }
    const char *wr = w, *xr = x;
    const int nb = n / EK_QK, whole = nrows / EK_X8_ROWS * EK_X8_ROWS;
    for (int i = 0; i < whole; i += EK_X8_ROWS) {
        const char *g = wr + i * w_stride;
        int j = 0;
        for (; j + 4 <= nx; j += 4)
            gemm_x8_tile_mmla(wtype, 2, nb, g, xr + j * x_stride, x_stride, y + j * y_stride + i,
                              y_stride);
        if (nx - j >= 2) {
            gemm_x8_tile_mmla(wtype, 1, nb, g, xr + j * x_stride, x_stride, y + j * y_stride + i,
                              y_stride);
            j += 2;
        }
        if (j < nx)
            thin(n, g, w_stride, EK_X8_ROWS, xr + j * x_stride, x_stride, 1,
                 y + j * y_stride + i, y_stride);
    }
    if (whole < nrows) /* the rows past the last group are in the file's layout */
        rest(n, wr + whole * w_stride, w_stride, nrows - whole, x, x_stride, nx, y + whole,
             y_stride);
}

#define EK_I8MM_X8_ENTRY(name, wtype, thin, rest)                                           \
    static void name(int n, const void *w, size_t w_stride, int nrows, const void *x,       \
                     size_t x_stride, int nx, float *y, size_t y_stride) {                  \
        gemm_x8_mmla(wtype, n, w, w_stride, nrows, x, x_stride, nx, y, y_stride, thin, rest); \
    }

EK_I8MM_X8_ENTRY(gemm_x8_q4_0_q8_0_neon_i8mm, EK_TYPE_Q4_0, gemm_x8_q4_0_q8_0_neon_dotprod,
                 gemm_q4_0_q8_0_neon_i8mm)
EK_I8MM_X8_ENTRY(gemm_x8_q4_1_q8_1_neon_i8mm, EK_TYPE_Q4_1, gemm_x8_q4_1_q8_1_neon_dotprod,
                 gemm_q4_1_q8_1_neon_i8mm)
EK_I8MM_X8_ENTRY(gemm_x8_q8_0_q8_0_neon_i8mm, EK_TYPE_Q8_0, gemm_x8_q8_0_q8_0_neon_dotprod,
                 gemm_q8_0_q8_0_neon_i8mm)

const ek_kernels ek_kernels_neon_i8mm = {
    .name = "neon_i8mm",
    .types = {EK_NEON_TYPE_OPS(neon_i8mm)},
    EK_NEON_FLOAT_OPS,
};
