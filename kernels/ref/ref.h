/* Reference kernels, exported so SIMD tables can reuse the ones they do not
 * specialise and the C tests can call them directly. */
#ifndef EDGE_KERNELS_REF_H
#define EDGE_KERNELS_REF_H

#include "edge_kernels.h"

void quantize_row_q8_0_ref(const float *x, void *y, int n);
void quantize_row_q8_1_ref(const float *x, void *y, int n);
void quantize_row_q8_K_ref(const float *x, void *y, int n);

void dequantize_row_q4_0_ref(const void *x, float *y, int n);
void dequantize_row_q4_1_ref(const void *x, float *y, int n);
void dequantize_row_q5_0_ref(const void *x, float *y, int n);
void dequantize_row_iq4_nl_ref(const void *x, float *y, int n);
void dequantize_row_q5_1_ref(const void *x, float *y, int n);
void dequantize_row_q8_0_ref(const void *x, float *y, int n);
void dequantize_row_q4_K_ref(const void *x, float *y, int n);
void dequantize_row_q5_K_ref(const void *x, float *y, int n);
void dequantize_row_q6_K_ref(const void *x, float *y, int n);
void dequantize_row_f16_ref(const void *x, float *y, int n);
void dequantize_row_f32_ref(const void *x, float *y, int n);

void gemm_q4_0_q8_0_ref(int n, const void *w, size_t w_stride, int nrows, const void *x,
                        size_t x_stride, int nx, float *y, size_t y_stride);
void gemm_q4_1_q8_1_ref(int n, const void *w, size_t w_stride, int nrows, const void *x,
                        size_t x_stride, int nx, float *y, size_t y_stride);
void gemm_q5_0_q8_0_ref(int n, const void *w, size_t w_stride, int nrows, const void *x,
                        size_t x_stride, int nx, float *y, size_t y_stride);
void gemm_q5_1_q8_1_ref(int n, const void *w, size_t w_stride, int nrows, const void *x,
                        size_t x_stride, int nx, float *y, size_t y_stride);
void gemm_iq4_nl_q8_0_ref(int n, const void *w, size_t w_stride, int nrows, const void *x,
                          size_t x_stride, int nx, float *y, size_t y_stride);
void gemm_q8_0_q8_0_ref(int n, const void *w, size_t w_stride, int nrows, const void *x,
                        size_t x_stride, int nx, float *y, size_t y_stride);
void gemm_q4_K_q8_K_ref(int n, const void *w, size_t w_stride, int nrows, const void *x,
                        size_t x_stride, int nx, float *y, size_t y_stride);
void gemm_q5_K_q8_K_ref(int n, const void *w, size_t w_stride, int nrows, const void *x,
                        size_t x_stride, int nx, float *y, size_t y_stride);
void gemm_q6_K_q8_K_ref(int n, const void *w, size_t w_stride, int nrows, const void *x,
                        size_t x_stride, int nx, float *y, size_t y_stride);
void gemm_f16_f32_ref(int n, const void *w, size_t w_stride, int nrows, const void *x,
                      size_t x_stride, int nx, float *y, size_t y_stride);
void gemm_f32_f32_ref(int n, const void *w, size_t w_stride, int nrows, const void *x,
                      size_t x_stride, int nx, float *y, size_t y_stride);

void gemm_x8_q4_0_q8_0_ref(int n, const void *w, size_t w_stride, int nrows, const void *x,
                           size_t x_stride, int nx, float *y, size_t y_stride);
void gemm_x8_q4_1_q8_1_ref(int n, const void *w, size_t w_stride, int nrows, const void *x,
                           size_t x_stride, int nx, float *y, size_t y_stride);
void gemm_x8_q8_0_q8_0_ref(int n, const void *w, size_t w_stride, int nrows, const void *x,
                           size_t x_stride, int nx, float *y, size_t y_stride);

void rmsnorm_ref(float *out, const float *x, const float *w, int n, float eps);
void rope_ref(float *x, int n_heads, int head_dim, const float *cs);
void rope_neox_ref(float *x, int n_heads, int head_dim, const float *cs);
void silu_mul_ref(float *out, const float *gate, const float *up, int n);
void gelu_mul_ref(float *out, const float *gate, const float *up, int n);
void softmax_ref(float *x, int n);
void add_ref(float *x, const float *y, int n);
void attention_ref(float *out, const float *q, const void *k, const void *v, size_t kv_stride,
                   int kv_type, int n_pos, int head_dim, float scale, float *scores);
void kv_store_ref(void *dst, const float *src, int n, int kv_type);

/* The per-type entries of the reference table, for SIMD tables to start
 * from. The 5-bit types, IQ4_NL and the K-quants have no x8 layout
 * (gemm_x8 NULL). */
#define EK_REF_TYPE_OPS                                                                  \
    [EK_TYPE_F32] = {EK_TYPE_F32, NULL, gemm_f32_f32_ref, dequantize_row_f32_ref},       \
    [EK_TYPE_F16] = {EK_TYPE_F32, NULL, gemm_f16_f32_ref, dequantize_row_f16_ref},       \
    [EK_TYPE_Q4_0] = {EK_TYPE_Q8_0, quantize_row_q8_0_ref, gemm_q4_0_q8_0_ref,           \
                      dequantize_row_q4_0_ref, gemm_x8_q4_0_q8_0_ref},                   \
    [EK_TYPE_Q4_1] = {EK_TYPE_Q8_1, quantize_row_q8_1_ref, gemm_q4_1_q8_1_ref,           \
                      dequantize_row_q4_1_ref, gemm_x8_q4_1_q8_1_ref},                   \
    [EK_TYPE_Q5_0] = {EK_TYPE_Q8_0, quantize_row_q8_0_ref, gemm_q5_0_q8_0_ref,           \
                      dequantize_row_q5_0_ref, NULL},                                    \
    [EK_TYPE_Q5_1] = {EK_TYPE_Q8_1, quantize_row_q8_1_ref, gemm_q5_1_q8_1_ref,           \
                      dequantize_row_q5_1_ref, NULL},                                    \
    [EK_TYPE_Q8_0] = {EK_TYPE_Q8_0, quantize_row_q8_0_ref, gemm_q8_0_q8_0_ref,           \
                      dequantize_row_q8_0_ref, gemm_x8_q8_0_q8_0_ref},                   \
    [EK_TYPE_Q4_K] = {EK_TYPE_Q8_K, quantize_row_q8_K_ref, gemm_q4_K_q8_K_ref,           \
                      dequantize_row_q4_K_ref, NULL},                                    \
    [EK_TYPE_Q5_K] = {EK_TYPE_Q8_K, quantize_row_q8_K_ref, gemm_q5_K_q8_K_ref,           \
                      dequantize_row_q5_K_ref, NULL},                                    \
    [EK_TYPE_Q6_K] = {EK_TYPE_Q8_K, quantize_row_q8_K_ref, gemm_q6_K_q8_K_ref,           \
                      dequantize_row_q6_K_ref, NULL},                                    \
    [EK_TYPE_IQ4_NL] = {EK_TYPE_Q8_0, quantize_row_q8_0_ref, gemm_iq4_nl_q8_0_ref,       \
                        dequantize_row_iq4_nl_ref, NULL}

#endif
