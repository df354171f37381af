/* The K-quant tiles (Q4_K, Q5_K, Q6_K weights by Q8_K activations) of the
 * plain NEON and dotprod tables. gemm_neon.h includes this after its own
 * helpers; EK_NEON_DOTPROD chooses how products are summed, as there.
 *
 * A super-block of 256 weights has sub-blocks with integer scales of their
 * own (8 of 32 for Q4_K and Q5_K, 16 of 16 for Q6_K) under an f16 d (and,
 * for the mins of Q4_K and Q5_K, dmin). Within a super-block everything is
 * integer. For each sub-block, the 4 weight rows' sums of products are
 * folded into one vector (row i in lane i) and multiplied by the 4 rows'
 * scales, a vector of their own, into one accumulator per activation row;
 * d, dmin and the activations' d apply once per super-block. The mins need
 * no pass over the quants: Q8_K carries the sums of each 16 activations.
 *
 * The rows' scales come transposed (a vector per sub-block, row i in lane
 * i) from two rounds of zips over the 4 rows' scale bytes, once per
 * super-block.
 *
 * With dotprod, sdot accumulates, so each row's products are not restarted
 * at zero for each sub-block: they run on, and the running sum after
 * sub-block t is multiplied by sc[t] - sc[t+1] (in the order the tile takes
 * the sub-blocks, 0 past the last), which telescopes to sum sc[t] * dot[t].
 * The running terms can wrap in int32; the total is below 2^30, so modular
 * arithmetic gives it exactly. Plain NEON sums each sub-block's products
 * afresh in 16-bit lanes and multiplies by sc[t] itself.
 *
 * A super-block is taken in 4 groups of 64 weights a row, and a group in
 * steps of one sub-block: each step's weights are unpacked once per tile
 * and dotted with every activation row of it. Tiles are up to 4 weight
 * rows by 2 activation rows: dotprod's running sums (4 per activation row)
 * for more would not fit the 32 vector registers beside the weights.
 */
#ifndef EDGE_KERNELS_ARM_GEMM_K_NEON_H
#define EDGE_KERNELS_ARM_GEMM_K_NEON_H

#include <stddef.h>

#define K_GROUPS 4    /* groups of 64 weights in a super-block */
#define K_TILE_COLS 2 /* activation rows per K-quant tile */

EK_INLINE int is_k_quant(const int wtype) {
    return wtype == EK_TYPE_Q4_K || wtype == EK_TYPE_Q5_K || wtype == EK_TYPE_Q6_K;
}

/* Sub-blocks in a group, and 16-byte vectors of weights in a sub-block. */
EK_INLINE int k_steps(const int wtype) { return wtype == EK_TYPE_Q6_K ? 4 : 2; }
EK_INLINE int k_step_vectors(const int wtype) { return wtype == EK_TYPE_Q6_K ? 1 : 2; }

/* ---- the weights of a step, as signed bytes ----
 * Q4_K, group g: step 0 is sub-block 2g (the low nibbles of
 *   qs[32g..32g+31]), step 1 sub-block 2g+1 (the high nibbles); q as
 *   stored, 0..15.
 * Q5_K: the same, bit 4 from bit 2g or 2g+1 of qh, as q - 16 (the way
 *   unpack_q5 makes Q5_0's); the 16 * sum of activations this drops is
 *   added back through the activations' sums.
 * Q6_K, group g = 2h + j, within half h (128 weights): step t is the
 *   16-element sub-block j + 2t, from ql[16j..] (t = 0, 2) or
 *   ql[32 + 16j..] (t = 1, 3), low nibbles for t < 2, and qh[16j..]'s 2-bit
 *   field t; each as 4 (q - 32): the field in bits 7..6 with its high bit
 *   flipped, the nibble in bits 5..2, which as a signed byte is 4q - 128.
 *   Two inserts (sli, sri) build each; d takes the 1/4.
 * A group's steps share their loads, so the raw bytes are what stays live
 * between steps, not the unpacked weights. */
EK_INLINE void k_step_weights(const int wtype, const char *blk, int g, const int t,
                              int8x16_t w[2]) {
    if (wtype == EK_TYPE_Q6_K) {
        const block_q6_K *q = (const block_q6_K *)blk;
        const int h = g / 2, j = g % 2;
        const uint8x16_t hx = veorq_u8(vld1q_u8(q->qh + 32 * h + 16 * j), vdupq_n_u8(0xaa));
        const uint8x16_t l = vld1q_u8(q->ql + 64 * h + 32 * (t % 2) + 16 * j);
        const uint8x16_t high = vandq_u8(l, vdupq_n_u8(0xf0));
        uint8x16_t v;
        switch (t) {
        case 0: v = vsliq_n_u8(vshlq_n_u8(l, 2), hx, 6); break;
        case 1: v = vsliq_n_u8(vshlq_n_u8(l, 2), vshrq_n_u8(hx, 2), 6); break;
        case 2: v = vsriq_n_u8(vshlq_n_u8(hx, 2), high, 2); break;
        default: v = vsriq_n_u8(hx, high, 2); break;
        }
        w[0] = w[1] = vreinterpretq_s8_u8(v);
        return;
    }
    /* Q4_K and Q5_K share the block's head and qs */
    const uint8_t *qs = wtype == EK_TYPE_Q4_K ? ((const block_q4_K *)blk)->qs
                                              : ((const block_q5_K *)blk)->qs;
    const uint8x16_t a = vld1q_u8(qs + 32 * g), b = vld1q_u8(qs + 32 * g + 16);
    if (wtype == EK_TYPE_Q4_K) {
        const uint8x16_t low = vdupq_n_u8(0x0f);
        w[0] = vreinterpretq_s8_u8(t ? vshrq_n_u8(a, 4) : vandq_u8(a, low));
        w[1] = vreinterpretq_s8_u8(t ? vshrq_n_u8(b, 4) : vandq_u8(b, low));
        return;
    }
    const block_q5_K *q = (const block_q5_K *)blk;
    const uint8x16_t clear0 = vmvnq_u8(vld1q_u8(q->qh)), clear1 = vmvnq_u8(vld1q_u8(q->qh + 16));
    const uint8x16_t bit = vdupq_n_u8((uint8_t)(1u << (2 * g + t)));
    const uint8x16_t m0 = vtstq_u8(clear0, bit), m1 = vtstq_u8(clear1, bit);
    const uint8x16_t low = vdupq_n_u8(0x0f);
    w[0] = vreinterpretq_s8_u8(t ? vsriq_n_u8(m0, a, 4) : vbslq_u8(low, a, m0));
    w[1] = vreinterpretq_s8_u8(t ? vsriq_n_u8(m1, b, 4) : vbslq_u8(low, b, m1));
}

/* The activations that step t of group g meets. */
EK_INLINE void k_step_acts(const int wtype, const block_q8_K *xb, int g, const int t,
                           int8x16_t x[2]) {
    if (wtype == EK_TYPE_Q6_K) {
        x[0] = x[1] = vld1q_s8(xb->qs + 128 * (g / 2) + 16 * (g % 2) + 32 * t);
        return;
    }
    const int8x16x2_t v = vld1q_s8_x2(xb->qs + 64 * g + 32 * t);
    x[0] = v.val[0];
    x[1] = v.val[1];
}

/* ---- one step: a sub-block of RW rows against one activation row ----
 * Returns the rows' sums, row i in lane i. w[i] and x hold the step's
 * vectors (nv of them). With dotprod, run[i] carries row i's running sum
 * on; plain NEON ignores it. */
EK_INLINE int32x4_t fold_rows(const int32x4_t s[TILE_ROWS]) {
    return vpaddq_s32(vpaddq_s32(s[0], s[1]), vpaddq_s32(s[2], s[3]));
}

EK_INLINE int32x4_t k_step(const int RW, const int nv, const int8x16_t w[TILE_ROWS][2],
                           const int8x16_t x[2], int32x4_t run[TILE_ROWS]) {
#if EK_NEON_DOTPROD
#pragma GCC unroll 4
    for (int i = 0; i < RW; i++) {
        run[i] = vdotq_s32(run[i], w[i][0], x[0]);
        if (nv == 2) run[i] = vdotq_s32(run[i], w[i][1], x[1]);
    }
    return fold_rows(run);
#else
    (void)run;
    if (nv == 2) { /* 32 weights within -16..16: dot_rows' 16-bit fold */
        quants32 wq[TILE_ROWS];
#pragma GCC unroll 4
        for (int i = 0; i < TILE_ROWS; i++) wq[i] = (quants32){w[i][0], w[i][1]};
        return dot_rows(EK_TYPE_Q4_0, RW, wq, (quants32){x[0], x[1]}); /* Q4_0's path */
    }
    /* Q6_K's 16 weights within -128..124: two products fill a 16-bit lane */
    int32x4_t s[TILE_ROWS];
#pragma GCC unroll 4
    for (int i = 0; i < TILE_ROWS; i++) {
        s[i] = vdupq_n_s32(0);
        if (i < RW)
            s[i] = vpaddlq_s16(vmlal_high_s8(vmull_s8(vget_low_s8(w[i][0]), vget_low_s8(x[0])),
                                             w[i][0], x[0]));
    }
    return fold_rows(s);
#endif
}

/* ---- the scales of 4 rows' super-blocks ---- */
typedef struct {
    float32x4_t d, dmin;  /* row i in lane i; Q6_K's d is d / 4, for its 4 (q - 32) */
    int32x4_t coef[16];   /* per step, in the order taken: sc[t] (with dotprod
                             sc[t] - sc[t+1]), row i in lane i */
    int16x8_t sc[4], mn[4]; /* Q4_K, Q5_K: scales and mins, sub-blocks 2k, 2k+1 in sc[k] */
} k_scales;

/* Four rows' 16 bytes transposed: t[k] holds bytes 4k..4k+3 of each row,
 * byte 4k + s of row i at 4s + i. Two rounds of zips. */
EK_INLINE void k_transpose(const uint8_t *r0, const uint8_t *r1, const uint8_t *r2,
                           const uint8_t *r3, uint8x16_t t[4]) {
    const uint8x16_t a = vld1q_u8(r0), b = vld1q_u8(r1), c = vld1q_u8(r2), d = vld1q_u8(r3);
    const uint16x8_t ab0 = vreinterpretq_u16_u8(vzip1q_u8(a, b));
    const uint16x8_t ab1 = vreinterpretq_u16_u8(vzip2q_u8(a, b));
    const uint16x8_t cd0 = vreinterpretq_u16_u8(vzip1q_u8(c, d));
    const uint16x8_t cd1 = vreinterpretq_u16_u8(vzip2q_u8(c, d));
    t[0] = vreinterpretq_u8_u16(vzip1q_u16(ab0, cd0));
    t[1] = vreinterpretq_u8_u16(vzip2q_u16(ab0, cd0));
    t[2] = vreinterpretq_u8_u16(vzip1q_u16(ab1, cd1));
    t[3] = vreinterpretq_u8_u16(vzip2q_u16(ab1, cd1));
}

/* The steps' multipliers from their scales (int16, two steps a vector, in
 * the order taken; nv vectors). */
EK_INLINE void k_coefs(const int nv, const int16x8_t *sc, int32x4_t *coef) {
#pragma GCC unroll 8
    for (int k = 0; k < nv; k++) {
#if EK_NEON_DOTPROD
        const int16x8_t next = vextq_s16(sc[k], k + 1 < nv ? sc[k + 1] : vdupq_n_s16(0), 4);
        const int16x8_t c = vsubq_s16(sc[k], next);
#else
        const int16x8_t c = sc[k];
#endif
        coef[2 * k] = vmovl_s16(vget_low_s16(c));
        coef[2 * k + 1] = vmovl_high_s16(c);
    }
}

/* The scales of blocks blk[0..3] (four rows' super-block b). */
EK_INLINE void k_load_scales(const int wtype, const char *const blk[TILE_ROWS], k_scales *s) {
    uint8x16_t t[4];
    if (wtype == EK_TYPE_Q6_K) {
        const size_t at = offsetof(block_q6_K, scales);
        k_transpose((const uint8_t *)blk[0] + at, (const uint8_t *)blk[1] + at,
                    (const uint8_t *)blk[2] + at, (const uint8_t *)blk[3] + at, t);
        /* t[k] holds sub-blocks 4k..4k+3; the steps take 0, 2, 4, 6 (group
         * 0), 1, 3, 5, 7 (group 1), then the same 8 on: the even and odd
         * 32-bit lanes of t[0], t[1], then of t[2], t[3] */
        int16x8_t sc[8];
#pragma GCC unroll 2
        for (int h = 0; h < 2; h++) {
            const uint32x4_t lo = vreinterpretq_u32_u8(t[2 * h]);
            const uint32x4_t hi = vreinterpretq_u32_u8(t[2 * h + 1]);
            const int8x16_t even = vreinterpretq_s8_u32(vuzp1q_u32(lo, hi));
            const int8x16_t odd = vreinterpretq_s8_u32(vuzp2q_u32(lo, hi));
            sc[4 * h] = vmovl_s8(vget_low_s8(even));
            sc[4 * h + 1] = vmovl_high_s8(even);
            sc[4 * h + 2] = vmovl_s8(vget_low_s8(odd));
            sc[4 * h + 3] = vmovl_high_s8(odd);
        }
        k_coefs(8, sc, s->coef);
        const float32x4_t d =
            f16x4_gather(&((const block_q6_K *)blk[0])->d, &((const block_q6_K *)blk[1])->d,
                         &((const block_q6_K *)blk[2])->d, &((const block_q6_K *)blk[3])->d);
        s->d = vmulq_n_f32(d, 0.25f);
        return;
    }
    /* Q4_K and Q5_K: d, dmin and the 12 scale bytes are a block's first 16 */
    k_transpose((const uint8_t *)blk[0], (const uint8_t *)blk[1], (const uint8_t *)blk[2],
                (const uint8_t *)blk[3], t);
    /* t[0] holds d's and dmin's bytes: pair them up into halves */
    static const uint8_t halves[16] = {0, 4, 1, 5, 2, 6, 3, 7, 8, 12, 9, 13, 10, 14, 11, 15};
    const uint16x8_t dm = vreinterpretq_u16_u8(vqtbl1q_u8(t[0], vld1q_u8(halves)));
    s->d = vcvt_f32_f16(vreinterpret_f16_u16(vget_low_u16(dm)));
    s->dmin = vcvt_high_f32_f16(vreinterpretq_f16_u16(dm));
    /* scale bytes q[0..3], q[4..7], q[8..11] of each row (t[1..3]):
     * sub-blocks 0..3 have sc = q[j] & 63, mn = q[j+4] & 63; sub-blocks
     * 4..7 take the low and high nibbles of q[j+8] with the top 2 bits of
     * q[j], q[j+4] above */
    const uint8x16_t six = vdupq_n_u8(63);
    const uint8x16_t sc[2] = {vandq_u8(t[1], six), vsliq_n_u8(t[3], vshrq_n_u8(t[1], 6), 4)};
    const uint8x16_t mn[2] = {vandq_u8(t[2], six),
                              vsliq_n_u8(vshrq_n_u8(t[3], 4), vshrq_n_u8(t[2], 6), 4)};
#pragma GCC unroll 2
    for (int h = 0; h < 2; h++) {
        s->sc[2 * h] = vreinterpretq_s16_u16(vmovl_u8(vget_low_u8(sc[h])));
        s->sc[2 * h + 1] = vreinterpretq_s16_u16(vmovl_high_u8(sc[h]));
        s->mn[2 * h] = vreinterpretq_s16_u16(vmovl_u8(vget_low_u8(mn[h])));
        s->mn[2 * h + 1] = vreinterpretq_s16_u16(vmovl_high_u8(mn[h]));
    }
    k_coefs(4, s->sc, s->coef);
}

/* sum over sub-blocks t of v[t] (rows in lanes) * a[t]: a holds one
 * activation row's 8 sums of 32. */
EK_INLINE int32x4_t k_dot_sums(const int16x8_t v[4], int16x8_t a) {
    int32x4_t r = vmull_laneq_s16(vget_low_s16(v[0]), a, 0);
    r = vmlal_high_laneq_s16(r, v[0], a, 1);
    r = vmlal_laneq_s16(r, vget_low_s16(v[1]), a, 2);
    r = vmlal_high_laneq_s16(r, v[1], a, 3);
    r = vmlal_laneq_s16(r, vget_low_s16(v[2]), a, 4);
    r = vmlal_high_laneq_s16(r, v[2], a, 5);
    r = vmlal_laneq_s16(r, vget_low_s16(v[3]), a, 6);
    return vmlal_high_laneq_s16(r, v[3], a, 7);
}

/* RW weight rows by RX (<= K_TILE_COLS) activation rows, nb super-blocks. */
EK_INLINE void gemm_tile_k2(const int wtype, const int RW, const int RX, int nb, const char *w,
                            size_t w_stride, const char *x, size_t x_stride, float *y,
                            size_t y_stride) {
    float32x4_t acc[K_TILE_COLS];
#pragma GCC unroll 2
    for (int j = 0; j < RX; j++) acc[j] = vdupq_n_f32(0.0f);
    const size_t ahead = prefetch_ahead(w_stride), bytes = block_bytes(wtype);
    const int steps = k_steps(wtype), nv = k_step_vectors(wtype);

    for (int b = 0; b < nb; b++) {
        const char *blk[TILE_ROWS];
#pragma GCC unroll 4
        for (int i = 0; i < TILE_ROWS; i++) {
            blk[i] = w + (i < RW ? i : 0) * w_stride + b * bytes; /* absent rows: any */
            for (size_t line = 0; line < bytes; line += 64)
                __builtin_prefetch(blk[i] + ahead + line);
        }
        k_scales s;
        k_load_scales(wtype, blk, &s);

        const block_q8_K *xb[K_TILE_COLS];
        int32x4_t isum[K_TILE_COLS], run[K_TILE_COLS][TILE_ROWS];
#pragma GCC unroll 2
        for (int j = 0; j < RX; j++) {
            xb[j] = (const block_q8_K *)(x + j * x_stride) + b;
            const float dx = xb[j]->d;
            isum[j] = vdupq_n_s32(0);
#pragma GCC unroll 4
            for (int i = 0; i < TILE_ROWS; i++) run[j][i] = vdupq_n_s32(0);
            if (wtype == EK_TYPE_Q6_K) continue;
            /* the mins, and Q5_K's 16 per quant, against the sums of 32 */
            const int16x8_t sums =
                vpaddq_s16(vld1q_s16(xb[j]->bsums), vld1q_s16(xb[j]->bsums + 8));
            const float32x4_t mins = vcvtq_f32_s32(k_dot_sums(s.mn, sums));
            acc[j] = vfmsq_f32(acc[j], mins, vmulq_n_f32(s.dmin, dx));
            if (wtype == EK_TYPE_Q5_K) isum[j] = vshlq_n_s32(k_dot_sums(s.sc, sums), 4);
        }

        /* rolled: unrolling the groups makes GCC 12 spill */
#pragma GCC unroll 1
        for (int g = 0; g < K_GROUPS; g++) {
#pragma GCC unroll 4
            for (int t = 0; t < steps; t++) {
                int8x16_t ws[TILE_ROWS][2];
#pragma GCC unroll 4
                for (int i = 0; i < TILE_ROWS; i++) k_step_weights(wtype, blk[i], g, t, ws[i]);
                const int32x4_t coef = s.coef[steps * g + t];
#pragma GCC unroll 2
                for (int j = 0; j < RX; j++) {
                    int8x16_t xs[2];
                    k_step_acts(wtype, xb[j], g, t, xs);
                    isum[j] = vmlaq_s32(isum[j], k_step(RW, nv, ws, xs, run[j]), coef);
                }
            }
        }
#pragma GCC unroll 2
        for (int j = 0; j < RX; j++)
            acc[j] = vfmaq_f32(acc[j], vcvtq_f32_s32(isum[j]), vmulq_n_f32(s.d, xb[j]->d));
    }

#pragma GCC unroll 2
    for (int j = 0; j < RX; j++) {
        if (RW == TILE_ROWS) {
            vst1q_f32(y + j * y_stride, acc[j]);
        } else {
            float out[TILE_ROWS];
            vst1q_f32(out, acc[j]);
            for (int i = 0; i < RW; i++) y[j * y_stride + i] = out[i];
        }
    }
}

/* RW weight rows by RX activation rows: K_TILE_COLS at a time. */
EK_INLINE void gemm_tile_k(const int wtype, const int RW, const int RX, int nb, const char *w,
                           size_t w_stride, const char *x, size_t x_stride, float *y,
                           size_t y_stride) {
#pragma GCC unroll 2
    for (int j = 0; j < RX; j += K_TILE_COLS)
        gemm_tile_k2(wtype, RW, RX - j < K_TILE_COLS ? RX - j : K_TILE_COLS, nb, w, w_stride,
                     x + j * x_stride, x_stride, y + j * y_stride, y_stride);
}

#endif
