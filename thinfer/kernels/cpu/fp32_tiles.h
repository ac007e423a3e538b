/* Shared by the CPU kernels: the horizontal sum of a vector, an fp32 dot, the pair dots
 * of the GEMV (2 weight rows against one activation row; K a multiple of 8), and
 * the block product of several activation rows (4 weight rows x 3 activation rows per tile,
 * K in L1-sized blocks). */
#ifndef THINFER_FP32_TILES_H
#define THINFER_FP32_TILES_H

#include <immintrin.h>
#include <stdint.h>

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

/* dots[j] = fp32 dot of weight row j [K] (of `w_rows` <= 2, `k` apart) with x [K]: each x
 * load serves both weight rows (the GEMV of one activation row). */
static inline void fp32_pair_dots(const float *w, int w_rows, const float *x, int64_t k,
                                  float dots[2]) {
    __m256 first_acc = _mm256_setzero_ps(), second_acc = _mm256_setzero_ps();
    const float *second = w + (w_rows > 1 ? k : 0);
    for (int64_t i = 0; i < k; i += 8) {
        const __m256 values = _mm256_loadu_ps(x + i);
        first_acc = _mm256_fmadd_ps(_mm256_loadu_ps(w + i), values, first_acc);
        second_acc = _mm256_fmadd_ps(_mm256_loadu_ps(second + i), values, second_acc);
    }
    dots[0] = hsum(first_acc);
    dots[1] = hsum(second_acc);
}

#define BLOCK_W_ROWS 4
#define BLOCK_X_ROWS 3
/* K values per pass: the activation rows' slice (M x K_BLOCK floats) stays in L1 while the
 * weight blocks go by; without it a batch of 16 rows of K = 1536 reads x from L2 at every
 * tile (measured ~2x slower). */
#define K_BLOCK 256

/* lanes 0..3 = the sums of a, b, c, d */
static inline __m128 hsum_four(__m256 a, __m256 b, __m256 c, __m256 d) {
    const __m256 sums = _mm256_hadd_ps(_mm256_hadd_ps(a, b), _mm256_hadd_ps(c, d));
    return _mm_add_ps(_mm256_castps256_ps128(sums), _mm256_extractf128_ps(sums, 1));
}

#ifdef __AVX512F__
/* The AVX-512 build (`cpu_native` picks it on CPUs that have AVX-512): 16 lanes per
 * vector, twice the multiply-adds per instruction. */
static inline __m256 fold_512(__m512 v) {
    return _mm256_add_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps(v, 1));
}

/* out[r] lanes j = dot of weight row w[j] and activation row x[r] over len values (a
 * multiple of 8), for `rows` <= BLOCK_X_ROWS activation rows: up to twelve accumulators in
 * registers, seven loads per twelve fused multiply-adds; a last half vector is masked. */
static inline __attribute__((always_inline)) void tile_4xr(
    const float *const w[BLOCK_W_ROWS], const float *const x[BLOCK_X_ROWS], int64_t len,
    int rows, __m128 out[BLOCK_X_ROWS]) {
    __m512 acc[BLOCK_W_ROWS][BLOCK_X_ROWS];
    for (int j = 0; j < BLOCK_W_ROWS; j++)
        for (int r = 0; r < rows; r++) acc[j][r] = _mm512_setzero_ps();
    for (int64_t i = 0; i < len; i += 16) {
        const __mmask16 lanes = len - i >= 16 ? 0xFFFF : 0x00FF;
        __m512 values[BLOCK_X_ROWS];
        for (int r = 0; r < rows; r++) values[r] = _mm512_maskz_loadu_ps(lanes, x[r] + i);
        for (int j = 0; j < BLOCK_W_ROWS; j++) {
            const __m512 weights = _mm512_maskz_loadu_ps(lanes, w[j] + i);
            for (int r = 0; r < rows; r++)
                acc[j][r] = _mm512_fmadd_ps(weights, values[r], acc[j][r]);
        }
    }
    for (int r = 0; r < rows; r++)
        out[r] = hsum_four(fold_512(acc[0][r]), fold_512(acc[1][r]), fold_512(acc[2][r]),
                           fold_512(acc[3][r]));
}
#else
/* out[r] lanes j = dot of weight row w[j] and activation row x[r] over len values, for
 * `rows` <= BLOCK_X_ROWS activation rows: up to twelve accumulators in registers, seven
 * loads per twelve fused multiply-adds. */
static inline __attribute__((always_inline)) void tile_4xr(
    const float *const w[BLOCK_W_ROWS], const float *const x[BLOCK_X_ROWS], int64_t len,
    int rows, __m128 out[BLOCK_X_ROWS]) {
    __m256 acc[BLOCK_W_ROWS][BLOCK_X_ROWS];
    for (int j = 0; j < BLOCK_W_ROWS; j++)
        for (int r = 0; r < rows; r++) acc[j][r] = _mm256_setzero_ps();
    for (int64_t i = 0; i < len; i += 8) {
        __m256 values[BLOCK_X_ROWS];
        for (int r = 0; r < rows; r++) values[r] = _mm256_loadu_ps(x[r] + i);
        for (int j = 0; j < BLOCK_W_ROWS; j++) {
            const __m256 weights = _mm256_loadu_ps(w[j] + i);
            for (int r = 0; r < rows; r++)
                acc[j][r] = _mm256_fmadd_ps(weights, values[r], acc[j][r]);
        }
    }
    for (int r = 0; r < rows; r++)
        out[r] = hsum_four(acc[0][r], acc[1][r], acc[2][r], acc[3][r]);
}

#endif

/* The tile with a constant row count (a partial last tile computes no padding rows). */
static inline void tile_4x(const float *const w[BLOCK_W_ROWS], const float *const x[BLOCK_X_ROWS],
                           int64_t len, int rows, __m128 out[BLOCK_X_ROWS]) {
    switch (rows) {
        case 3: tile_4xr(w, x, len, 3, out); return;
        case 2: tile_4xr(w, x, len, 2, out); return;
        default: tile_4xr(w, x, len, 1, out); return;
    }
}

/* y[r, j] = scale[j] * dot(weight row j, x row r) + bias[j], for the w_rows <= BLOCK_W_ROWS
 * fp32 weight rows at w (`ldw` apart, K values each) and all M rows of x [M, K]; y has rows
 * of n values and points at the block's first column; scale and bias may be NULL. Missing
 * weight rows of a block repeat the last one and are not written. */
static inline void block_product(const float *w, int64_t ldw, int w_rows, const float *x,
                                 int64_t m, int64_t k, const float *scale, const float *bias,
                                 float *y, int64_t n) {
    for (int64_t start = 0; start < k; start += K_BLOCK) {
        const int64_t len = k - start < K_BLOCK ? k - start : K_BLOCK;
        const float *rows_w[BLOCK_W_ROWS];
        for (int j = 0; j < BLOCK_W_ROWS; j++)
            rows_w[j] = w + (j < w_rows ? j : w_rows - 1) * ldw + start;
        for (int64_t first = 0, rows; first < m; first += rows) {
            /* tiles of 3 rows; 4 left make two of 2 rather than 3 + 1 */
            rows = m - first == 4 ? 2 : (m - first < BLOCK_X_ROWS ? m - first : BLOCK_X_ROWS);
            const float *rows_x[BLOCK_X_ROWS];
            for (int r = 0; r < rows; r++) rows_x[r] = x + (first + r) * k + start;
            __m128 out[BLOCK_X_ROWS];
            tile_4x(rows_w, rows_x, len, (int)rows, out);
            for (int r = 0; r < rows; r++) {
                float dots[4];
                _mm_storeu_ps(dots, out[r]);
                float *target = y + (first + r) * n;
                for (int j = 0; j < w_rows; j++) {
                    const float value = scale ? scale[j] * dots[j] : dots[j];
                    target[j] = start ? target[j] + value : value + (bias ? bias[j] : 0.0f);
                }
            }
        }
    }
}

#endif
