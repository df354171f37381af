/* The NEON table with sdot (armv8.2-a+dotprod) for the integer dot
 * products; every other kernel is the plain NEON one. */
#define EK_NEON_DOTPROD 1
#include "gemm_neon.h"

EK_GEMM_ENTRY(gemm_q4_0_q8_0_neon_dotprod, EK_TYPE_Q4_0)
EK_GEMM_ENTRY(gemm_q4_1_q8_1_neon_dotprod, EK_TYPE_Q4_1)
EK_GEMM_ENTRY(gemm_q8_0_q8_0_neon_dotprod, EK_TYPE_Q8_0)
EK_GEMM_ENTRY(gemm_q5_0_q8_0_neon_dotprod, EK_TYPE_Q5_0)
EK_GEMM_ENTRY(gemm_q5_1_q8_1_neon_dotprod, EK_TYPE_Q5_1)
EK_GEMM_ENTRY(gemm_iq4_nl_q8_0_neon_dotprod, EK_TYPE_IQ4_NL)
EK_GEMM_ENTRY(gemm_q4_K_q8_K_neon_dotprod, EK_TYPE_Q4_K)
EK_GEMM_ENTRY(gemm_q5_K_q8_K_neon_dotprod, EK_TYPE_Q5_K)
EK_GEMM_ENTRY(gemm_q6_K_q8_K_neon_dotprod, EK_TYPE_Q6_K)
EK_GEMM_X8_ENTRY(gemm_x8_q4_0_q8_0_neon_dotprod, EK_TYPE_Q4_0)
EK_GEMM_X8_ENTRY(gemm_x8_q4_1_q8_1_neon_dotprod, EK_TYPE_Q4_1)
EK_GEMM_X8_ENTRY(gemm_x8_q8_0_q8_0_neon_dotprod, EK_TYPE_Q8_0)

const ek_kernels ek_kernels_neon_dotprod = {
    .name = "neon_dotprod",
    .types = {EK_NEON_TYPE_OPS(neon_dotprod)},
    EK_NEON_FLOAT_OPS,
};
