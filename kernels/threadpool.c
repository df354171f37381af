/* Workers spin for a while between runs and then sleep on a condition
 * variable, so an idle runtime costs no CPU. Decode issues one run per
 * token, and between two the engine samples and files the token in Python
 * (a few hundred microseconds): the spin lasts longer than that, as waking
 * a sleeper costs about as much again on a VM.
 *
 * Waits inside a run (for an op's last chunk, for the workers at the end)
 * spin for a few microseconds, then sleep on a futex. On an idle machine
 * nobody sleeps; on a board shared with other programs, a thread waiting
 * for a descheduled partner's chunk gives its core away, and the partner
 * is soon moved onto it. */
#define _GNU_SOURCE
#include <assert.h>
#include <limits.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#if defined(__linux__)
#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include "edge_threadpool.h"

#define SPIN_BEFORE_SLEEP_S 2e-3 /* between runs; measured by the clock, as pause's
                                    * length differs tenfold between CPUs */
#define WAIT_SPINS 4000

struct ek_pool {
    int n_threads;
    pthread_t *threads;
    pthread_mutex_t run_lock; /* one run at a time */

    pthread_mutex_t lock; /* guards sleeping workers */
    pthread_cond_t wake;
    atomic_int generation; /* bumped to start a run */
    atomic_int finished;   /* workers done with the current run */
    atomic_int stop;

    ek_pool_fn fn;
    void *ctx;

    /* Apart on their own cache lines: claimers hammer the first while
     * waiters poll the second. */
    _Alignas(64) atomic_int next_chunk; /* chunks claimed so far in this run, over all ops */
    _Alignas(64) atomic_int done_chunks; /* chunks finished so far in this run */
    atomic_int sleepers;                 /* threads asleep on finished or done_chunks */
};

typedef struct {
    ek_pool *pool;
    int ith;
} worker_arg;

static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

double ek_now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

static void futex_wait(atomic_int *word, int seen) {
#if defined(__linux__)
    syscall(SYS_futex, (int *)word, FUTEX_WAIT_PRIVATE, seen, NULL, NULL, 0);
#else
    (void)word, (void)seen;
    sched_yield();
#endif
}

static void futex_wake_all(atomic_int *word) {
#if defined(__linux__)
    syscall(SYS_futex, (int *)word, FUTEX_WAKE_PRIVATE, INT_MAX, NULL, NULL, 0);
#else
    (void)word;
#endif
}

/* Adds to a counter that other threads may be waiting on. */
static void count_up(ek_pool *pool, atomic_int *counter, int n) {
    atomic_fetch_add(counter, n);
    if (atomic_load(&pool->sleepers) > 0) futex_wake_all(counter);
}

/* Returns once *counter >= target. A sleeper is counted before its last
 * look at the counter, so the thread that moves the counter either sees it
 * and wakes it, or moved it first and the futex returns at once. */
static void wait_for(ek_pool *pool, atomic_int *counter, int target) {
    for (int spins = 0; spins < WAIT_SPINS; spins++) {
        if (atomic_load_explicit(counter, memory_order_acquire) >= target) return;
        cpu_relax();
    }
    atomic_fetch_add(&pool->sleepers, 1);
    for (int seen; (seen = atomic_load(counter)) < target;) futex_wait(counter, seen);
    atomic_fetch_sub(&pool->sleepers, 1);
}

ek_cursor ek_cursor_start(ek_pool *pool) { return (ek_cursor){pool, 0, 0}; }

int ek_claim(ek_cursor *c, int n_chunks) {
    ek_pool *pool = c->pool;
    /* Every earlier op is done, so all its chunks were claimed: the counter
     * stands inside this op or past it. */
    int end = c->base + n_chunks;
    int next = atomic_load_explicit(&pool->next_chunk, memory_order_acquire);
    assert(next >= c->base);
    while (next < end) {
        if (atomic_compare_exchange_weak(&pool->next_chunk, &next, next + 1)) {
            c->claimed++;
            return next - c->base;
        }
    }
    /* Nothing left to claim, so everything this thread claimed is finished:
     * one report per op rather than one per chunk. */
    if (c->claimed) {
        count_up(pool, &pool->done_chunks, c->claimed);
        c->claimed = 0;
    }
    return -1;
}

void ek_op_wait(ek_cursor *c, int n_chunks) {
    c->base += n_chunks;
    wait_for(c->pool, &c->pool->done_chunks, c->base);
}

static void *worker_main(void *p) {
    worker_arg *arg = p;
    ek_pool *pool = arg->pool;
    int ith = arg->ith;
    free(arg);
    int seen = 0;
    for (;;) {
        int spins = 0;
        double since = ek_now_s();
        while (atomic_load_explicit(&pool->generation, memory_order_acquire) == seen &&
               !atomic_load(&pool->stop)) {
            if (++spins % 256 || ek_now_s() - since < SPIN_BEFORE_SLEEP_S) {
                cpu_relax();
                continue;
            }
            pthread_mutex_lock(&pool->lock);
            while (atomic_load(&pool->generation) == seen && !atomic_load(&pool->stop))
                pthread_cond_wait(&pool->wake, &pool->lock);
            pthread_mutex_unlock(&pool->lock);
        }
        if (atomic_load(&pool->stop)) return NULL;
        seen = atomic_load(&pool->generation);
        pool->fn(pool->ctx, ith, pool->n_threads);
        count_up(pool, &pool->finished, 1);
    }
}

ek_pool *ek_pool_create(int n_threads) {
    if (n_threads < 1) n_threads = 1;
    /* aligned, so the counters' cache lines are their own */
    size_t size = (sizeof(ek_pool) + 63) / 64 * 64;
    ek_pool *pool = aligned_alloc(64, size);
    if (!pool) return NULL;
    memset(pool, 0, size);
    pool->n_threads = n_threads;
    pthread_mutex_init(&pool->run_lock, NULL);
    pthread_mutex_init(&pool->lock, NULL);
    pthread_cond_init(&pool->wake, NULL);
    pool->threads = calloc((size_t)n_threads, sizeof(pthread_t));
    if (!pool->threads) {
        ek_pool_destroy(pool);
        return NULL;
    }
    for (int i = 1; i < n_threads; i++) {
        worker_arg *arg = malloc(sizeof *arg);
        if (!arg || pthread_create(&pool->threads[i], NULL, worker_main,
                                   (*arg = (worker_arg){pool, i}, arg)) != 0) {
            free(arg);
            pool->n_threads = i; /* destroy joins only the ones started */
            ek_pool_destroy(pool);
            return NULL;
        }
    }
    return pool;
}

void ek_pool_destroy(ek_pool *pool) {
    if (!pool) return;
    pthread_mutex_lock(&pool->lock);
    atomic_store(&pool->stop, 1);
    pthread_cond_broadcast(&pool->wake);
    pthread_mutex_unlock(&pool->lock);
    for (int i = 1; i < pool->n_threads; i++) pthread_join(pool->threads[i], NULL);
    free(pool->threads);
    pthread_mutex_destroy(&pool->run_lock);
    pthread_mutex_destroy(&pool->lock);
    pthread_cond_destroy(&pool->wake);
    free(pool);
}


void ek_pool_run(ek_pool *pool, ek_pool_fn fn, void *ctx) {
    pthread_mutex_lock(&pool->run_lock);
    pool->fn = fn;
    pool->ctx = ctx;
    atomic_store(&pool->finished, 0);
    atomic_store(&pool->next_chunk, 0);
    atomic_store(&pool->done_chunks, 0);
    pthread_mutex_lock(&pool->lock);
    atomic_fetch_add_explicit(&pool->generation, 1, memory_order_release);
    pthread_cond_broadcast(&pool->wake);
    pthread_mutex_unlock(&pool->lock);

    fn(ctx, 0, pool->n_threads);
    wait_for(pool, &pool->finished, pool->n_threads - 1);
    pthread_mutex_unlock(&pool->run_lock);
}
