/* The gemm over the x8 layout, shared like gemm_tiling.h by every SIMD
 * table that has one: each group of 8 rows is multiplied by the activation
 * rows TILE_COLS at a time, and the rows past the last group, which keep
 * the file's layout, by the tiled gemm. The including header defines
 * gemm_x8_tile after including gemm_tiling.h. */
#ifndef EDGE_KERNELS_X8_TILING_H
#define EDGE_KERNELS_X8_TILING_H

#include "gemm_tiling.h"

/* A group of the x8 layout (8 rows) by RX activation rows; defined by the
 * including header. */
EK_INLINE void gemm_x8_tile(const int wtype, const int RX, int nb, const char *g, const char *x,
                            size_t x_stride, float *y, size_t y_stride);

/* The whole gemm over the x8 layout. */
EK_INLINE void gemm_x8_tiled(const int wtype, int n, const void *w, size_t w_stride, int nrows,
                             const void *x, size_t x_stride, int nx, float *y, size_t y_stride) {
    const char *wr = w, *xr = x;
    const int nb = n / EK_QK, whole = nrows / EK_X8_ROWS * EK_X8_ROWS;
    for (int i = 0; i < whole; i += EK_X8_ROWS) {
        const char *g = wr + i * w_stride;
        int j = 0;
        for (; j + TILE_COLS <= nx; j += TILE_COLS)
            gemm_x8_tile(wtype, TILE_COLS, nb, g, xr + j * x_stride, x_stride, y + j * y_stride + i,
                         y_stride);
        const char *xt = xr + j * x_stride;
        float *yt = y + j * y_stride + i;
        switch (nx - j) {
        case 3: gemm_x8_tile(wtype, 3, nb, g, xt, x_stride, yt, y_stride); break;
        case 2: gemm_x8_tile(wtype, 2, nb, g, xt, x_stride, yt, y_stride); break;
        case 1: gemm_x8_tile(wtype, 1, nb, g, xt, x_stride, yt, y_stride); break;
        default: break;
        }
    }
    if (whole < nrows)
        gemm_tiled(wtype, n, wr + whole * w_stride, w_stride, nrows - whole, x, x_stride, nx,
                   y + whole, y_stride);
}

/* A kernel-table entry, as EK_GEMM_ENTRY, over the x8 layout. */
#define EK_GEMM_X8_ENTRY(name, wtype)                                                       \
    void name(int n, const void *w, size_t w_stride, int nrows, const void *x,              \
              size_t x_stride, int nx, float *y, size_t y_stride) {                         \
        gemm_x8_tiled(wtype, n, w, w_stride, nrows, x, x_stride, nx, y, y_stride);          \
    }

#endif
