/* The fp32 product of packed CPU layers at decode batch sizes (`thinfer.kernels.cpu_qgemm.
 * f32_matmul`): y[M, N] = x[M, K] W^T (+ bias), weights streamed once; one activation row
 * takes pairs of weight rows, more take blocks of 4 (`block_product`), split across the
 * OpenMP threads. */
#include "fp32_tiles.h"
#include "kernels.h"

/* x [M, K] fp32; weight [N, K] fp32, bias [N] or NULL -> y [M, N] (weights that need no
 * widening). */
void f32_linear(const float *x, int64_t m, int64_t k, const float *weight, int64_t n,
                const float *bias, float *y) {
    if (m <= 0) return; /* no rows (a step that samples nothing): nothing to write */
    if (m > 1) {
#pragma omp parallel for schedule(static)
        for (int64_t block = 0; block < (n + BLOCK_W_ROWS - 1) / BLOCK_W_ROWS; block++) {
            const int64_t row = BLOCK_W_ROWS * block;
            const int w_rows = n - row < BLOCK_W_ROWS ? (int)(n - row) : BLOCK_W_ROWS;
            block_product(weight + row * k, k, w_rows, x, m, k, NULL, bias ? bias + row : NULL,
                          y + row, n);
        }
        return;
    }
#pragma omp parallel for schedule(static)
    for (int64_t pair = 0; pair < (n + 1) / 2; pair++) {
        const int64_t row = 2 * pair;
        const int w_rows = row + 1 < n ? 2 : 1;
        float dots[2];
        fp32_pair_dots(weight + row * k, w_rows, x, k, dots);
        for (int j = 0; j < w_rows; j++) y[row + j] = dots[j] + (bias ? bias[row + j] : 0);
    }
}
