/* A persistent pool of worker threads for the forward pass.
 *
 * ek_pool_run runs fn(ctx, ith, nth) on every thread (the caller is thread
 * 0) and returns when all have finished. Inside fn, ek_pool_barrier is the
 * only synchronisation: the whole forward pass is one run with a barrier
 * between ops, so a token costs one wake-up rather than one per matmul.
 * Runs are serialised: one caller at a time per pool. */
#ifndef EDGE_THREADPOOL_H
#define EDGE_THREADPOOL_H

typedef struct ek_pool ek_pool;
typedef void (*ek_pool_fn)(void *ctx, int ith, int nth);

ek_pool *ek_pool_create(int n_threads); /* NULL on failure */
void ek_pool_destroy(ek_pool *pool);
int ek_pool_size(const ek_pool *pool);
void ek_pool_run(ek_pool *pool, ek_pool_fn fn, void *ctx);
void ek_pool_barrier(ek_pool *pool);

#endif
