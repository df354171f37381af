/* The activation row quantizers, the same loop on every architecture. A SIMD
 * file defines quantize_block (one block's quants; returns its f32 scale and
 * the sum of its quants) and f32_to_f16, includes this, then names its pair,
 * e.g. EK_ROW_QUANTIZERS(neon) for quantize_row_q8_0_neon and _q8_1_neon. */
#ifndef EDGE_KERNELS_ROW_QUANTIZERS_H
#define EDGE_KERNELS_ROW_QUANTIZERS_H

#define EK_ROW_QUANTIZERS(suffix)                                                         \
    void quantize_row_q8_0_##suffix(const float *x, void *vy, int n) {                    \
        block_q8_0 *y = vy;                                                               \
        for (int b = 0; b < n / EK_QK; b++) {                                             \
            int sum;                                                                      \
            y[b].d = f32_to_f16(quantize_block(x + b * EK_QK, y[b].qs, &sum));            \
        }                                                                                 \
    }                                                                                     \
    /* q8_1 also keeps d * sum(q), which the q4_1 dot needs for the weights' offset */    \
    void quantize_row_q8_1_##suffix(const float *x, void *vy, int n) {                    \
        block_q8_1 *y = vy;                                                               \
        for (int b = 0; b < n / EK_QK; b++) {                                             \
            int sum;                                                                      \
            const float d = quantize_block(x + b * EK_QK, y[b].qs, &sum);                 \
            y[b].d = d;                                                                   \
            y[b].s = d * (float)sum;                                                      \
        }                                                                                 \
    }

#endif
