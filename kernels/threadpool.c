/* Workers spin briefly between runs (decode issues one run per token, so the
 * next one usually comes within microseconds) and then sleep on a condition
 * variable, so an idle runtime costs no CPU.
 *
 * Barriers spin for a few microseconds, then sleep on a futex. On an idle
 * machine nobody sleeps and a barrier costs well under a microsecond; on a
 * board shared with other programs, a thread whose partner was descheduled
 * gives its core away instead of spinning through the partner's time slice.
 * That is kinder to the other programs but does not make us fast there: with
 * a barrier after every op, each descheduling still stalls the whole pass. */
#define _GNU_SOURCE
#include <limits.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdlib.h>
#if defined(__linux__)
#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include "edge_threadpool.h"

#define SPINS_BEFORE_SLEEP 20000
#define BARRIER_SPINS 4000

struct ek_pool {
    int n_threads;
    pthread_t *threads;
    pthread_mutex_t run_lock; /* one run at a time */

    pthread_mutex_t lock; /* guards sleeping workers */
    pthread_cond_t wake;
    atomic_int generation; /* bumped to start a run */
    atomic_int running;    /* workers still inside the current run */
    atomic_int stop;

    ek_pool_fn fn;
    void *ctx;

    atomic_int barrier_count;
    atomic_int barrier_phase;   /* bumped when the last thread arrives */
    atomic_int barrier_sleepers; /* threads asleep on barrier_phase */
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

static void phase_wait(atomic_int *phase, int seen) {
#if defined(__linux__)
    syscall(SYS_futex, (int *)phase, FUTEX_WAIT_PRIVATE, seen, NULL, NULL, 0);
#else
    (void)phase, (void)seen;
    sched_yield();
#endif
}

static void phase_wake_all(atomic_int *phase) {
#if defined(__linux__)
    syscall(SYS_futex, (int *)phase, FUTEX_WAKE_PRIVATE, INT_MAX, NULL, NULL, 0);
#else
    (void)phase;
#endif
}

void ek_pool_barrier(ek_pool *pool) {
    if (pool->n_threads == 1) return;
    int phase = atomic_load(&pool->barrier_phase);
    if (atomic_fetch_add(&pool->barrier_count, 1) == pool->n_threads - 1) {
        atomic_store(&pool->barrier_count, 0);
        atomic_fetch_add(&pool->barrier_phase, 1);
        if (atomic_load(&pool->barrier_sleepers) > 0) phase_wake_all(&pool->barrier_phase);
        return;
    }
    for (int spins = 0; spins < BARRIER_SPINS; spins++) {
        if (atomic_load_explicit(&pool->barrier_phase, memory_order_acquire) != phase) return;
        cpu_relax();
    }
    /* Counted as a sleeper before the last check, so the last arrival either
     * sees us and wakes us, or has already moved the phase and the futex
     * returns at once. */
    atomic_fetch_add(&pool->barrier_sleepers, 1);
    while (atomic_load(&pool->barrier_phase) == phase) phase_wait(&pool->barrier_phase, phase);
    atomic_fetch_sub(&pool->barrier_sleepers, 1);
}

static void *worker_main(void *p) {
    worker_arg *arg = p;
    ek_pool *pool = arg->pool;
    int ith = arg->ith;
    free(arg);
    int seen = 0;
    for (;;) {
        int spins = 0;
        while (atomic_load_explicit(&pool->generation, memory_order_acquire) == seen &&
               !atomic_load(&pool->stop)) {
            if (++spins < SPINS_BEFORE_SLEEP) {
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
        atomic_fetch_sub_explicit(&pool->running, 1, memory_order_acq_rel);
    }
}

ek_pool *ek_pool_create(int n_threads) {
    if (n_threads < 1) n_threads = 1;
    ek_pool *pool = calloc(1, sizeof *pool);
    if (!pool) return NULL;
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

int ek_pool_size(const ek_pool *pool) { return pool->n_threads; }

void ek_pool_run(ek_pool *pool, ek_pool_fn fn, void *ctx) {
    pthread_mutex_lock(&pool->run_lock);
    pool->fn = fn;
    pool->ctx = ctx;
    atomic_store(&pool->running, pool->n_threads - 1);
    pthread_mutex_lock(&pool->lock);
    atomic_fetch_add_explicit(&pool->generation, 1, memory_order_release);
    pthread_cond_broadcast(&pool->wake);
    pthread_mutex_unlock(&pool->lock);

    fn(ctx, 0, pool->n_threads);

    for (int spins = 0; atomic_load_explicit(&pool->running, memory_order_acquire) > 0; spins++) {
        if (spins < 1000)
            cpu_relax();
        else
            sched_yield();
    }
    pthread_mutex_unlock(&pool->run_lock);
}
