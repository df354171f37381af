/* The x8 layout (edge_kernels.h): packing a tensor at load, and reading a
 * block back in the file's layout (embedding lookups, the reference gemm). */
#define _DEFAULT_SOURCE /* madvise */
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "edge_kernels.h"

int ek_x8_layout(int type) {
    return type == EK_TYPE_Q4_0 || type == EK_TYPE_Q4_1 || type == EK_TYPE_Q8_0;
}

/* The scale part of a block in the file: d, then m for Q4_1. */
static size_t head_bytes(int type) { return type == EK_TYPE_Q4_1 ? 4 : 2; }

/* Where byte j of row i's quants of a block lies among the block's
 * interleaved quants. */
static size_t quant_offset(int i, int j) {
    return (size_t)(j / EK_X8_PIECE) * EK_X8_ROWS * EK_X8_PIECE + (size_t)i * EK_X8_PIECE +
           (size_t)(j % EK_X8_PIECE);
}

/* One group: rows [0, 8) of src, row_bytes apart, into dst. */
static void pack_group(int type, const uint8_t *src, size_t row_bytes, int nb, uint8_t *dst) {
    const size_t bb = ek_type_block_bytes(type), hb = head_bytes(type);
    const int qb = (int)ek_x8_quant_bytes(type);
    for (int i = 0; i < EK_X8_ROWS; i++) {
        const uint8_t *row = src + (size_t)i * row_bytes;
        for (int b = 0; b < nb; b++) {
            const uint8_t *blk = row + (size_t)b * bb;
            uint8_t *scales = dst + (size_t)b * ek_x8_scale_bytes(type);
            memcpy(scales + 2 * i, blk, 2); /* d */
            if (type == EK_TYPE_Q4_1) memcpy(scales + 2 * (EK_X8_ROWS + i), blk + 2, 2); /* m */
            uint8_t *quants = (uint8_t *)ek_x8_quants(type, dst, nb, b);
            for (int j = 0; j < qb; j += EK_X8_PIECE)
                memcpy(quants + quant_offset(i, j), blk + hb + j, EK_X8_PIECE);
        }
    }
}

static uintptr_t page_size(void) { return (uintptr_t)sysconf(_SC_PAGESIZE); }

/* Hands back the pages of [lo, hi), rounded out to whole pages: the kernel
 * drops them from this process and reads them from the file again if they
 * are ever touched, so rounding out can only cost a re-read. */
void ek_release_mapped(const void *lo, const void *hi) {
    const uintptr_t page = page_size();
    const uintptr_t a = (uintptr_t)lo / page * page, b = ((uintptr_t)hi + page - 1) / page * page;
    if (b > a) madvise((void *)a, b - a, MADV_DONTNEED);
}

#define RELEASE_EVERY (1u << 20) /* bytes of source consumed between releases */

void ek_x8_pack(int type, const void *src, void *dst, int rows, int cols, int release) {
    const size_t row_bytes = ek_row_bytes(type, cols), group = EK_X8_ROWS * row_bytes;
    const int nb = cols / EK_QK, groups = rows / EK_X8_ROWS;
    const uint8_t *s = src, *released = s;
    uint8_t *d = dst;
    for (int g = 0; g < groups; g++) {
        pack_group(type, s + g * group, row_bytes, nb, d + g * group);
        /* the pages wholly consumed so far: the one under construction stays */
        const uint8_t *done = s + (g + 1) * group;
        const uint8_t *edge = (const uint8_t *)((uintptr_t)done / page_size() * page_size());
        if (release && edge > released && (size_t)(edge - released) >= RELEASE_EVERY) {
            ek_release_mapped(released, edge);
            released = edge;
        }
    }
    const size_t packed = (size_t)groups * group, total = (size_t)rows * row_bytes;
    memcpy(d + packed, s + packed, total - packed); /* the last rows, as in the file */
    if (release) ek_release_mapped(released, s + total);
}

void ek_x8_block(int type, const void *group, int nb, int i, int b, void *dst) {
    const uint8_t *scales = (const uint8_t *)ek_x8_d(type, group, b);
    const uint8_t *quants = ek_x8_quants(type, group, nb, b);
    uint8_t *blk = dst;
    memcpy(blk, scales + 2 * i, 2);
    if (type == EK_TYPE_Q4_1) memcpy(blk + 2, scales + 2 * (EK_X8_ROWS + i), 2);
    for (int j = 0; j < (int)ek_x8_quant_bytes(type); j += EK_X8_PIECE)
        memcpy(blk + head_bytes(type) + j, quants + quant_offset(i, j), EK_X8_PIECE);
}
