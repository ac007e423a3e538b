/* Quantized matmuls for CPU decoding: y[M, N] = x[M, K] W^T (+ bias), AVX2 + FMA + F16C.
 *
 * From DEQUANTIZED_MIN_ROWS activation rows on, each block of 4 weight rows is widened to
 * fp32 once and multiplied with the fp32 activations (`block_product` of fp32_tiles.h): the
 * widening is paid once for all M rows. A single row (batch-1
 * decode) instead quantizes its activations and runs integer dots, as follows.
 *
 * The activations are quantized first (q16_quantize): each group of 32 values along K gets
 * int16 codes and one fp32 scale, x ~= xd * xq with xd = max|x| / 32767, and the fp32 sum of
 * its values. 16 bits, not llama.cpp's 8: LLM activations carry outlier channels (the
 * largest value ~20x the root mean square), which leave 8-bit groups too coarse (measured:
 * 2% output error against 0.01% here). The weights are one of two formats:
 *
 *   q4: a group of 32 values along K is 16 bytes of 4-bit codes q in [0, 15] (byte j holds
 *   value j in its low nibble and value j + 16 in its high nibble, GGUF Q4_1's layout) and an
 *   fp16 scale d and min m: w = d * q + m. The row's scales come first, then its mins.
 *   dot(w, x) over a group = d * xd * sum(q * xq) + m * sum(x).
 *
 *   q8: int8 codes c in [-127, 127] with one fp32 scale per output row: w = s * c.
 *   dot(w, x) over a row = s * sum over groups of xd * sum(c * xq).
 *
 * Group dots are exact integers: codes widened to int16, _mm256_madd_epi16 into int32 (a
 * group sums to at most 32 * 15 * 32767 for q4, 32 * 127 * 32767 for q8: no overflow), then
 * one fp32 fused multiply-add per group. A weight group is unpacked once for up to ROWS_PER_TILE
 * activation rows. Output rows are split across the OpenMP threads of the process (the runtime
 * torch already loaded: the same libgomp.so.1).
 * `thinfer.kernels.cpu_qgemm` holds the torch reference this must match.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#include "fp32_tiles.h"
#include "kernels.h"

#define GROUP 32
#define ROWS_PER_TILE 4 /* activation rows per integer tile */

/* x [M, K] -> xq [M, K] int16, xd [M, K / 32] scales, xs [M, K / 32] sums. */
void q16_quantize(const float *x, int64_t m, int64_t k, int16_t *xq, float *xd, float *xs) {
    const int64_t groups = k / GROUP;
    for (int64_t g = 0; g < m * groups; g++) {
        const float *src = x + g * GROUP;
        float amax = 0.0f, sum = 0.0f;
        for (int i = 0; i < GROUP; i++) {
            amax = fmaxf(amax, fabsf(src[i]));
            sum += src[i];
        }
        const float d = amax / 32767.0f;
        const float inv = d > 0.0f ? 1.0f / d : 0.0f;
        for (int i = 0; i < GROUP; i++) {
            const float code = fminf(fmaxf(nearbyintf(src[i] * inv), -32767.0f), 32767.0f);
            xq[g * GROUP + i] = (int16_t)code;
        }
        xd[g] = d;
        xs[g] = sum;
    }
}

/* Quantized activations of x [M, K] in one allocation. */
typedef struct {
    int16_t *xq;
    float *xd, *xs;
    void *memory;
} Activations;

static Activations quantize_activations(const float *x, int64_t m, int64_t k) {
    const int64_t groups = k / GROUP;
    const size_t bytes = (size_t)(m * k) * sizeof(int16_t) + 2 * (size_t)(m * groups) * 4;
    Activations a;
    a.memory = aligned_alloc(32, (bytes + 31) / 32 * 32); /* a multiple of the alignment */
    a.xq = (int16_t *)a.memory;
    a.xd = (float *)(a.xq + m * k);
    a.xs = a.xd + m * groups;
    q16_quantize(x, m, k, a.xq, a.xd, a.xs);
    return a;
}

static inline __m256i group_dot(__m256i w_first, __m256i w_second, const int16_t *xq) {
    const __m256i x_first = _mm256_loadu_si256((const __m256i *)xq);
    const __m256i x_second = _mm256_loadu_si256((const __m256i *)(xq + 16));
    return _mm256_add_epi32(_mm256_madd_epi16(w_first, x_first),
                            _mm256_madd_epi16(w_second, x_second));
}

static inline void halfs_to_floats(const uint16_t *halfs, int64_t len, float *out) {
    int64_t i = 0;
    for (; i + 8 <= len; i += 8)
        _mm256_storeu_ps(out + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(halfs + i))));
    for (; i < len; i++) out[i] = _cvtsh_ss(halfs[i]);
}

/* sum over groups of factor[r][g] * (integer dot of the weight row's group g and activation
 * row r's), for `rows` <= ROWS_PER_TILE activation rows; q4 codes when `q4`, else int8. */
static inline void tile_dots(const void *w_row, int q4, const int16_t *xq, int64_t k,
                             const float *factor, int64_t groups, int rows, float *dots) {
    __m256 acc[ROWS_PER_TILE];
    for (int r = 0; r < rows; r++) acc[r] = _mm256_setzero_ps();
    for (int64_t g = 0; g < groups; g++) {
        __m256i w_first, w_second;
        if (q4) {
            const __m128i packed = _mm_loadu_si128((const __m128i *)((const uint8_t *)w_row + g * 16));
            const __m128i mask = _mm_set1_epi8(0x0F);
            w_first = _mm256_cvtepu8_epi16(_mm_and_si128(packed, mask));
            w_second = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(packed, 4), mask));
        } else {
            const int8_t *codes = (const int8_t *)w_row + g * GROUP;
            w_first = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)codes));
            w_second = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(codes + 16)));
        }
        for (int r = 0; r < rows; r++) {
            const __m256i dot = group_dot(w_first, w_second, xq + r * k + g * GROUP);
            acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot),
                                     _mm256_broadcast_ss(factor + r * groups + g), acc[r]);
        }
    }
    for (int r = 0; r < rows; r++) dots[r] = hsum(acc[r]);
}

/* The tile with a constant row count, so the accumulators stay in registers. */
static void tile(const void *w_row, int q4, const int16_t *xq, int64_t k, const float *factor,
                 int64_t groups, int rows, float *dots) {
    switch (rows) {
        case 4: tile_dots(w_row, q4, xq, k, factor, groups, 4, dots); break;
        case 3: tile_dots(w_row, q4, xq, k, factor, groups, 3, dots); break;
        case 2: tile_dots(w_row, q4, xq, k, factor, groups, 2, dots); break;
        default: tile_dots(w_row, q4, xq, k, factor, groups, 1, dots); break;
    }
}

/* A q4 row as fp32 values [K]: w = d * q + m per group. */
#ifdef __AVX512F__
static inline void dequantize_q4_row(const uint8_t *codes, const float *scales, const float *mins,
                                     int64_t groups, float *out) {
    const __m128i mask = _mm_set1_epi8(0x0F);
    for (int64_t g = 0; g < groups; g++) {
        const __m128i packed = _mm_loadu_si128((const __m128i *)(codes + g * 16));
        const __m512 d = _mm512_set1_ps(scales[g]), m = _mm512_set1_ps(mins[g]);
        const __m512 low = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(packed, mask)));
        const __m512 high = _mm512_cvtepi32_ps(
            _mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(packed, 4), mask)));
        _mm512_storeu_ps(out + g * GROUP, _mm512_fmadd_ps(low, d, m));
        _mm512_storeu_ps(out + g * GROUP + 16, _mm512_fmadd_ps(high, d, m));
    }
}
#else
static inline void dequantize_q4_row(const uint8_t *codes, const float *scales, const float *mins,
                                     int64_t groups, float *out) {
    const __m128i mask = _mm_set1_epi8(0x0F);
    for (int64_t g = 0; g < groups; g++) {
        const __m128i packed = _mm_loadu_si128((const __m128i *)(codes + g * 16));
        const __m128i halves[2] = {_mm_and_si128(packed, mask),
                                   _mm_and_si128(_mm_srli_epi16(packed, 4), mask)};
        const __m256 d = _mm256_set1_ps(scales[g]), m = _mm256_set1_ps(mins[g]);
        for (int h = 0; h < 2; h++) {
            const __m128i eight_more = _mm_srli_si128(halves[h], 8);
            const __m256 low = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(halves[h]));
            const __m256 high = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(eight_more));
            _mm256_storeu_ps(out + g * GROUP + h * 16, _mm256_fmadd_ps(low, d, m));
            _mm256_storeu_ps(out + g * GROUP + h * 16 + 8, _mm256_fmadd_ps(high, d, m));
        }
    }
}
#endif

/* Row `row` of q4 blocks as fp32 values [K] (`scratch` holds 2 * K / 32 floats). */
static inline void widen_q4_row(const uint8_t *codes, const uint16_t *dm, int64_t row, int64_t k,
                                float *scratch, float *out) {
    const int64_t groups = k / GROUP;
    halfs_to_floats(dm + row * groups * 2, 2 * groups, scratch); /* the scales, then the mins */
    dequantize_q4_row(codes + row * (k / 2), scratch, scratch + groups, groups, out);
}

/* An int8 row as fp32 codes [K] (its scale applied to the dot afterwards). */
static inline void widen_q8_row(const int8_t *codes, int64_t k, float *out) {
    for (int64_t i = 0; i < k; i += 8) {
        const __m128i eight = _mm_loadl_epi64((const __m128i *)(codes + i));
        _mm256_storeu_ps(out + i, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(eight)));
    }
}

/* From this many activation rows on, weight rows are widened to fp32 once and multiplied
 * with the fp32 activations: the widening pays for itself over the rows, and fp32
 * activations need no quantization. */
#define DEQUANTIZED_MIN_ROWS 2

/* x [M, K] fp32; codes [N, K / 2], dm [N, 2, K / 32] fp16 (the row's scales, then its mins),
 * bias [N] or NULL -> y [M, N]. */
void q4_linear(const float *x, int64_t m, int64_t k, const uint8_t *codes, const uint16_t *dm,
               int64_t n, const float *bias, float *y) {
    const int64_t groups = k / GROUP;
    if (m <= 0) return;
    if (m >= DEQUANTIZED_MIN_ROWS) {
#pragma omp parallel
        {
            float *row_values =
                (float *)malloc(sizeof(float) * (size_t)(BLOCK_W_ROWS * k + 2 * groups));
            float *scratch = row_values + BLOCK_W_ROWS * k;
#pragma omp for schedule(static)
            for (int64_t block = 0; block < (n + BLOCK_W_ROWS - 1) / BLOCK_W_ROWS; block++) {
                const int64_t row = BLOCK_W_ROWS * block;
                const int w_rows = n - row < BLOCK_W_ROWS ? (int)(n - row) : BLOCK_W_ROWS;
                for (int j = 0; j < w_rows; j++)
                    widen_q4_row(codes, dm, row + j, k, scratch, row_values + j * k);
                block_product(row_values, k, w_rows, x, m, k, NULL, bias ? bias + row : NULL,
                              y + row, n);
            }
            free(row_values);
        }
        return;
    }
    const Activations a = quantize_activations(x, m, k);
#pragma omp parallel
    {
        float *scales = (float *)malloc(sizeof(float) * (size_t)groups * (2 + ROWS_PER_TILE));
        float *mins = scales + groups, *factor = mins + groups;
        float dots[ROWS_PER_TILE];
#pragma omp for schedule(static)
        for (int64_t row = 0; row < n; row++) {
            halfs_to_floats(dm + row * groups * 2, 2 * groups, scales); /* and the mins */
            const float b = bias ? bias[row] : 0.0f;
            for (int64_t first = 0; first < m; first += ROWS_PER_TILE) {
                const int rows = m - first < ROWS_PER_TILE ? (int)(m - first) : ROWS_PER_TILE;
                for (int r = 0; r < rows; r++)
                    for (int64_t g = 0; g < groups; g++)
                        factor[r * groups + g] = scales[g] * a.xd[(first + r) * groups + g];
                tile(codes + row * (k / 2), 1, a.xq + first * k, k, factor, groups, rows, dots);
                for (int r = 0; r < rows; r++)
                    y[(first + r) * n + row] =
                        dots[r] + dot_floats(mins, a.xs + (first + r) * groups, groups) + b;
            }
        }
        free(scales);
    }
    free(a.memory);
}

/* x [M, K] fp32; codes [N, K] int8, scales [N] fp32, bias [N] or NULL -> y [M, N]. */
void q8_linear(const float *x, int64_t m, int64_t k, const int8_t *codes, const float *scales,
               int64_t n, const float *bias, float *y) {
    const int64_t groups = k / GROUP;
    if (m <= 0) return;
    if (m >= DEQUANTIZED_MIN_ROWS) {
#pragma omp parallel
        {
            float *row_values = (float *)malloc(sizeof(float) * (size_t)(BLOCK_W_ROWS * k));
#pragma omp for schedule(static)
            for (int64_t block = 0; block < (n + BLOCK_W_ROWS - 1) / BLOCK_W_ROWS; block++) {
                const int64_t row = BLOCK_W_ROWS * block;
                const int w_rows = n - row < BLOCK_W_ROWS ? (int)(n - row) : BLOCK_W_ROWS;
                for (int j = 0; j < w_rows; j++)
                    widen_q8_row(codes + (row + j) * k, k, row_values + j * k);
                block_product(row_values, k, w_rows, x, m, k, scales + row,
                              bias ? bias + row : NULL, y + row, n);
            }
            free(row_values);
        }
        return;
    }
    const Activations a = quantize_activations(x, m, k);
#pragma omp parallel
    {
        float dots[ROWS_PER_TILE];
#pragma omp for schedule(static)
        for (int64_t row = 0; row < n; row++) {
            const float b = bias ? bias[row] : 0.0f;
            for (int64_t first = 0; first < m; first += ROWS_PER_TILE) {
                const int rows = m - first < ROWS_PER_TILE ? (int)(m - first) : ROWS_PER_TILE;
                tile(codes + row * k, 0, a.xq + first * k, k, a.xd + first * groups, groups,
                     rows, dots);
                for (int r = 0; r < rows; r++)
                    y[(first + r) * n + row] = scales[row] * dots[r] + b;
            }
        }
    }
    free(a.memory);
}

/* The fp32 weight [N, K] that q4 blocks stand for (for prefill-sized products, which run on
 * torch's blocked GEMM instead of these tiles). */
void q4_dequantize(const uint8_t *codes, const uint16_t *dm, int64_t n, int64_t k, float *out) {
    const int64_t groups = k / GROUP;
#pragma omp parallel
    {
        float *scratch = (float *)malloc(sizeof(float) * (size_t)(2 * groups));
#pragma omp for schedule(static)
        for (int64_t row = 0; row < n; row++)
            widen_q4_row(codes, dm, row, k, scratch, out + row * k);
        free(scratch);
    }
}

/* The fp32 weight [N, K] = scales[:, None] * codes of q8 rows (as q4_dequantize). */
void q8_dequantize(const int8_t *codes, const float *scales, int64_t n, int64_t k, float *out) {
#pragma omp parallel for schedule(static)
    for (int64_t row = 0; row < n; row++) {
        float *values = out + row * k;
        widen_q8_row(codes + row * k, k, values);
        const __m256 scale = _mm256_set1_ps(scales[row]);
        for (int64_t i = 0; i < k; i += 8)
            _mm256_storeu_ps(values + i, _mm256_mul_ps(scale, _mm256_loadu_ps(values + i)));
    }
}
