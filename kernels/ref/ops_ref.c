/* Scalar reference for the float ops of the forward pass. */
#include <math.h>

#include "edge_kernels.h"
#include "ref.h"

/* The sum of squares is kept in double, as llama.cpp does: this model's
 * residual stream has a few huge features, and a float sum's rounding,
 * amplified through 30 layers of 8-bit activations, is the largest single
 * source of disagreement between implementations. In double the order of
 * summation no longer matters, so every SIMD path gives the same scale. */
void rmsnorm_ref(float *out, const float *x, const float *w, int n, float eps) {
    double ss = 0.0;
    for (int i = 0; i < n; i++) ss += (double)(x[i] * x[i]);
    float scale = 1.0f / sqrtf((float)(ss / n) + eps);
    for (int i = 0; i < n; i++) out[i] = x[i] * scale * w[i];
}

void rope_ref(float *x, int n_heads, int head_dim, const float *cs) {
    for (int h = 0; h < n_heads; h++) {
        float *xh = x + h * head_dim;
        for (int i = 0; i < head_dim; i += 2) {
            float c = cs[i], s = cs[i + 1];
            float a = xh[i], b = xh[i + 1];
            xh[i] = a * c - b * s;
            xh[i + 1] = a * s + b * c;
        }
    }
}

void rope_neox_ref(float *x, int n_heads, int head_dim, const float *cs) {
    int half = head_dim / 2;
    for (int h = 0; h < n_heads; h++) {
        float *xh = x + h * head_dim;
        for (int i = 0; i < half; i++) {
            float c = cs[2 * i], s = cs[2 * i + 1];
            float a = xh[i], b = xh[i + half];
            xh[i] = a * c - b * s;
            xh[i + half] = a * s + b * c;
        }
    }
}

void silu_mul_ref(float *out, const float *gate, const float *up, int n) {
    for (int i = 0; i < n; i++) out[i] = gate[i] / (1.0f + expf(-gate[i])) * up[i];
}

/* GELU's tanh approximation, as Gemma was trained with and ggml computes it. */
void gelu_mul_ref(float *out, const float *gate, const float *up, int n) {
    const float sqrt_2_over_pi = 0.7978845608028654f, c = 0.044715f;
    for (int i = 0; i < n; i++) {
        float g = gate[i];
        out[i] = 0.5f * g * (1.0f + tanhf(sqrt_2_over_pi * g * (1.0f + c * g * g))) * up[i];
    }
}

void softmax_ref(float *x, int n) {
    float mx = -INFINITY;
    for (int i = 0; i < n; i++) mx = fmaxf(mx, x[i]);
    float sum = 0.0f;
    for (int i = 0; i < n; i++) {
        x[i] = expf(x[i] - mx);
        sum += x[i];
    }
    for (int i = 0; i < n; i++) x[i] /= sum;
}

void add_ref(float *x, const float *y, int n) {
    for (int i = 0; i < n; i++) x[i] += y[i];
}

/* One cached head vector as f32, whatever the cache type. */
static void kv_load(float *dst, const void *src, int n, int kv_type) {
    if (kv_type == EK_TYPE_F16)
        dequantize_row_f16_ref(src, dst, n);
    else
        dequantize_row_q8_0_ref(src, dst, n);
}

void kv_store_ref(void *dst, const float *src, int n, int kv_type) {
    if (kv_type == EK_TYPE_F16) {
        ek_f16 *d = dst;
        for (int i = 0; i < n; i++) d[i] = ek_f32_to_f16(src[i]);
    } else {
        quantize_row_q8_0_ref(src, dst, n);
    }
}

void attention_ref(float *out, const float *q, const void *k, const void *v, size_t kv_stride,
                   int kv_type, int n_pos, int head_dim, float scale, float *scores) {
    float row[512]; /* head_dim <= 512, checked by the model loader */
    for (int t = 0; t < n_pos; t++) {
        kv_load(row, (const char *)k + t * kv_stride, head_dim, kv_type);
        float s = 0.0f;
        for (int i = 0; i < head_dim; i++) s += q[i] * row[i];
        scores[t] = s * scale;
    }
    softmax_ref(scores, n_pos);
    for (int i = 0; i < head_dim; i++) out[i] = 0.0f;
    for (int t = 0; t < n_pos; t++) {
        kv_load(row, (const char *)v + t * kv_stride, head_dim, kv_type);
        for (int i = 0; i < head_dim; i++) out[i] += scores[t] * row[i];
    }
}

const ek_kernels ek_kernels_ref = {
    .name = "ref",
    .types = {EK_REF_TYPE_OPS},
    .rmsnorm = rmsnorm_ref,
    .rope = rope_ref,
    .silu_mul = silu_mul_ref,
    .gelu_mul = gelu_mul_ref,
    .rope_neox = rope_neox_ref,
    .softmax = softmax_ref,
    .add = add_ref,
    .attention = attention_ref,
    .kv_store = kv_store_ref,
};
