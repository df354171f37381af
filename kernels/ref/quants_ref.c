/* Scalar reference for the block formats: the specification the SIMD
 * versions are tested against. Written for clarity, not speed. */
#include <math.h>
#include <string.h>

#include "edge_kernels.h"
#include "ref.h"

/* ---- half precision, portable ---- */

float ek_f16_to_f32(ek_f16 h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16;
    uint32_t exp = (h >> 10) & 0x1f;
    uint32_t mant = h & 0x3ff;
    uint32_t bits;
    if (exp == 0) {
        if (mant == 0) {
            bits = sign;
        } else { /* subnormal: renormalise */
            exp = 127 - 15 + 1;
            while (!(mant & 0x400)) { mant <<= 1; exp--; }
            bits = sign | (exp << 23) | ((mant & 0x3ff) << 13);
        }
    } else if (exp == 0x1f) {
        bits = sign | 0x7f800000u | (mant << 13);
    } else {
        bits = sign | ((exp + 127 - 15) << 23) | (mant << 13);
    }
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

ek_f16 ek_f32_to_f16(float f) {
    uint32_t x;
    memcpy(&x, &f, sizeof x);
    uint32_t sign = (x >> 16) & 0x8000;
    uint32_t absx = x & 0x7fffffffu;
    if (absx >= 0x7f800000u) /* inf or nan */
        return (ek_f16)(sign | 0x7c00 | (absx > 0x7f800000u ? 0x200 : 0));
    if (absx >= 0x477ff000u) /* rounds past the largest half */
        return (ek_f16)(sign | 0x7c00);
    if (absx < 0x38800000u) { /* subnormal half or zero */
        if (absx < 0x33000000u) return (ek_f16)sign;
        uint32_t mant = (absx & 0x7fffff) | 0x800000;
        int shift = 113 - (int)(absx >> 23) + 13;
        uint32_t half = mant >> shift;
        uint32_t rem = mant & ((1u << shift) - 1);
        uint32_t mid = 1u << (shift - 1);
        if (rem > mid || (rem == mid && (half & 1))) half++;
        return (ek_f16)(sign | half);
    }
    uint32_t half = ((absx >> 13) - ((127 - 15) << 10));
    uint32_t rem = absx & 0x1fff;
    if (rem > 0x1000 || (rem == 0x1000 && (half & 1))) half++;
    return (ek_f16)(sign | half);
}

/* ---- sizes ---- */

int ek_type_block_elems(int type) {
    switch (type) {
    case EK_TYPE_F32: case EK_TYPE_F16: return 1;
    case EK_TYPE_Q4_0: case EK_TYPE_Q4_1: case EK_TYPE_Q8_0: case EK_TYPE_Q8_1: return EK_QK;
    default: return 0;
    }
}

size_t ek_type_block_bytes(int type) {
    switch (type) {
    case EK_TYPE_F32: return sizeof(float);
    case EK_TYPE_F16: return sizeof(ek_f16);
    case EK_TYPE_Q4_0: return sizeof(block_q4_0);
    case EK_TYPE_Q4_1: return sizeof(block_q4_1);
    case EK_TYPE_Q8_0: return sizeof(block_q8_0);
    case EK_TYPE_Q8_1: return sizeof(block_q8_1);
    default: return 0;
    }
}

size_t ek_row_bytes(int type, int64_t n) {
    int be = ek_type_block_elems(type);
    return be ? (size_t)(n / be) * ek_type_block_bytes(type) : 0;
}

/* ---- activation quantizers ---- */

/* One block to 8 bits: q = round(x / d) with d = max|x| / 127; returns d
 * and, through sum, the sum of the quants. */
static float quantize_block_q8(const float *x, int8_t *q, int *sum) {
    float amax = 0.0f;
    for (int j = 0; j < EK_QK; j++) amax = fmaxf(amax, fabsf(x[j]));
    float d = amax / 127.0f;
    float id = d ? 1.0f / d : 0.0f;
    *sum = 0;
    for (int j = 0; j < EK_QK; j++) {
        q[j] = (int8_t)roundf(x[j] * id);
        *sum += q[j];
    }
    return d;
}

void quantize_row_q8_0_ref(const float *x, void *vy, int n) {
    block_q8_0 *y = vy;
    int sum;
    for (int b = 0; b < n / EK_QK; b++)
        y[b].d = ek_f32_to_f16(quantize_block_q8(x + b * EK_QK, y[b].qs, &sum));
}

void quantize_row_q8_1_ref(const float *x, void *vy, int n) {
    block_q8_1 *y = vy;
    int sum;
    for (int b = 0; b < n / EK_QK; b++) {
        y[b].d = quantize_block_q8(x + b * EK_QK, y[b].qs, &sum);
        y[b].s = y[b].d * (float)sum;
    }
}

/* ---- dequantizers (embedding rows, tests) ---- */

void dequantize_row_q4_0_ref(const void *vx, float *y, int n) {
    const block_q4_0 *x = vx;
    for (int b = 0; b < n / EK_QK; b++) {
        float d = ek_f16_to_f32(x[b].d);
        for (int j = 0; j < EK_QK / 2; j++) {
            y[b * EK_QK + j] = d * ((x[b].qs[j] & 0x0f) - 8);
            y[b * EK_QK + j + EK_QK / 2] = d * ((x[b].qs[j] >> 4) - 8);
        }
    }
}

void dequantize_row_q4_1_ref(const void *vx, float *y, int n) {
    const block_q4_1 *x = vx;
    for (int b = 0; b < n / EK_QK; b++) {
        float d = ek_f16_to_f32(x[b].d), m = ek_f16_to_f32(x[b].m);
        for (int j = 0; j < EK_QK / 2; j++) {
            y[b * EK_QK + j] = d * (x[b].qs[j] & 0x0f) + m;
            y[b * EK_QK + j + EK_QK / 2] = d * (x[b].qs[j] >> 4) + m;
        }
    }
}

void dequantize_row_q8_0_ref(const void *vx, float *y, int n) {
    const block_q8_0 *x = vx;
    for (int b = 0; b < n / EK_QK; b++) {
        float d = ek_f16_to_f32(x[b].d);
        for (int j = 0; j < EK_QK; j++) y[b * EK_QK + j] = d * x[b].qs[j];
    }
}

void dequantize_row_f16_ref(const void *vx, float *y, int n) {
    const ek_f16 *x = vx;
    for (int i = 0; i < n; i++) y[i] = ek_f16_to_f32(x[i]);
}

void dequantize_row_f32_ref(const void *vx, float *y, int n) {
    memcpy(y, vx, (size_t)n * sizeof(float));
}

/* ---- dot products: one weight row with one activation row ---- */

static float dot_q4_0_q8_0(int n, const block_q4_0 *w, const block_q8_0 *x) {
    float sum = 0.0f;
    for (int b = 0; b < n / EK_QK; b++) {
        int acc = 0;
        for (int j = 0; j < EK_QK / 2; j++) {
            acc += ((w[b].qs[j] & 0x0f) - 8) * x[b].qs[j];
            acc += ((w[b].qs[j] >> 4) - 8) * x[b].qs[j + EK_QK / 2];
        }
        sum += ek_f16_to_f32(w[b].d) * ek_f16_to_f32(x[b].d) * (float)acc;
    }
    return sum;
}

static float dot_q4_1_q8_1(int n, const block_q4_1 *w, const block_q8_1 *x) {
    float sum = 0.0f;
    for (int b = 0; b < n / EK_QK; b++) {
        int acc = 0;
        for (int j = 0; j < EK_QK / 2; j++) {
            acc += (w[b].qs[j] & 0x0f) * x[b].qs[j];
            acc += (w[b].qs[j] >> 4) * x[b].qs[j + EK_QK / 2];
        }
        sum += ek_f16_to_f32(w[b].d) * x[b].d * (float)acc + ek_f16_to_f32(w[b].m) * x[b].s;
    }
    return sum;
}

static float dot_q8_0_q8_0(int n, const block_q8_0 *w, const block_q8_0 *x) {
    float sum = 0.0f;
    for (int b = 0; b < n / EK_QK; b++) {
        int acc = 0;
        for (int j = 0; j < EK_QK; j++) acc += w[b].qs[j] * x[b].qs[j];
        sum += ek_f16_to_f32(w[b].d) * ek_f16_to_f32(x[b].d) * (float)acc;
    }
    return sum;
}

static float dot_f16_f32(int n, const ek_f16 *w, const float *x) {
    float sum = 0.0f;
    for (int i = 0; i < n; i++) sum += ek_f16_to_f32(w[i]) * x[i];
    return sum;
}

static float dot_f32_f32(int n, const float *w, const float *x) {
    float sum = 0.0f;
    for (int i = 0; i < n; i++) sum += w[i] * x[i];
    return sum;
}

/* Each gemm is the same double loop around its dot product. */
#define DEFINE_GEMM_REF(name, wtype, xtype, dot)                                   \
    void name(int n, const void *w, size_t w_stride, int nrows, const void *x,   \
              size_t x_stride, int nx, float *y, size_t y_stride) {              \
        for (int j = 0; j < nx; j++) {                                             \
            const xtype *xr = (const xtype *)((const char *)x + j * x_stride);     \
            for (int i = 0; i < nrows; i++) {                                      \
                const wtype *wr = (const wtype *)((const char *)w + i * w_stride); \
                y[j * y_stride + i] = dot(n, wr, xr);                              \
            }                                                                      \
        }                                                                          \
    }

DEFINE_GEMM_REF(gemm_q4_0_q8_0_ref, block_q4_0, block_q8_0, dot_q4_0_q8_0)
DEFINE_GEMM_REF(gemm_q4_1_q8_1_ref, block_q4_1, block_q8_1, dot_q4_1_q8_1)
DEFINE_GEMM_REF(gemm_q8_0_q8_0_ref, block_q8_0, block_q8_0, dot_q8_0_q8_0)
DEFINE_GEMM_REF(gemm_f16_f32_ref, ek_f16, float, dot_f16_f32)
DEFINE_GEMM_REF(gemm_f32_f32_ref, float, float, dot_f32_f32)

/* The x8 gemms put each weight block back in the file's layout (once, for
 * every activation row) and dot it as the gemms above do, adding the
 * blocks' terms in the same order, so the two agree bit for bit. Rows past
 * the last whole group are in the file's layout already. */
#define DEFINE_GEMM_X8_REF(name, type, wtype, xtype, dot, gemm)                            \
    void name(int n, const void *w, size_t w_stride, int nrows, const void *x,             \
              size_t x_stride, int nx, float *y, size_t y_stride) {                        \
        const int nb = n / EK_QK, whole = nrows / EK_X8_ROWS * EK_X8_ROWS;                 \
        for (int i = 0; i < whole; i++) {                                                  \
            const char *group = (const char *)w + (size_t)(i / EK_X8_ROWS) * EK_X8_ROWS * w_stride; \
            for (int j = 0; j < nx; j++) y[j * y_stride + i] = 0.0f;                       \
            for (int b = 0; b < nb; b++) {                                                 \
                wtype blk;                                                                 \
                ek_x8_block(type, group, nb, i % EK_X8_ROWS, b, &blk);                     \
                for (int j = 0; j < nx; j++) {                                             \
                    const xtype *xr = (const xtype *)((const char *)x + j * x_stride);     \
                    y[j * y_stride + i] += dot(EK_QK, &blk, xr + b);                       \
                }                                                                          \
            }                                                                              \
        }                                                                                  \
        if (whole < nrows)                                                                 \
            gemm(n, (const char *)w + whole * w_stride, w_stride, nrows - whole, x, x_stride, \
                 nx, y + whole, y_stride);                                                 \
    }

DEFINE_GEMM_X8_REF(gemm_x8_q4_0_q8_0_ref, EK_TYPE_Q4_0, block_q4_0, block_q8_0, dot_q4_0_q8_0,
                   gemm_q4_0_q8_0_ref)
DEFINE_GEMM_X8_REF(gemm_x8_q4_1_q8_1_ref, EK_TYPE_Q4_1, block_q4_1, block_q8_1, dot_q4_1_q8_1,
                   gemm_q4_1_q8_1_ref)
DEFINE_GEMM_X8_REF(gemm_x8_q8_0_q8_0_ref, EK_TYPE_Q8_0, block_q8_0, block_q8_0, dot_q8_0_q8_0,
                   gemm_q8_0_q8_0_ref)
