/* The one place that decides which kernel table runs: CPU features are
 * checked once, and $EDGE_SLM_BACKEND can force any table the CPU supports
 * so every path can be tested on the machine at hand. */
#include <stdlib.h>
#include <string.h>

#include "edge_kernels.h"

#if defined(__aarch64__) && defined(__linux__)
#include <sys/auxv.h>
/* Bits of the kernel's ABI, for C libraries too old to name them. */
#ifndef HWCAP_ASIMDDP
#define HWCAP_ASIMDDP (1UL << 20)
#endif
#ifndef HWCAP2_I8MM
#define HWCAP2_I8MM (1UL << 13)
#endif
#endif

#if defined(__x86_64__) || defined(_M_X64)
static int cpu_has_avx2(void) {
#if defined(__GNUC__) || defined(__clang__)
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
           __builtin_cpu_supports("f16c");
#else
    return 0;
#endif
}

static int cpu_has_avx_vnni(void) {
#if defined(__GNUC__) || defined(__clang__)
    return cpu_has_avx2() && __builtin_cpu_supports("avxvnni");
#else
    return 0;
#endif
}

static int cpu_has_avx512_vnni(void) {
#if defined(__GNUC__) || defined(__clang__)
    return cpu_has_avx2() && __builtin_cpu_supports("avx512f") &&
           __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
           __builtin_cpu_supports("avx512vnni");
#else
    return 0;
#endif
}
#endif

#if defined(__aarch64__)
/* Elsewhere than Linux we cannot ask, so only plain NEON is used. */
static int cpu_has_dotprod(void) {
#if defined(__linux__)
    return (getauxval(AT_HWCAP) & HWCAP_ASIMDDP) != 0;
#else
    return 0;
#endif
}

static int cpu_has_i8mm(void) {
#if defined(__linux__)
    return cpu_has_dotprod() && (getauxval(AT_HWCAP2) & HWCAP2_I8MM) != 0;
#else
    return 0;
#endif
}
#endif

const ek_kernels *const *ek_available(void) {
    /* Built once from read-only facts (the CPU), so concurrent first calls
     * write the same values. */
    static const ek_kernels *list[6];
    int n = 0;
#if defined(__aarch64__)
    if (cpu_has_i8mm()) list[n++] = &ek_kernels_neon_i8mm; /* also uses dotprod */
    if (cpu_has_dotprod()) list[n++] = &ek_kernels_neon_dotprod;
    list[n++] = &ek_kernels_neon; /* NEON is part of armv8-a */
#endif
#if defined(__x86_64__) || defined(_M_X64)
    if (cpu_has_avx512_vnni()) list[n++] = &ek_kernels_avx512_vnni;
    if (cpu_has_avx_vnni()) list[n++] = &ek_kernels_avx_vnni;
    if (cpu_has_avx2()) list[n++] = &ek_kernels_avx2;
#endif
    list[n++] = &ek_kernels_ref;
    list[n] = NULL;
    return list;
}

const ek_kernels *ek_find(const char *name) {
    for (const ek_kernels *const *k = ek_available(); *k; k++)
        if (strcmp((*k)->name, name) == 0) return *k;
    return NULL;
}

const ek_kernels *ek_best(void) {
    const char *forced = getenv("EDGE_SLM_BACKEND");
    if (forced && *forced) {
        const ek_kernels *k = ek_find(forced);
        if (k) return k;
    }
    return ek_available()[0];
}
