/* The AVX-512 VNNI table's x8 gemms: the AVX-VNNI ones through the 256-bit
 * form of AVX-512's dpbusd (a 32-byte load holds the same 4 columns of a
 * group's 8 rows, so an x8 block fills a ymm register exactly). The zmm
 * tiles of quants_avx512.c serve only matrices too small to repack. */
#define EK_X86_VNNI 2
#include "gemm_avx2.h"

EK_GEMM_X8_ENTRY(gemm_x8_q4_0_q8_0_avx512_vnni, EK_TYPE_Q4_0)
EK_GEMM_X8_ENTRY(gemm_x8_q4_1_q8_1_avx512_vnni, EK_TYPE_Q4_1)
EK_GEMM_X8_ENTRY(gemm_x8_q8_0_q8_0_avx512_vnni, EK_TYPE_Q8_0)
