/* The AVX2 table with AVX-VNNI (vpdpbusd) for the integer dot products;
 * every other kernel is the AVX2 one. */
#define EK_X86_VNNI 1
#include "gemm_avx2.h"

static EK_GEMM_ENTRY(gemm_q4_0_q8_0_avx_vnni, EK_TYPE_Q4_0)
static EK_GEMM_ENTRY(gemm_q4_1_q8_1_avx_vnni, EK_TYPE_Q4_1)
static EK_GEMM_ENTRY(gemm_q8_0_q8_0_avx_vnni, EK_TYPE_Q8_0)
EK_GEMM_X8_ENTRY(gemm_x8_q4_0_q8_0_avx_vnni, EK_TYPE_Q4_0)
EK_GEMM_X8_ENTRY(gemm_x8_q4_1_q8_1_avx_vnni, EK_TYPE_Q4_1)
EK_GEMM_X8_ENTRY(gemm_x8_q8_0_q8_0_avx_vnni, EK_TYPE_Q8_0)

const ek_kernels ek_kernels_avx_vnni = {
    .name = "avx_vnni",
    .types = {EK_AVX2_TYPE_OPS(avx_vnni)},
    EK_AVX2_FLOAT_OPS,
};
