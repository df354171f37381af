/* The tiling shared by every SIMD gemm: how a weight matrix and a batch of
 * activation rows are cut into tiles of up to TILE_ROWS x TILE_COLS, and how
 * far ahead weight rows are prefetched. Each architecture's gemm header
 * includes this after its helpers (EK_INLINE) and then defines gemm_tile,
 * the one function that differs. */
#ifndef EDGE_KERNELS_GEMM_TILING_H
#define EDGE_KERNELS_GEMM_TILING_H

#include <stddef.h>

#define TILE_ROWS 4 /* weight rows per tile */
#define TILE_COLS 4 /* activation rows per tile */

#include "prefetch.h"

/* From a weight row to the one about PREFETCH_BYTES on, in whole tiles. */
EK_INLINE size_t prefetch_ahead(size_t w_stride) {
    size_t rows = (PREFETCH_BYTES / w_stride + TILE_ROWS - 1) / TILE_ROWS * TILE_ROWS;
    return (rows ? rows : TILE_ROWS) * w_stride;
}

/* The float gemm's scalar tail: elements k..n-1 of one f32 or f16 weight row
 * against one activation row, added to sum in order. */
EK_INLINE float add_tail_f(float sum, const int wtype, const char *row, const float *x, int k,
                           int n) {
    for (int t = k; t < n; t++)
        sum += (wtype == EK_TYPE_F16 ? f16_to_f32(((const ek_f16 *)row)[t])
                                     : ((const float *)row)[t]) * x[t];
    return sum;
}

/* RW weight rows by RX activation rows; defined by the including header. */
EK_INLINE void gemm_tile(const int wtype, const int RW, const int RX, int n, const char *w,
                         size_t w_stride, const char *x, size_t x_stride, float *y,
                         size_t y_stride);

/* RW weight rows against all nx activation rows. */
EK_INLINE void gemm_rows(const int wtype, const int RW, int n, const char *w, size_t w_stride,
                         const char *x, size_t x_stride, int nx, float *y, size_t y_stride) {
    int j = 0;
    for (; j + TILE_COLS <= nx; j += TILE_COLS)
        gemm_tile(wtype, RW, TILE_COLS, n, w, w_stride, x + j * x_stride, x_stride,
                  y + j * y_stride, y_stride);
    const char *xt = x + j * x_stride;
    float *yt = y + j * y_stride;
    switch (nx - j) {
    case 3: gemm_tile(wtype, RW, 3, n, w, w_stride, xt, x_stride, yt, y_stride); break;
    case 2: gemm_tile(wtype, RW, 2, n, w, w_stride, xt, x_stride, yt, y_stride); break;
    case 1: gemm_tile(wtype, RW, 1, n, w, w_stride, xt, x_stride, yt, y_stride); break;
    default: break;
    }
}

/* The whole gemm: full tiles of weight rows, then one narrower tile. */
EK_INLINE void gemm_tiled(const int wtype, int n, const void *w, size_t w_stride, int nrows,
                          const void *x, size_t x_stride, int nx, float *y, size_t y_stride) {
    const char *wr = w;
    int i = 0;
    for (; i + TILE_ROWS <= nrows; i += TILE_ROWS)
        gemm_rows(wtype, TILE_ROWS, n, wr + i * w_stride, w_stride, x, x_stride, nx, y + i,
                  y_stride);
    const char *wt = wr + i * w_stride;
    switch (nrows - i) {
    case 3: gemm_rows(wtype, 3, n, wt, w_stride, x, x_stride, nx, y + i, y_stride); break;
    case 2: gemm_rows(wtype, 2, n, wt, w_stride, x, x_stride, nx, y + i, y_stride); break;
    case 1: gemm_rows(wtype, 1, n, wt, w_stride, x, x_stride, nx, y + i, y_stride); break;
    default: break;
    }
}

/* A kernel-table entry: the whole gemm for one weight type. Each SIMD file
 * names its entries, e.g. EK_GEMM_ENTRY(gemm_q4_1_q8_1_neon, EK_TYPE_Q4_1). */
#define EK_GEMM_ENTRY(name, wtype)                                                          \
    void name(int n, const void *w, size_t w_stride, int nrows, const void *x,              \
              size_t x_stride, int nx, float *y, size_t y_stride) {                         \
        gemm_tiled(wtype, n, w, w_stride, nrows, x, x_stride, nx, y, y_stride);             \
    }

#endif
