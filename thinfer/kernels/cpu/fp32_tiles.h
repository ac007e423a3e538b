/* Shared by the CPU kernels: the horizontal sum of a vector, an fp32 dot, and the fp32 dot
 * tiles (up to 2 weight rows against up to ROWS_PER_TILE activation rows, each activation
 * load serving both weight rows; K a multiple of 8). */
#ifndef THINFER_FP32_TILES_H
#define THINFER_FP32_TILES_H

#include <immintrin.h>
#include <stdint.h>

#define ROWS_PER_TILE 4

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* fp32 dot of a [len] and b [len] */
static inline float dot_floats(const float *a, const float *b, int64_t len) {
    __m256 acc = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= len; i += 8)
        acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
    float sum = hsum(acc);
    for (; i < len; i++) sum += a[i] * b[i];
    return sum;
}

/* dots[j][r] = fp32 dot of weight row j [K] (of `w_rows` <= 2, `k` apart) with x row r, for
 * `rows` <= ROWS_PER_TILE rows of x [., K]: each x load serves both weight rows. */
static inline void fp32_tile_dots(const float *w, int w_rows, const float *x, int64_t k,
                                  int rows, float dots[2][ROWS_PER_TILE]) {
    __m256 acc[2][ROWS_PER_TILE];
    for (int j = 0; j < w_rows; j++)
        for (int r = 0; r < rows; r++) acc[j][r] = _mm256_setzero_ps();
    for (int64_t i = 0; i < k; i += 8) {
        const __m256 first = _mm256_loadu_ps(w + i);
        const __m256 second = w_rows > 1 ? _mm256_loadu_ps(w + k + i) : first;
        for (int r = 0; r < rows; r++) {
            const __m256 values = _mm256_loadu_ps(x + r * k + i);
            acc[0][r] = _mm256_fmadd_ps(first, values, acc[0][r]);
            if (w_rows > 1) acc[1][r] = _mm256_fmadd_ps(second, values, acc[1][r]);
        }
    }
    for (int j = 0; j < w_rows; j++)
        for (int r = 0; r < rows; r++) dots[j][r] = hsum(acc[j][r]);
}

static inline void fp32_tile(const float *w, int w_rows, const float *x, int64_t k, int rows,
                      float dots[2][ROWS_PER_TILE]) {
    if (w_rows == 2) {
        switch (rows) {
            case 4: fp32_tile_dots(w, 2, x, k, 4, dots); return;
            case 3: fp32_tile_dots(w, 2, x, k, 3, dots); return;
            case 2: fp32_tile_dots(w, 2, x, k, 2, dots); return;
            default: fp32_tile_dots(w, 2, x, k, 1, dots); return;
        }
    }
    switch (rows) {
        case 4: fp32_tile_dots(w, 1, x, k, 4, dots); return;
        case 3: fp32_tile_dots(w, 1, x, k, 3, dots); return;
        case 2: fp32_tile_dots(w, 1, x, k, 2, dots); return;
        default: fp32_tile_dots(w, 1, x, k, 1, dots); return;
    }
}

#endif
