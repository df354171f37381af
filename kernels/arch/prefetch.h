/* How far ahead of the weights being read every SIMD gemm prefetches. */
#ifndef EDGE_KERNELS_PREFETCH_H
#define EDGE_KERNELS_PREFETCH_H

/* Weight rows are streamed from memory once per token: fetch the rows about
 * PREFETCH_BYTES ahead while a tile computes, so memory latency hides behind
 * the arithmetic instead of stalling it. Measured on x86: without it, decode
 * on one thread ran at a third of the speed. */
#ifndef PREFETCH_BYTES
#define PREFETCH_BYTES 8192
#endif

#endif
