/* The fp32 GEMV of packed CPU layers at decode batch sizes (`thinfer.kernels.cpu_qgemm.
 * f32_matmul`): y[M, N] = x[M, K] W^T (+ bias), weights streamed once, pairs of rows split
 * across the OpenMP threads. */
#include "fp32_tiles.h"

/* x [M, K] fp32; weight [N, K] fp32, bias [N] or NULL -> y [M, N]: the fp32 tiles on weights
 * that need no widening (the batch-1 fp32 decode, where a GEMV streams the weights
 * once). */
void f32_linear(const float *x, int64_t m, int64_t k, const float *weight, int64_t n,
                const float *bias, float *y) {
#pragma omp parallel
    {
        float dots[2][ROWS_PER_TILE];
#pragma omp for schedule(static)
        for (int64_t pair = 0; pair < (n + 1) / 2; pair++) {
            const int64_t row = 2 * pair;
            const int w_rows = row + 1 < n ? 2 : 1;
            for (int64_t first = 0; first < m; first += ROWS_PER_TILE) {
                const int rows = m - first < ROWS_PER_TILE ? (int)(m - first) : ROWS_PER_TILE;
                fp32_tile(weight + row * k, w_rows, x + first * k, k, rows, dots);
                for (int j = 0; j < w_rows; j++)
                    for (int r = 0; r < rows; r++)
                        y[(first + r) * n + row + j] = dots[j][r] + (bias ? bias[row + j] : 0);
            }
        }
    }
}
