/* A persistent pool of worker threads for the forward pass.
 *
 * ek_pool_run runs fn(ctx, ith, nth) on every thread (the caller is thread
 * 0) and returns when all have finished: the whole forward pass is one run,
 * so a token costs one wake-up rather than one per matmul.
 *
 * Inside a run, work is split into ops (a matmul, a norm over the batch),
 * each cut into chunks that threads claim until none are left; then they
 * wait for the op's last chunk before starting the next op. Every thread
 * runs the same sequence of ops, so ops are known by their place in it. A
 * thread the OS descheduled does not hold up the others unless it had
 * claimed a chunk: the rest take its share, and when it runs again it finds
 * the ops it missed already done. (A barrier per op would stall every op for
 * the length of the missing thread's time slice, which on a board shared
 * with other programs cost us nine tenths of the speed.)
 *
 *     ek_cursor c = ek_cursor_start(pool);
 *     for (int i; (i = ek_claim(&c, n_chunks)) >= 0;)
 *         do_chunk(i);
 *     ek_op_wait(&c, n_chunks);   // all done; c moves to the next op
 *
 * Runs are serialised: one caller at a time per pool. */
#ifndef EDGE_THREADPOOL_H
#define EDGE_THREADPOOL_H

typedef struct ek_pool ek_pool;
typedef void (*ek_pool_fn)(void *ctx, int ith, int nth);

ek_pool *ek_pool_create(int n_threads); /* NULL on failure */
double ek_now_s(void);                  /* a monotonic clock, in seconds */
void ek_pool_destroy(ek_pool *pool);
void ek_pool_run(ek_pool *pool, ek_pool_fn fn, void *ctx);

/* One thread's place in the run's sequence of ops. */
typedef struct {
    ek_pool *pool;
    int base;     /* chunks of all earlier ops in this run */
    int claimed;  /* chunks of the current op claimed, not yet reported done */
} ek_cursor;

ek_cursor ek_cursor_start(ek_pool *pool);
/* Claims the next of the current op's n_chunks: its index, or -1 when all
 * are claimed (the chunks this thread took are then reported done, so call
 * it again only once they are). */
int ek_claim(ek_cursor *c, int n_chunks);
/* After ek_claim returned -1: waits until every chunk of the op is done. */
void ek_op_wait(ek_cursor *c, int n_chunks);

#endif
