#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "edge_bandwidth.h"
#include "edge_kernels.h"
#include "edge_threadpool.h"

typedef struct {
    const uint64_t *data;
    size_t n;            /* words */
    uint64_t sums[256];  /* one per thread, so the reads cannot be optimised away */
} read_job;

static void read_worker(void *ctx, int ith, int nth) {
    read_job *j = ctx;
    size_t per = j->n / (size_t)nth, lo = per * (size_t)ith, hi = ith == nth - 1 ? j->n : lo + per;
    /* Four independent accumulators keep enough loads in flight; the
     * compiler vectorises the loop for the target's SIMD width. */
    uint64_t a = 0, b = 0, c = 0, d = 0;
    size_t i = lo;
    for (; i + 4 <= hi; i += 4) {
        a += j->data[i];
        b += j->data[i + 1];
        c += j->data[i + 2];
        d += j->data[i + 3];
    }
    for (; i < hi; i++) a += j->data[i];
    j->sums[ith] = a + b + c + d;
}

double ek_read_bandwidth(int n_threads, size_t bytes, int reps) {
    if (n_threads < 1 || n_threads > 256 || bytes < 4096 || reps < 1) return -EK_EINVAL;
    uint64_t *data = malloc(bytes);
    ek_pool *pool = ek_pool_create(n_threads);
    if (!data || !pool) {
        free(data);
        ek_pool_destroy(pool);
        return -EK_ENOMEM;
    }
    memset(data, 1, bytes); /* touch every page before timing */
    read_job job = {data, bytes / sizeof(uint64_t), {0}};
    double best = 0.0;
    for (int r = 0; r < reps; r++) {
        double t0 = ek_now_s();
        ek_pool_run(pool, read_worker, &job);
        double dt = ek_now_s() - t0;
        if (dt > 0 && bytes / dt / 1e9 > best) best = bytes / dt / 1e9;
    }
    ek_pool_destroy(pool);
    free(data);
    return best;
}
