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

/* ---- IQ4_NL's grid ---- */

const int8_t ek_iq4nl_values[16] = {-127, -104, -83, -65, -49, -35, -22, -10,
                                    1,    13,   25,  38,  53,  69,  89,  113};

/* ---- sizes ---- */

int ek_type_block_elems(int type) {
    switch (type) {
    case EK_TYPE_F32: case EK_TYPE_F16: return 1;
    case EK_TYPE_Q4_0: case EK_TYPE_Q4_1: case EK_TYPE_Q5_0: case EK_TYPE_Q5_1:
    case EK_TYPE_Q8_0: case EK_TYPE_Q8_1: case EK_TYPE_IQ4_NL: return EK_QK;
    case EK_TYPE_Q4_K: case EK_TYPE_Q5_K: case EK_TYPE_Q6_K: case EK_TYPE_Q8_K: return EK_QK_K;
    default: return 0;
    }
}

size_t ek_type_block_bytes(int type) {
    switch (type) {
    case EK_TYPE_F32: return sizeof(float);
    case EK_TYPE_F16: return sizeof(ek_f16);
    case EK_TYPE_Q4_0: return sizeof(block_q4_0);
    case EK_TYPE_Q4_1: return sizeof(block_q4_1);
    case EK_TYPE_Q5_0: return sizeof(block_q5_0);
    case EK_TYPE_Q5_1: return sizeof(block_q5_1);
    case EK_TYPE_Q8_0: return sizeof(block_q8_0);
    case EK_TYPE_Q8_1: return sizeof(block_q8_1);
    case EK_TYPE_Q4_K: return sizeof(block_q4_K);
    case EK_TYPE_Q5_K: return sizeof(block_q5_K);
    case EK_TYPE_Q6_K: return sizeof(block_q6_K);
    case EK_TYPE_Q8_K: return sizeof(block_q8_K);
    case EK_TYPE_IQ4_NL: return sizeof(block_iq4_nl);
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

/* Q8_K, as ggml makes it, so K-quant dot products agree with llama.cpp's:
 * the scale comes from the element of largest magnitude, sign included,
 * as iscale = -127 / max (that element becomes -127 exactly, whatever its
 * sign), quants round half to even (rintf in the default rounding mode,
 * which is what ggml's nearest_int computes) and d is stored as 1 / iscale,
 * not as -max / 127 (the two may differ in the last bit). |iscale * x| <= 127
 * (up to one rounding, which rintf absorbs), so every quant fits. */
void quantize_row_q8_K_ref(const float *x, void *vy, int n) {
    block_q8_K *y = vy;
    for (int b = 0; b < n / EK_QK_K; b++, x += EK_QK_K) {
        float amax = 0.0f, max = 0.0f;
        for (int j = 0; j < EK_QK_K; j++)
            if (fabsf(x[j]) > amax) {
                amax = fabsf(x[j]);
                max = x[j];
            }
        if (amax == 0.0f) { /* all zero: d = 0, quants and sums 0 */
            memset(&y[b], 0, sizeof y[b]);
            continue;
        }
        float iscale = -127.0f / max;
        for (int j = 0; j < EK_QK_K; j++) y[b].qs[j] = (int8_t)rintf(iscale * x[j]);
        for (int g = 0; g < EK_QK_K / 16; g++) {
            int sum = 0;
            for (int j = 0; j < 16; j++) sum += y[b].qs[16 * g + j];
            y[b].bsums[g] = (int16_t)sum;
        }
        y[b].d = 1.0f / iscale;
    }
}

/* ---- unpacking the 5-bit, IQ4_NL and K-quant blocks ----
 * One function per layout turns a block's packed bits into one quant per
 * element, in element order; the dequantizers and the dot products below
 * both start from it, so the layout is written down once. */

/* Q5_0 and Q5_1: the low 4 bits as Q4's nibbles (low nibbles elements
 * 0..15, high 16..31), bit 4 of element j is bit j of qh, little-endian. */
static void unpack_q5(const uint8_t qs[EK_QK / 2], const uint8_t qh[4], uint8_t q[EK_QK]) {
    uint32_t h = (uint32_t)qh[0] | (uint32_t)qh[1] << 8 | (uint32_t)qh[2] << 16 |
                 (uint32_t)qh[3] << 24;
    for (int j = 0; j < EK_QK / 2; j++) {
        q[j] = (uint8_t)((qs[j] & 0x0f) | ((h >> j) & 1) << 4);
        q[j + EK_QK / 2] = (uint8_t)((qs[j] >> 4) | ((h >> (j + EK_QK / 2)) & 1) << 4);
    }
}

/* IQ4_NL: Q4's nibbles (low nibbles elements 0..15, high 16..31), each
 * an index into the grid. */
static void unpack_iq4_nl(const uint8_t qs[EK_QK / 2], int8_t q[EK_QK]) {
    for (int j = 0; j < EK_QK / 2; j++) {
        q[j] = ek_iq4nl_values[qs[j] & 0x0f];
        q[j + EK_QK / 2] = ek_iq4nl_values[qs[j] >> 4];
    }
}

/* Q4_K and Q5_K scales: sub-block j's 6-bit scale sc[j] and min mn[j].
 * Bytes 0..3 hold scales 0..3 in their low 6 bits, bytes 4..7 mins 0..3;
 * for j = 4..7 the low 4 bits are the nibbles of byte j + 4 (scale low,
 * min high) and the top 2 bits the top bits of bytes j - 4 (scale) and j
 * (min). */
static void unpack_k_scales(const uint8_t s[EK_K_SCALE_BYTES], int sc[8], int mn[8]) {
    for (int j = 0; j < 4; j++) {
        sc[j] = s[j] & 0x3f;
        mn[j] = s[j + 4] & 0x3f;
        sc[j + 4] = (s[j + 8] & 0x0f) | (s[j] >> 6) << 4;
        mn[j + 4] = (s[j + 8] >> 4) | (s[j + 4] >> 6) << 4;
    }
}

/* Q4_K: element i is in sub-block i / 32; each 64 elements share 32 bytes
 * of qs, the first 32 in the low nibbles, the next 32 in the high. */
static int q4_K_nibble(const uint8_t *qs, int i) {
    return (qs[i / 64 * 32 + i % 32] >> (4 * (i / 32 % 2))) & 0x0f;
}

static void unpack_q4_K(const block_q4_K *b, uint8_t q[EK_QK_K]) {
    for (int i = 0; i < EK_QK_K; i++) q[i] = (uint8_t)q4_K_nibble(b->qs, i);
}

/* Q5_K: Q4_K's nibbles, and bit 4 of element i is bit i / 32 (its
 * sub-block) of qh[i % 32]. */
static void unpack_q5_K(const block_q5_K *b, uint8_t q[EK_QK_K]) {
    for (int i = 0; i < EK_QK_K; i++)
        q[i] = (uint8_t)(q4_K_nibble(b->qs, i) | ((b->qh[i % 32] >> (i / 32)) & 1) << 4);
}

/* Q6_K, q - 32 in -32..31: each half of 128 elements has 64 bytes of ql
 * and 32 of qh. Of its four quarters k of 32 (element l of each), quarter
 * k takes its low 4 bits from ql[l + 32 * (k % 2)], low nibble for k < 2,
 * high for k >= 2, and its top 2 bits from bits 2k, 2k + 1 of qh[l]. */
static void unpack_q6_K(const block_q6_K *b, int8_t q[EK_QK_K]) {
    for (int i = 0; i < EK_QK_K; i++) {
        const uint8_t *ql = b->ql + i / 128 * 64, *qh = b->qh + i / 128 * 32;
        int k = i % 128 / 32, l = i % 32;
        int lo = (ql[l + 32 * (k % 2)] >> (4 * (k / 2))) & 0x0f;
        int hi = (qh[l] >> (2 * k)) & 3;
        q[i] = (int8_t)((lo | hi << 4) - 32);
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

void dequantize_row_iq4_nl_ref(const void *vx, float *y, int n) {
    const block_iq4_nl *x = vx;
    int8_t q[EK_QK];
    for (int b = 0; b < n / EK_QK; b++) {
        float d = ek_f16_to_f32(x[b].d);
        unpack_iq4_nl(x[b].qs, q);
        for (int j = 0; j < EK_QK; j++) y[b * EK_QK + j] = d * q[j];
    }
}

void dequantize_row_q5_0_ref(const void *vx, float *y, int n) {
    const block_q5_0 *x = vx;
    uint8_t q[EK_QK];
    for (int b = 0; b < n / EK_QK; b++) {
        float d = ek_f16_to_f32(x[b].d);
        unpack_q5(x[b].qs, x[b].qh, q);
        for (int j = 0; j < EK_QK; j++) y[b * EK_QK + j] = d * (q[j] - 16);
    }
}

void dequantize_row_q5_1_ref(const void *vx, float *y, int n) {
    const block_q5_1 *x = vx;
    uint8_t q[EK_QK];
    for (int b = 0; b < n / EK_QK; b++) {
        float d = ek_f16_to_f32(x[b].d), m = ek_f16_to_f32(x[b].m);
        unpack_q5(x[b].qs, x[b].qh, q);
        for (int j = 0; j < EK_QK; j++) y[b * EK_QK + j] = d * q[j] + m;
    }
}

/* Q4_K and Q5_K, once unpacked: x = (d * sc) * q - dmin * mn per sub-block
 * of 32, the products in this order as ggml's reader (and gguf-py) take them. */
static void dequantize_k_minned(ek_f16 d16, ek_f16 dmin16, const uint8_t *scales,
                                const uint8_t q[EK_QK_K], float *y) {
    float d = ek_f16_to_f32(d16), dmin = ek_f16_to_f32(dmin16);
    int sc[8], mn[8];
    unpack_k_scales(scales, sc, mn);
    for (int s = 0; s < 8; s++) {
        float ds = d * sc[s], ms = dmin * mn[s];
        for (int l = 0; l < 32; l++) y[32 * s + l] = ds * q[32 * s + l] - ms;
    }
}

void dequantize_row_q4_K_ref(const void *vx, float *y, int n) {
    const block_q4_K *x = vx;
    uint8_t q[EK_QK_K];
    for (int b = 0; b < n / EK_QK_K; b++) {
        unpack_q4_K(&x[b], q);
        dequantize_k_minned(x[b].d, x[b].dmin, x[b].scales, q, y + b * EK_QK_K);
    }
}

void dequantize_row_q5_K_ref(const void *vx, float *y, int n) {
    const block_q5_K *x = vx;
    uint8_t q[EK_QK_K];
    for (int b = 0; b < n / EK_QK_K; b++) {
        unpack_q5_K(&x[b], q);
        dequantize_k_minned(x[b].d, x[b].dmin, x[b].scales, q, y + b * EK_QK_K);
    }
}

/* Q6_K: x = (d * scales[i / 16]) * (q - 32). */
void dequantize_row_q6_K_ref(const void *vx, float *y, int n) {
    const block_q6_K *x = vx;
    int8_t q[EK_QK_K];
    for (int b = 0; b < n / EK_QK_K; b++) {
        float d = ek_f16_to_f32(x[b].d);
        unpack_q6_K(&x[b], q);
        for (int i = 0; i < EK_QK_K; i++) y[b * EK_QK_K + i] = d * x[b].scales[i / 16] * q[i];
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

static float dot_iq4_nl_q8_0(int n, const block_iq4_nl *w, const block_q8_0 *x) {
    float sum = 0.0f;
    int8_t q[EK_QK];
    for (int b = 0; b < n / EK_QK; b++) {
        unpack_iq4_nl(w[b].qs, q);
        int acc = 0;
        for (int j = 0; j < EK_QK; j++) acc += q[j] * x[b].qs[j];
        sum += ek_f16_to_f32(w[b].d) * ek_f16_to_f32(x[b].d) * (float)acc;
    }
    return sum;
}

static float dot_q5_0_q8_0(int n, const block_q5_0 *w, const block_q8_0 *x) {
    float sum = 0.0f;
    uint8_t q[EK_QK];
    for (int b = 0; b < n / EK_QK; b++) {
        unpack_q5(w[b].qs, w[b].qh, q);
        int acc = 0;
        for (int j = 0; j < EK_QK; j++) acc += (q[j] - 16) * x[b].qs[j];
        sum += ek_f16_to_f32(w[b].d) * ek_f16_to_f32(x[b].d) * (float)acc;
    }
    return sum;
}

static float dot_q5_1_q8_1(int n, const block_q5_1 *w, const block_q8_1 *x) {
    float sum = 0.0f;
    uint8_t q[EK_QK];
    for (int b = 0; b < n / EK_QK; b++) {
        unpack_q5(w[b].qs, w[b].qh, q);
        int acc = 0;
        for (int j = 0; j < EK_QK; j++) acc += q[j] * x[b].qs[j];
        sum += ek_f16_to_f32(w[b].d) * x[b].d * (float)acc + ek_f16_to_f32(w[b].m) * x[b].s;
    }
    return sum;
}

/* One Q4_K or Q5_K super-block, unpacked, with one Q8_K block: in integers
 * sum_s sc[s] * (q . x over sub-block s), then scaled by d * x.d; the min
 * terms need no pass over the quants, as x's sums of each 16 give
 * sum_s mn[s] * (sum of x's quants over s). Both sums stay far inside an
 * int (at most 63 * 31 * 127 * 256). */
static float dot_k_minned(ek_f16 d, ek_f16 dmin, const uint8_t *scales, const uint8_t q[EK_QK_K],
                          const block_q8_K *x) {
    int sc[8], mn[8];
    unpack_k_scales(scales, sc, mn);
    int sum_q = 0, sum_m = 0;
    for (int s = 0; s < 8; s++) {
        int acc = 0;
        for (int l = 0; l < 32; l++) acc += q[32 * s + l] * x->qs[32 * s + l];
        sum_q += sc[s] * acc;
        sum_m += mn[s] * (x->bsums[2 * s] + x->bsums[2 * s + 1]);
    }
    return ek_f16_to_f32(d) * x->d * (float)sum_q - ek_f16_to_f32(dmin) * x->d * (float)sum_m;
}

static float dot_q4_K_q8_K(int n, const block_q4_K *w, const block_q8_K *x) {
    float sum = 0.0f;
    uint8_t q[EK_QK_K];
    for (int b = 0; b < n / EK_QK_K; b++) {
        unpack_q4_K(&w[b], q);
        sum += dot_k_minned(w[b].d, w[b].dmin, w[b].scales, q, &x[b]);
    }
    return sum;
}

static float dot_q5_K_q8_K(int n, const block_q5_K *w, const block_q8_K *x) {
    float sum = 0.0f;
    uint8_t q[EK_QK_K];
    for (int b = 0; b < n / EK_QK_K; b++) {
        unpack_q5_K(&w[b], q);
        sum += dot_k_minned(w[b].d, w[b].dmin, w[b].scales, q, &x[b]);
    }
    return sum;
}

/* Q6_K: sum over the 16 sub-blocks of scales[s] * (q . x), in integers
 * (at most 128 * 32 * 127 * 256), scaled by d * x.d. */
static float dot_q6_K_q8_K(int n, const block_q6_K *w, const block_q8_K *x) {
    float sum = 0.0f;
    int8_t q[EK_QK_K];
    for (int b = 0; b < n / EK_QK_K; b++) {
        unpack_q6_K(&w[b], q);
        int sum_q = 0;
        for (int s = 0; s < EK_QK_K / 16; s++) {
            int acc = 0;
            for (int l = 0; l < 16; l++) acc += q[16 * s + l] * x[b].qs[16 * s + l];
            sum_q += w[b].scales[s] * acc;
        }
        sum += ek_f16_to_f32(w[b].d) * x[b].d * (float)sum_q;
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
DEFINE_GEMM_REF(gemm_iq4_nl_q8_0_ref, block_iq4_nl, block_q8_0, dot_iq4_nl_q8_0)
DEFINE_GEMM_REF(gemm_q5_0_q8_0_ref, block_q5_0, block_q8_0, dot_q5_0_q8_0)
DEFINE_GEMM_REF(gemm_q5_1_q8_1_ref, block_q5_1, block_q8_1, dot_q5_1_q8_1)
DEFINE_GEMM_REF(gemm_q8_0_q8_0_ref, block_q8_0, block_q8_0, dot_q8_0_q8_0)
DEFINE_GEMM_REF(gemm_q4_K_q8_K_ref, block_q4_K, block_q8_K, dot_q4_K_q8_K)
DEFINE_GEMM_REF(gemm_q5_K_q8_K_ref, block_q5_K, block_q8_K, dot_q5_K_q8_K)
DEFINE_GEMM_REF(gemm_q6_K_q8_K_ref, block_q6_K, block_q8_K, dot_q6_K_q8_K)
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
