/* Every kernel table usable on this CPU, checked against the reference.
 *
 * Sizes are chosen so every SIMD loop runs its tails: block rows from one
 * block to 129 (one super-block to 16 for the K-quants), float vectors of
 * 1 to 576 elements, gemm tiles with every leftover of rows and activation
 * rows, x8 groups with and without rows past the last group. Data is
 * random with a fixed seed. A table without a kernel for a weight type (a
 * NULL entry: SIMD versions not written yet) is skipped for that type,
 * with a line saying so.
 * Quantizers, stores, add and rmsnorm must match the reference exactly;
 * dot products may differ only by float summation order and exp by its
 * approximation, so they are held to a normalised mean squared error far
 * below what any real bug gives.
 *
 * The reference gemms are also held to their definition: the dot product
 * of the dequantized weights and the dequantized activations.
 *
 * Last, small random models run through the whole forward pass (weights
 * repacked, two slots, prompt chunks and batched decode) with every table,
 * held to the reference table's logits.
 *
 *   test_kernels [--expect NAME,NAME...] [--expect-best NAME]
 * fails unless each expected table is usable here (and, with --expect-best,
 * unless NAME is the one picked first), so a run under an emulated CPU
 * proves which paths it exercised. Prints one line per kernel and table;
 * exits non-zero on any failure.
 */
#define _POSIX_C_SOURCE 200112L /* setenv */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "edge_kernels.h"
#include "edge_model.h"
#include "../ref/ref.h"

#define TOL_DOT 1e-10 /* integer-exact dots, float ops without exp */
#define TOL_EXP 1e-9  /* ops through an exp approximation */
#define TOL_ATTENTION 1e-9 /* softmax through an exp approximation */
/* A whole pass re-quantizes activations at every matmul: a summation-order
 * difference can move one of them across a rounding boundary, and random
 * weights carry that on (seen: 4e-5). A broken kernel gives far more. */
#define TOL_FORWARD 1e-3
/* A quantized gemm against the unrounded activations: 8-bit rounding of
 * uniform values costs 1 / (4 * 127^2) = 1.5e-5 of the signal; a lost block
 * or a wrong min term costs 1e-2 or more. */
#define TOL_ROUNDING 1e-4

static const int BLOCK_SIZES[] = {32, 64, 96, 288, 576, 1536, 4096 + 32};
static const int K_SIZES[] = {256, 512, 768, 1536, 2304, 4096}; /* super-blocks of 256 */
static const int FLOAT_SIZES[] = {1, 2, 3, 7, 8, 9, 15, 16, 17, 31, 33, 63, 64, 65, 100, 257, 576};
static const int GEMM_ROWS[] = {1, 2, 3, 4, 5, 7, 8, 9, 17};
static const int GEMM_COLS[] = {1, 2, 3, 4, 5, 8, 9};
#define COUNT(a) ((int)(sizeof(a) / sizeof((a)[0])))

#define MAX_N (4096 + 32)
#define MAX_ROWS 17
#define MAX_COLS 9
#define PAD 40 /* bytes between rows, so strides are not mistaken for widths */

/* ---- random data ---- */

static uint64_t rng = 0x2545f4914f6cdd1dull;

static uint32_t rand_u32(void) { /* xorshift64* */
    rng ^= rng >> 12;
    rng ^= rng << 25;
    rng ^= rng >> 27;
    return (uint32_t)((rng * 0x2545f4914f6cdd1dull) >> 32);
}

static float rand_uniform(float lo, float hi) {
    return lo + (hi - lo) * (float)(rand_u32() >> 8) / 16777216.0f;
}

static void fill_uniform(float *x, int n, float lo, float hi) {
    for (int i = 0; i < n; i++) x[i] = rand_uniform(lo, hi);
}

static void fill_bytes(void *p, size_t n) {
    for (size_t i = 0; i < n; i++) ((uint8_t *)p)[i] = (uint8_t)rand_u32();
}

/* Random floats with a magnitude that changes every block of `block`
 * elements (the activation format's), so quantizer scales span a wide
 * range, including f16 subnormals and all-zero blocks. */
static void fill_activations(float *x, int n, int block) {
    static const float mags[] = {1.0f, 0.0f, 1e-6f, 3e-3f, 40.0f, 0.25f, 1e4f};
    for (int i = 0; i < n; i++) {
        float mag = mags[(i / block) % COUNT(mags)];
        x[i] = mag * rand_uniform(-1.0f, 1.0f);
    }
    /* a block whose scale is exactly 1, with every quant a rounding tie */
    if (n >= 3 * block)
        for (int j = 0; j < block; j++)
            x[2 * block + j] = j == 0 ? 127.0f : (float)(j % EK_QK - 16) + 0.5f;
}

/* A weight row of any type: random quants (and K-quant sub-block scales),
 * random but sane f16 scales, so values stay within a few units. */
static void fill_weight_row(int type, void *row, int n) {
    if (type == EK_TYPE_F32) {
        fill_uniform(row, n, -1.0f, 1.0f);
        return;
    }
    if (type == EK_TYPE_F16) {
        for (int i = 0; i < n; i++) ((ek_f16 *)row)[i] = ek_f32_to_f16(rand_uniform(-1.0f, 1.0f));
        return;
    }
    fill_bytes(row, ek_row_bytes(type, n));
    for (int b = 0; b < n / ek_type_block_elems(type); b++) {
        float d = rand_uniform(-0.05f, 0.05f), m = rand_uniform(-0.4f, 0.0f);
        ek_f16 signed_d = ek_f32_to_f16(d), min = ek_f32_to_f16(m);
        /* the K-quants' d times a 6-bit scale (Q6_K: 8-bit) */
        ek_f16 k_d = ek_f32_to_f16(fabsf(d) / 32), k_dmin = ek_f32_to_f16(-m / 32);
        switch (type) {
        case EK_TYPE_Q4_0: ((block_q4_0 *)row)[b].d = signed_d; break;
        case EK_TYPE_Q8_0: ((block_q8_0 *)row)[b].d = signed_d; break;
        case EK_TYPE_Q5_0: ((block_q5_0 *)row)[b].d = signed_d; break;
        /* the grid reaches 127, Q4_0's codes 8 */
        case EK_TYPE_IQ4_NL: ((block_iq4_nl *)row)[b].d = ek_f32_to_f16(d / 16); break;
        case EK_TYPE_Q4_1:
            ((block_q4_1 *)row)[b].d = ek_f32_to_f16(fabsf(d));
            ((block_q4_1 *)row)[b].m = min;
            break;
        case EK_TYPE_Q5_1:
            ((block_q5_1 *)row)[b].d = ek_f32_to_f16(fabsf(d) / 2);
            ((block_q5_1 *)row)[b].m = min;
            break;
        case EK_TYPE_Q4_K:
            ((block_q4_K *)row)[b].d = k_d;
            ((block_q4_K *)row)[b].dmin = k_dmin;
            break;
        case EK_TYPE_Q5_K:
            ((block_q5_K *)row)[b].d = ek_f32_to_f16(fabsf(d) / 64);
            ((block_q5_K *)row)[b].dmin = k_dmin;
            break;
        case EK_TYPE_Q6_K: ((block_q6_K *)row)[b].d = ek_f32_to_f16(d / 64); break;
        }
    }
}

/* ---- results ---- */

/* One kernel of one table over all its cases: the worst error seen. */
typedef struct {
    const char *table;
    const char *kernel;
    double worst;
    double tol;
    int cases;
    int failed;
} result;

static int n_failed;

static result begin(const ek_kernels *t, const char *kernel, double tol) {
    result r = {t->name, kernel, 0.0, tol, 0, 0};
    return r;
}

static void record(result *r, double err) {
    r->cases++;
    if (!(err <= r->worst)) r->worst = err; /* NaN sticks */
    if (!(err <= r->tol)) r->failed++;
}

static void report(const result *r) {
    printf("%-4s %-13s %-26s worst %-9.2e (tol %.0e) over %4d cases\n",
           r->failed ? "FAIL" : "ok", r->table, r->kernel, r->worst, r->tol, r->cases);
    if (r->failed) n_failed++;
}

static double nmse(const float *got, const float *want, int n) {
    double err = 0.0, ref = 0.0;
    for (int i = 0; i < n; i++) {
        double d = (double)got[i] - (double)want[i];
        if (isinf(want[i]) && got[i] == want[i]) d = 0.0;
        err += d * d;
        ref += isinf(want[i]) ? 0.0 : (double)want[i] * want[i];
    }
    return ref > 0.0 ? err / ref : err;
}

/* Bytes that differ, as the error of exact kernels. */
static double bytes_differing(const void *a, const void *b, size_t n) {
    size_t k = 0;
    for (size_t i = 0; i < n; i++) k += ((const uint8_t *)a)[i] != ((const uint8_t *)b)[i];
    return (double)k;
}

/* ---- buffers, allocated once ---- */

static float fa[MAX_N], fb[MAX_N], fc[MAX_N], fd[MAX_N];
static uint8_t qa[MAX_ROWS * (MAX_N * 4 + PAD)]; /* weight rows */
static uint8_t qx[MAX_COLS * (MAX_N * 4 + PAD)]; /* activation rows */
static uint8_t qb[MAX_N * 4], qc[MAX_N * 4];
static uint8_t wa[MAX_ROWS * MAX_N * 4], wb[MAX_ROWS * MAX_N * 4]; /* rows packed, and x8 */
static float ya[MAX_COLS * (MAX_ROWS + 3)], yb[MAX_COLS * (MAX_ROWS + 3)];

static const char *type_name(int type) {
    switch (type) {
    case EK_TYPE_F32: return "f32";
    case EK_TYPE_F16: return "f16";
    case EK_TYPE_Q4_0: return "q4_0";
    case EK_TYPE_Q4_1: return "q4_1";
    case EK_TYPE_Q5_0: return "q5_0";
    case EK_TYPE_Q5_1: return "q5_1";
    case EK_TYPE_Q8_0: return "q8_0";
    case EK_TYPE_Q8_1: return "q8_1";
    case EK_TYPE_Q4_K: return "q4_K";
    case EK_TYPE_Q5_K: return "q5_K";
    case EK_TYPE_Q6_K: return "q6_K";
    case EK_TYPE_Q8_K: return "q8_K";
    case EK_TYPE_IQ4_NL: return "iq4_nl";
    default: return "?";
    }
}

static const int WEIGHT_TYPES[] = {EK_TYPE_Q4_0, EK_TYPE_Q4_1,   EK_TYPE_Q5_0, EK_TYPE_Q5_1,
                                   EK_TYPE_Q8_0, EK_TYPE_IQ4_NL, EK_TYPE_Q4_K, EK_TYPE_Q5_K,
                                   EK_TYPE_Q6_K, EK_TYPE_F16,    EK_TYPE_F32};

static int is_float(int type) { return type == EK_TYPE_F32 || type == EK_TYPE_F16; }

/* The row lengths swept for a type: any length for the float types, whole
 * blocks (super-blocks) otherwise. */
static const int *sizes_for(int type, int *count) {
    if (is_float(type)) {
        *count = COUNT(FLOAT_SIZES);
        return FLOAT_SIZES;
    }
    if (ek_type_block_elems(type) == EK_QK_K) {
        *count = COUNT(K_SIZES);
        return K_SIZES;
    }
    *count = COUNT(BLOCK_SIZES);
    return BLOCK_SIZES;
}

/* A table without this kernel is not failed but named, so a run shows
 * which SIMD kernels are still to be written. */
static void report_skipped(const ek_kernels *t, const char *kernel) {
    printf("%-4s %-13s %-26s no kernel in this table\n", "skip", t->name, kernel);
}

/* ---- block kernels ---- */

static void test_quantize(const ek_kernels *t) {
    /* each activation format once, through a weight type that uses it */
    static const int via[] = {EK_TYPE_Q4_0, EK_TYPE_Q4_1, EK_TYPE_Q4_K};
    for (int v = 0; v < COUNT(via); v++) {
        const ek_type_ops *ops = &t->types[via[v]], *ref = &ek_kernels_ref.types[via[v]];
        char name[40];
        snprintf(name, sizeof name, "quantize %s", type_name(ref->act_type));
        if (!ops->quantize) {
            report_skipped(t, name);
            continue;
        }
        result r = begin(t, name, 0.0);
        if (ops->act_type != ref->act_type) record(&r, INFINITY);
        int count;
        const int *sizes = sizes_for(ref->act_type, &count);
        for (int s = 0; s < count; s++) {
            int n = sizes[s];
            size_t bytes = ek_row_bytes(ref->act_type, n);
            fill_activations(fa, n, ek_type_block_elems(ref->act_type));
            memset(qb, 0xa5, bytes + 8);
            memset(qc, 0xa5, bytes + 8);
            ops->quantize(fa, qb, n);
            ref->quantize(fa, qc, n);
            record(&r, bytes_differing(qb, qc, bytes + 8));
        }
        report(&r);
    }
}

static void test_dequantize(const ek_kernels *t) {
    for (int w = 0; w < COUNT(WEIGHT_TYPES); w++) {
        int type = WEIGHT_TYPES[w];
        char name[40];
        snprintf(name, sizeof name, "dequantize %s", type_name(type));
        if (!t->types[type].dequantize) {
            report_skipped(t, name);
            continue;
        }
        result r = begin(t, name, TOL_DOT);
        int count;
        const int *sizes = sizes_for(type, &count);
        for (int s = 0; s < count; s++) {
            int n = sizes[s];
            fill_weight_row(type, qa, n);
            t->types[type].dequantize(qa, fa, n);
            ek_kernels_ref.types[type].dequantize(qa, fb, n);
            record(&r, nmse(fa, fb, n));
        }
        report(&r);
    }
}

/* One gemm shape: padded strides, and outputs outside the nrows x nx
 * region must stay untouched. */
static double gemm_case(const ek_kernels *t, int type, int n, int nrows, int nx) {
    const ek_type_ops *ops = &t->types[type], *ref = &ek_kernels_ref.types[type];
    size_t w_stride = ek_row_bytes(type, n) + PAD;
    size_t x_stride = ek_row_bytes(ref->act_type, n) + PAD;
    size_t y_stride = (size_t)nrows + 3;
    for (int i = 0; i < nrows; i++) fill_weight_row(type, qa + i * w_stride, n);
    for (int j = 0; j < nx; j++) {
        fill_activations(fa, n, ek_type_block_elems(ref->act_type));
        if (ref->quantize)
            ref->quantize(fa, qx + j * x_stride, n);
        else
            memcpy(qx + j * x_stride, fa, (size_t)n * sizeof(float));
    }
    size_t ny = (size_t)nx * y_stride;
    for (size_t k = 0; k < ny; k++) ya[k] = yb[k] = -12345.0f;
    ops->gemm(n, qa, w_stride, nrows, qx, x_stride, nx, ya, y_stride);
    ref->gemm(n, qa, w_stride, nrows, qx, x_stride, nx, yb, y_stride);
    for (size_t k = 0; k < ny; k++)
        if (k % y_stride >= (size_t)nrows && ya[k] != -12345.0f) return INFINITY;
    return nmse(ya, yb, (int)ny);
}

/* The same shape through the x8 layout: the weights of gemm_case (the rows
 * as the file has them, strided) packed, and the table's gemm_x8 held to
 * the reference gemm over the file's layout. */
static double gemm_x8_case(const ek_kernels *t, int type, int n, int nrows, int nx) {
    const ek_type_ops *ops = &t->types[type], *ref = &ek_kernels_ref.types[type];
    size_t row = ek_row_bytes(type, n), w_stride = row + PAD;
    size_t x_stride = ek_row_bytes(ref->act_type, n) + PAD;
    size_t y_stride = (size_t)nrows + 3;
    for (int i = 0; i < nrows; i++) {
        fill_weight_row(type, qa + i * w_stride, n);
        memcpy(wa + i * row, qa + i * w_stride, row);
    }
    ek_x8_pack(type, wa, wb, nrows, n, 0);
    for (int j = 0; j < nx; j++) {
        fill_activations(fa, n, EK_QK);
        ref->quantize(fa, qx + j * x_stride, n);
    }
    size_t ny = (size_t)nx * y_stride;
    for (size_t k = 0; k < ny; k++) ya[k] = yb[k] = -12345.0f;
    ops->gemm_x8(n, wb, row, nrows, qx, x_stride, nx, ya, y_stride);
    ref->gemm(n, qa, w_stride, nrows, qx, x_stride, nx, yb, y_stride);
    for (size_t k = 0; k < ny; k++)
        if (k % y_stride >= (size_t)nrows && ya[k] != -12345.0f) return INFINITY;
    return nmse(ya, yb, (int)ny);
}

/* The layout itself, once: every block of every row comes back from the
 * x8 layout as it was, and the reference gemm_x8 agrees with the reference
 * gemm bit for bit. */
static void test_x8_layout(void) {
    for (int w = 0; w < COUNT(WEIGHT_TYPES); w++) {
        int type = WEIGHT_TYPES[w];
        if (!ek_x8_layout(type)) continue;
        char name[40];
        snprintf(name, sizeof name, "x8 layout %s", type_name(type));
        result r = begin(&ek_kernels_ref, name, 0.0);
        for (int s = 0; s < COUNT(BLOCK_SIZES); s++)
            for (int a = 0; a < COUNT(GEMM_ROWS); a++) {
                int n = BLOCK_SIZES[s], nrows = GEMM_ROWS[a], nb = n / EK_QK;
                size_t row = ek_row_bytes(type, n), bb = ek_type_block_bytes(type);
                for (int i = 0; i < nrows; i++) fill_weight_row(type, wa + i * row, n);
                ek_x8_pack(type, wa, wb, nrows, n, 0);
                size_t differing = 0;
                int whole = nrows / EK_X8_ROWS * EK_X8_ROWS;
                for (int i = 0; i < whole; i++)
                    for (int b = 0; b < nb; b++) {
                        ek_x8_block(type, wb + (size_t)(i / EK_X8_ROWS) * EK_X8_ROWS * row, nb,
                                    i % EK_X8_ROWS, b, qb);
                        differing += bytes_differing(qb, wa + i * row + b * bb, bb);
                    }
                differing += bytes_differing(wb + whole * row, wa + whole * row,
                                             (size_t)(nrows - whole) * row);
                record(&r, (double)differing);

                fill_activations(fa, n, EK_QK);
                ek_kernels_ref.types[type].quantize(fa, qx, n);
                ek_kernels_ref.types[type].gemm_x8(n, wb, row, nrows, qx, 0, 1, ya, 0);
                ek_kernels_ref.types[type].gemm(n, wa, row, nrows, qx, 0, 1, yb, 0);
                record(&r, (double)bytes_differing(ya, yb, (size_t)nrows * sizeof(float)));
            }
        report(&r);
    }
}

static void test_gemm(const ek_kernels *t) {
    for (int w = 0; w < COUNT(WEIGHT_TYPES); w++) {
        int type = WEIGHT_TYPES[w];
        const ek_type_ops *ref = &ek_kernels_ref.types[type];
        char name[40];
        snprintf(name, sizeof name, "gemm %s x %s", type_name(type), type_name(ref->act_type));
        if (!t->types[type].gemm) {
            report_skipped(t, name);
            continue;
        }
        result r = begin(t, name, TOL_DOT);
        if (t->types[type].act_type != ref->act_type) record(&r, INFINITY);
        int count;
        const int *sizes = sizes_for(type, &count);
        for (int s = 0; s < count; s++)
            for (int a = 0; a < COUNT(GEMM_ROWS); a++)
                for (int b = 0; b < COUNT(GEMM_COLS); b++)
                    record(&r, gemm_case(t, type, sizes[s], GEMM_ROWS[a], GEMM_COLS[b]));
        /* the widest float rows too, for the long main loops */
        if (is_float(type))
            for (int s = 4; s < COUNT(BLOCK_SIZES); s++)
                record(&r, gemm_case(t, type, BLOCK_SIZES[s], 5, 5));
        report(&r);

        if (!ek_x8_layout(type)) continue;
        snprintf(name, sizeof name, "gemm x8 %s x %s", type_name(type), type_name(ref->act_type));
        r = begin(t, name, TOL_DOT);
        if (!t->types[type].gemm_x8) record(&r, INFINITY); /* every SIMD table has one */
        else
            for (int s = 0; s < count; s++)
                for (int a = 0; a < COUNT(GEMM_ROWS); a++)
                    for (int b = 0; b < COUNT(GEMM_COLS); b++)
                        record(&r, gemm_x8_case(t, type, sizes[s], GEMM_ROWS[a], GEMM_COLS[b]));
        report(&r);
    }
}

/* An activation row as the gemms read it, back in f32: x = d * q. */
static void dequantize_activations(int act_type, const void *x, float *y, int n) {
    int be = ek_type_block_elems(act_type);
    for (int b = 0; b < n / be; b++) {
        const int8_t *q;
        float d;
        if (act_type == EK_TYPE_Q8_0) {
            const block_q8_0 *blk = (const block_q8_0 *)x + b;
            d = ek_f16_to_f32(blk->d);
            q = blk->qs;
        } else if (act_type == EK_TYPE_Q8_1) {
            const block_q8_1 *blk = (const block_q8_1 *)x + b;
            d = blk->d;
            q = blk->qs;
        } else {
            const block_q8_K *blk = (const block_q8_K *)x + b;
            d = blk->d;
            q = blk->qs;
        }
        for (int j = 0; j < be; j++) y[b * be + j] = d * q[j];
    }
}

/* The reference gemm of type on 8 weight rows and 4 activation rows of n,
 * held to its definition: each output is the dot product, in double, of a
 * dequantized weight row with the activations as dequantized (to summation
 * order), or, with unrounded set, as they were before quantizing (so the
 * quantizer's scale, sign and sums are right, to its rounding). The
 * unrounded activations are uniform: fill_activations' tie block, all
 * halves, is rounding at its worst. */
static double ref_gemm_error(int type, int n, int unrounded) {
    enum { ROWS = 8, COLS = 4 };
    const ek_type_ops *ref = &ek_kernels_ref.types[type];
    size_t w_stride = ek_row_bytes(type, n), x_stride = ek_row_bytes(ref->act_type, n);
    static float x[COLS][MAX_N];
    for (int i = 0; i < ROWS; i++) fill_weight_row(type, qa + i * w_stride, n);
    for (int j = 0; j < COLS; j++) {
        if (unrounded)
            fill_uniform(x[j], n, -1.0f, 1.0f);
        else
            fill_activations(x[j], n, ek_type_block_elems(ref->act_type));
        ref->quantize(x[j], qx + j * x_stride, n);
        if (!unrounded) dequantize_activations(ref->act_type, qx + j * x_stride, x[j], n);
    }
    ref->gemm(n, qa, w_stride, ROWS, qx, x_stride, COLS, ya, ROWS);
    float want[ROWS * COLS];
    for (int i = 0; i < ROWS; i++) {
        ref->dequantize(qa + i * w_stride, fa, n);
        for (int j = 0; j < COLS; j++) {
            double dot = 0.0;
            for (int k = 0; k < n; k++) dot += (double)fa[k] * x[j][k];
            want[j * ROWS + i] = (float)dot;
        }
    }
    return nmse(ya, want, ROWS * COLS);
}

static void test_ref_gemm_definition(void) {
    for (int w = 0; w < COUNT(WEIGHT_TYPES); w++) {
        int type = WEIGHT_TYPES[w];
        if (is_float(type)) continue;
        char name[40];
        int count;
        const int *sizes = sizes_for(type, &count);
        for (int unrounded = 0; unrounded < 2; unrounded++) {
            snprintf(name, sizeof name, "gemm %s as %s", type_name(type),
                     unrounded ? "unrounded" : "dequantized");
            result r = begin(&ek_kernels_ref, name, unrounded ? TOL_ROUNDING : TOL_DOT);
            for (int s = 0; s < count; s++) record(&r, ref_gemm_error(type, sizes[s], unrounded));
            report(&r);
        }
    }
}

/* ---- the forward pass ---- */

/* Tiny Llamas whose vocab (100) leaves rows past the last x8 group, with a
 * tied Q8_0 embedding; each layer names the types of its matrices. */
enum { FWD_MAX_LAYERS = 3, FWD_DIM = 64, FWD_HEADS = 4, FWD_KV_HEADS = 2, FWD_HEAD_DIM = 16,
       FWD_VOCAB = 100, FWD_CTX = 32, FWD_BATCH = 8 };

typedef struct {
    int attn, wo, ffn, down; /* wq, wk, wv; wo; w_gate, w_up; w_down */
} fwd_layer_types;

typedef struct {
    const char *name;
    int hidden, n_layers;
    fwd_layer_types layers[FWD_MAX_LAYERS];
} fwd_variant;

static const fwd_variant FWD_VARIANTS[] = {
    /* the block types with an x8 layout: Q4_1, then Q4_0 with a Q8_0 wo */
    {"forward, 2 slots", 96, 2,
     {{EK_TYPE_Q4_1, EK_TYPE_Q4_1, EK_TYPE_Q4_1, EK_TYPE_Q4_1},
      {EK_TYPE_Q4_0, EK_TYPE_Q8_0, EK_TYPE_Q4_0, EK_TYPE_Q4_0}}},
    /* the 5-bit types and IQ4_NL, and a K-quant w_down (rows of 256, one
     * super-block) in each layer: types mixed as llama.cpp's Q4_K_M files
     * mix them, so Q8_0, Q8_1 and Q8_K activations alternate within a layer */
    {"forward, 5-bit, IQ4_NL, K", 256, 3,
     {{EK_TYPE_Q5_0, EK_TYPE_Q5_1, EK_TYPE_Q5_0, EK_TYPE_Q4_K},
      {EK_TYPE_Q5_1, EK_TYPE_Q5_0, EK_TYPE_Q5_1, EK_TYPE_Q5_K},
      {EK_TYPE_IQ4_NL, EK_TYPE_Q8_0, EK_TYPE_Q5_1, EK_TYPE_Q6_K}}},
};

static uint8_t *fwd_matrix(int type, int rows, int cols, ek_tensor *t) {
    size_t row = ek_row_bytes(type, cols);
    uint8_t *data = malloc((size_t)rows * row);
    for (int i = 0; i < rows; i++) fill_weight_row(type, data + i * row, cols);
    *t = (ek_tensor){data, type, rows, cols, 0};
    return data;
}

static float *fwd_norm(int n, ek_tensor *t) {
    float *data = malloc((size_t)n * sizeof(float));
    fill_uniform(data, n, 0.5f, 1.5f);
    *t = (ek_tensor){data, EK_TYPE_F32, 1, n, 0};
    return data;
}

/* Prompts in both slots (a chunk of 5, then of 3), then 4 batched decode
 * steps; every row of logits, in order, into out. Returns the rows. */
static int fwd_run(ek_model *m, float *out) {
    int rows = 0;
    int32_t tok[FWD_BATCH], pos[FWD_BATCH], slot[FWD_BATCH];
    uint8_t want[FWD_BATCH];
    for (int chunk = 0; chunk < 2; chunk++) {
        int n = chunk ? 3 : 5, start = chunk ? 5 : 0;
        for (int s = 0; s < 2; s++) {
            for (int t = 0; t < n; t++) {
                tok[t] = (int32_t)((7 * (start + t) + 13 * s + 1) % FWD_VOCAB);
                pos[t] = start + t;
                slot[t] = s;
                want[t] = 1;
            }
            if (ek_forward(m, n, tok, pos, slot, want, out + (size_t)rows * FWD_VOCAB)) return -1;
            rows += n;
        }
    }
    for (int step = 0; step < 4; step++) {
        for (int s = 0; s < 2; s++) {
            tok[s] = (int32_t)((31 * step + 17 * s + 3) % FWD_VOCAB);
            pos[s] = 8 + step;
            slot[s] = s;
            want[s] = 1;
        }
        if (ek_forward(m, 2, tok, pos, slot, want, out + (size_t)rows * FWD_VOCAB)) return -1;
        rows += 2;
    }
    return rows;
}

/* Whether t has a gemm for every matrix of v. */
static int fwd_supported(const ek_kernels *t, const fwd_variant *v) {
    for (int l = 0; l < v->n_layers; l++) {
        const fwd_layer_types *L = &v->layers[l];
        if (!t->types[L->attn].gemm || !t->types[L->wo].gemm || !t->types[L->ffn].gemm ||
            !t->types[L->down].gemm)
            return 0;
    }
    return 1;
}

static void test_forward(const fwd_variant *v) {
    const int q_dim = FWD_HEADS * FWD_HEAD_DIM, kv_dim = FWD_KV_HEADS * FWD_HEAD_DIM;
    ek_layer layers[FWD_MAX_LAYERS] = {0}; /* every optional tensor absent */
    void *owned[FWD_MAX_LAYERS * 9 + 2];
    int n_owned = 0;
    ek_weights w = {.cfg = {.n_layer = v->n_layers, .dim = FWD_DIM, .hidden_dim = v->hidden,
                            .n_head = FWD_HEADS, .n_kv_head = FWD_KV_HEADS,
                            .head_dim = FWD_HEAD_DIM, .vocab = FWD_VOCAB, .norm_eps = 1e-5f,
                            .rope_base = 10000.0f},
                    .layers = layers};
    owned[n_owned++] = fwd_matrix(EK_TYPE_Q8_0, FWD_VOCAB, FWD_DIM, &w.tok_embd);
    w.output = w.tok_embd;
    owned[n_owned++] = fwd_norm(FWD_DIM, &w.out_norm);
    for (int l = 0; l < v->n_layers; l++) {
        ek_layer *L = &layers[l];
        const fwd_layer_types *T = &v->layers[l];
        owned[n_owned++] = fwd_norm(FWD_DIM, &L->attn_norm);
        owned[n_owned++] = fwd_norm(FWD_DIM, &L->ffn_norm);
        owned[n_owned++] = fwd_matrix(T->attn, q_dim, FWD_DIM, &L->wq);
        owned[n_owned++] = fwd_matrix(T->attn, kv_dim, FWD_DIM, &L->wk);
        owned[n_owned++] = fwd_matrix(T->attn, kv_dim, FWD_DIM, &L->wv);
        owned[n_owned++] = fwd_matrix(T->wo, FWD_DIM, q_dim, &L->wo);
        owned[n_owned++] = fwd_matrix(T->ffn, v->hidden, FWD_DIM, &L->w_gate);
        owned[n_owned++] = fwd_matrix(T->ffn, v->hidden, FWD_DIM, &L->w_up);
        owned[n_owned++] = fwd_matrix(T->down, FWD_DIM, v->hidden, &L->w_down);
    }

    enum { ROWS = 2 * 5 + 2 * 3 + 4 * 2 };
    static float want_logits[ROWS * FWD_VOCAB], got[ROWS * FWD_VOCAB], again[ROWS * FWD_VOCAB];
    /* the reference first (ek_available lists it last) */
    const ek_kernels *tables[8] = {&ek_kernels_ref};
    int n_tables = 1;
    for (const ek_kernels *const *k = ek_available(); *k && n_tables < 8; k++)
        if (*k != &ek_kernels_ref) tables[n_tables++] = *k;
    for (int i = 0; i < n_tables; i++) {
        const ek_kernels *t = tables[i];
        if (!fwd_supported(t, v)) {
            report_skipped(t, v->name);
            continue;
        }
        result r = begin(t, v->name, TOL_FORWARD);
        ek_model_params p = {.n_threads = 2, .n_slots = 2, .n_ctx = FWD_CTX,
                             .max_batch = FWD_BATCH, .kv_type = EK_TYPE_F16, .kernels = t};
        float *out = i ? got : want_logits;
        for (int run = 0; run < 2; run++) {
            ek_model *m = NULL;
            char err[128] = "";
            if (ek_model_create(&w, &p, &m, err, sizeof err)) {
                printf("model: %s\n", err);
                record(&r, INFINITY);
                break;
            }
            /* the second time, scribble on our weights (token 0's embedding
             * row, so every position's first logit) once the model is made:
             * it holds its own copy, so nothing may change, to the bit */
            uint8_t *embd = (uint8_t *)w.tok_embd.data;
            uint8_t saved = embd[5];
            if (run) embd[5] ^= 0x5a;
            int rows = fwd_run(m, run ? again : out);
            embd[5] = saved;
            if (rows != ROWS || ek_model_weight_bytes(m) < 40000) record(&r, INFINITY);
            ek_model_destroy(m);
        }
        record(&r, bytes_differing(again, out, sizeof again) ? INFINITY : 0.0);
        if (i) record(&r, nmse(got, want_logits, ROWS * FWD_VOCAB));
        report(&r);
    }
    for (int i = 0; i < n_owned; i++) free(owned[i]);
}

/* ---- float ops ---- */

static void test_rmsnorm(const ek_kernels *t) {
    result r = begin(t, "rmsnorm", 0.0);
    for (int s = 0; s < COUNT(FLOAT_SIZES); s++) {
        int n = FLOAT_SIZES[s];
        fill_uniform(fa, n, -3.0f, 3.0f);
        fill_uniform(fb, n, 0.5f, 1.5f);
        t->rmsnorm(fc, fa, fb, n, 1e-5f);
        rmsnorm_ref(fd, fa, fb, n, 1e-5f);
        record(&r, nmse(fc, fd, n));
        t->rmsnorm(fa, fa, fb, n, 1e-5f); /* in place */
        record(&r, nmse(fa, fd, n));
    }
    report(&r);
}

typedef void (*rope_fn)(float *x, int n_heads, int head_dim, const float *cs);

/* rope and rope_neox: the same angles, different pairs. */
static void test_rope(const ek_kernels *t, const char *kernel, rope_fn rope, rope_fn want) {
    static const int heads[] = {1, 3, 9};
    static const int dims[] = {2, 4, 6, 8, 10, 16, 18, 32, 64, 128};
    result r = begin(t, kernel, TOL_DOT);
    for (int h = 0; h < COUNT(heads); h++)
        for (int d = 0; d < COUNT(dims); d++) {
            int n = heads[h] * dims[d];
            float cs[128];
            for (int i = 0; i < dims[d]; i += 2) {
                float angle = rand_uniform(-100.0f, 100.0f);
                cs[i] = cosf(angle);
                cs[i + 1] = sinf(angle);
            }
            fill_uniform(fa, n, -2.0f, 2.0f);
            memcpy(fb, fa, (size_t)n * sizeof(float));
            rope(fa, heads[h], dims[d], cs);
            want(fb, heads[h], dims[d], cs);
            record(&r, nmse(fa, fb, n));
        }
    report(&r);
}

typedef void (*gated_fn)(float *out, const float *gate, const float *up, int n);

/* silu_mul and gelu_mul: an activation of the gate times up. */
static void test_gated(const ek_kernels *t, const char *kernel, gated_fn fn, gated_fn want) {
    result r = begin(t, kernel, TOL_EXP);
    for (int s = 0; s < COUNT(FLOAT_SIZES); s++) {
        int n = FLOAT_SIZES[s];
        fill_uniform(fa, n, -12.0f, 12.0f);
        if (n > 9) fa[3] = -95.0f, fa[5] = 95.0f, fa[7] = 0.0f; /* beyond exp's range */
        fill_uniform(fb, n, -2.0f, 2.0f);
        fn(fc, fa, fb, n);
        want(fd, fa, fb, n);
        record(&r, nmse(fc, fd, n));
        fn(fa, fa, fb, n); /* in place */
        record(&r, nmse(fa, fd, n));
    }
    report(&r);
}

static void test_softmax(const ek_kernels *t) {
    static const float spreads[] = {0.1f, 5.0f, 40.0f};
    result r = begin(t, "softmax", TOL_EXP);
    for (int s = 0; s < COUNT(FLOAT_SIZES); s++)
        for (int k = 0; k < COUNT(spreads); k++) {
            int n = FLOAT_SIZES[s];
            fill_uniform(fa, n, -spreads[k], spreads[k]);
            if (n > 9) fa[n / 2] = -INFINITY; /* a masked position */
            memcpy(fb, fa, (size_t)n * sizeof(float));
            t->softmax(fa, n);
            softmax_ref(fb, n);
            record(&r, nmse(fa, fb, n));
        }
    report(&r);
}

static void test_add(const ek_kernels *t) {
    result r = begin(t, "add", 0.0);
    for (int s = 0; s < COUNT(FLOAT_SIZES); s++) {
        int n = FLOAT_SIZES[s];
        fill_uniform(fa, n, -3.0f, 3.0f);
        fill_uniform(fc, n, -3.0f, 3.0f);
        memcpy(fb, fa, (size_t)n * sizeof(float));
        t->add(fa, fc, n);
        add_ref(fb, fc, n);
        record(&r, bytes_differing(fa, fb, (size_t)n * sizeof(float)));
    }
    report(&r);
}

static void test_kv_store(const ek_kernels *t) {
    result r = begin(t, "kv_store", 0.0);
    for (int s = 0; s < COUNT(FLOAT_SIZES); s++) { /* f16: any length */
        int n = FLOAT_SIZES[s];
        fill_uniform(fa, n, -2.0f, 2.0f);
        for (int i = 0; i < n; i += 5) fa[i] *= (i % 3) ? 1e-6f : 7e4f; /* subnormal, inf */
        t->kv_store(qb, fa, n, EK_TYPE_F16);
        kv_store_ref(qc, fa, n, EK_TYPE_F16);
        record(&r, bytes_differing(qb, qc, (size_t)n * sizeof(ek_f16)));
    }
    for (int s = 0; s < COUNT(BLOCK_SIZES); s++) { /* q8_0: whole blocks */
        int n = BLOCK_SIZES[s];
        fill_activations(fa, n, EK_QK);
        t->kv_store(qb, fa, n, EK_TYPE_Q8_0);
        kv_store_ref(qc, fa, n, EK_TYPE_Q8_0);
        record(&r, bytes_differing(qb, qc, ek_row_bytes(EK_TYPE_Q8_0, n)));
    }
    report(&r);
}

static void test_attention(const ek_kernels *t) {
    static const int positions[] = {1, 2, 3, 17, 100};
    static const int dims[] = {32, 64, 128, 8, 40, 100}; /* the last three: f16 only */
    static const int kv_types[] = {EK_TYPE_F16, EK_TYPE_Q8_0};
    static uint8_t k[100 * 3 * 128 * 2], v[100 * 3 * 128 * 2];
    static float scores_a[100], scores_b[100];
    result r = begin(t, "attention", TOL_ATTENTION);
    for (int kt = 0; kt < COUNT(kv_types); kt++)
        for (int d = 0; d < COUNT(dims); d++) {
            int hd = dims[d], type = kv_types[kt];
            if (type == EK_TYPE_Q8_0 && hd % EK_QK) continue;
            /* a position holds three heads, like a real cache row */
            size_t head_bytes = type == EK_TYPE_F16 ? (size_t)hd * sizeof(ek_f16)
                                                    : ek_row_bytes(type, hd);
            size_t stride = 3 * head_bytes;
            for (int p = 0; p < COUNT(positions); p++) {
                int n_pos = positions[p];
                for (int i = 0; i < n_pos; i++) {
                    fill_uniform(fa, hd, -1.5f, 1.5f);
                    kv_store_ref(k + i * stride + head_bytes, fa, hd, type);
                    fill_uniform(fa, hd, -1.5f, 1.5f);
                    kv_store_ref(v + i * stride + head_bytes, fa, hd, type);
                }
                fill_uniform(fb, hd, -3.0f, 3.0f);
                float scale = 1.0f / sqrtf((float)hd);
                t->attention(fc, fb, k + head_bytes, v + head_bytes, stride, type, n_pos, hd,
                             scale, scores_a);
                attention_ref(fd, fb, k + head_bytes, v + head_bytes, stride, type, n_pos, hd,
                              scale, scores_b);
                record(&r, nmse(fc, fd, hd));
            }
        }
    report(&r);
}

/* ---- the dispatcher ---- */

static void test_dispatch(const char *expect, const char *expect_best) {
    const ek_kernels *const *avail = ek_available();
    result r = {"-", "dispatch", 0.0, 0.0, 0, 0};
    printf("available:");
    for (const ek_kernels *const *k = avail; *k; k++) printf(" %s", (*k)->name);
    printf("\n");

    int n = 0;
    for (const ek_kernels *const *k = avail; *k; k++, n++) {
        /* each usable table is found by name and can be forced */
        setenv("EDGE_SLM_BACKEND", (*k)->name, 1);
        record(&r, ek_find((*k)->name) == *k && ek_best() == *k ? 0.0 : 1.0);
    }
    unsetenv("EDGE_SLM_BACKEND");
    record(&r, ek_best() == avail[0] && avail[n - 1] == &ek_kernels_ref ? 0.0 : 1.0);

    if (expect) {
        char buf[256];
        snprintf(buf, sizeof buf, "%s", expect);
        for (char *name = strtok(buf, ","); name; name = strtok(NULL, ",")) {
            int found = ek_find(name) != NULL;
            if (!found) printf("expected table %s is not available\n", name);
            record(&r, found ? 0.0 : 1.0);
        }
    }
    if (expect_best) {
        int ok = strcmp(avail[0]->name, expect_best) == 0;
        if (!ok) printf("expected %s first, got %s\n", expect_best, avail[0]->name);
        record(&r, ok ? 0.0 : 1.0);
    }
    report(&r);
}

int main(int argc, char **argv) {
    const char *expect = NULL, *expect_best = NULL;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--expect") == 0 && i + 1 < argc)
            expect = argv[++i];
        else if (strcmp(argv[i], "--expect-best") == 0 && i + 1 < argc)
            expect_best = argv[++i];
        else {
            fprintf(stderr, "usage: %s [--expect NAME,NAME...] [--expect-best NAME]\n", argv[0]);
            return 2;
        }
    }

    test_dispatch(expect, expect_best);
    test_x8_layout();
    test_ref_gemm_definition();
    int n_tables = 0;
    for (const ek_kernels *const *k = ek_available(); *k; k++) {
        const ek_kernels *t = *k;
        if (t == &ek_kernels_ref) continue;
        n_tables++;
        test_quantize(t);
        test_dequantize(t);
        test_gemm(t);
        test_rmsnorm(t);
        test_rope(t, "rope", t->rope, rope_ref);
        test_rope(t, "rope_neox", t->rope_neox, rope_neox_ref);
        test_gated(t, "silu_mul", t->silu_mul, silu_mul_ref);
        test_gated(t, "gelu_mul", t->gelu_mul, gelu_mul_ref);
        test_softmax(t);
        test_add(t);
        test_kv_store(t);
        test_attention(t);
    }
    if (n_tables == 0) printf("no table other than ref is usable here\n");
    for (int v = 0; v < COUNT(FWD_VARIANTS); v++) test_forward(&FWD_VARIANTS[v]);
    printf("%s: %d failing\n", n_failed ? "FAILED" : "PASSED", n_failed);
    return n_failed ? 1 : 0;
}
