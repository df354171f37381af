/* The NEON table with sdot (armv8.2-a+dotprod) for the integer dot
 * products; every other kernel is the plain NEON one. */
#define EK_NEON_DOTPROD 1
#include "gemm_neon.h"

void gemm_q4_0_q8_0_neon_dotprod(int n, const void *w, size_t w_stride, int nrows,
                                 const void *x, size_t x_stride, int nx, float *y,
                                 size_t y_stride) {
    gemm_tiled(EK_TYPE_Q4_0, n, w, w_stride, nrows, x, x_stride, nx, y, y_stride);
}

void gemm_q4_1_q8_1_neon_dotprod(int n, const void *w, size_t w_stride, int nrows,
                                 const void *x, size_t x_stride, int nx, float *y,
                                 size_t y_stride) {
    gemm_tiled(EK_TYPE_Q4_1, n, w, w_stride, nrows, x, x_stride, nx, y, y_stride);
}

void gemm_q8_0_q8_0_neon_dotprod(int n, const void *w, size_t w_stride, int nrows,
                                 const void *x, size_t x_stride, int nx, float *y,
                                 size_t y_stride) {
    gemm_tiled(EK_TYPE_Q8_0, n, w, w_stride, nrows, x, x_stride, nx, y, y_stride);
}

const ek_kernels ek_kernels_neon_dotprod = {
    .name = "neon_dotprod",
    .types = {EK_NEON_TYPE_OPS(gemm_q4_0_q8_0_neon_dotprod, gemm_q4_1_q8_1_neon_dotprod,
                                gemm_q8_0_q8_0_neon_dotprod)},
    EK_NEON_FLOAT_OPS,
};
