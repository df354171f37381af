/* A STREAM-style read test: how fast this machine streams memory into the
 * cores, the bound that decoding a memory-bound model cannot beat. */
#ifndef EDGE_BANDWIDTH_H
#define EDGE_BANDWIDTH_H

#include <stddef.h>

/* Reads a buffer of `bytes` (well beyond the caches) `reps` times with
 * n_threads threads, each summing its share. Returns the best GB/s
 * (1e9 bytes) over the repetitions, or a negative status on failure. */
double ek_read_bandwidth(int n_threads, size_t bytes, int reps);

#endif
