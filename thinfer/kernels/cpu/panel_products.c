/* Quantized matmuls of several activation rows in the AVX-512 build: y[M, N] = x[M, K] W^T
 * (+ bias) for q4 and q8 weights stored in panels of 16 weight rows, k-major
 * (`thinfer.kernels.cpu_qgemm.q4_panels` / `q8_panels` pack them).
 *
 * The row-major tiles of qgemm.c take dot products along K and sum their lanes at the end:
 * with 16-lane vectors that reduction and the per-row widening cost as much as the
 * multiply-adds (measured ~65 of ~140 GFLOP/s of one Zen 5 core's fp32 peak). Here a vector
 * holds one value of K for the panel's 16 weight rows: it is widened once and multiplied
 * with the broadcast activation of up to TILE_ROWS rows, each row accumulating 16 outputs in
 * its own register, so nothing is summed across lanes and the widening is shared by all rows.
 *
 * N is padded to a multiple of 16 with zero rows, whose outputs are not written.
 *
 *   q4 panels: codes [N / 16, K / 2, 16] bytes (byte j of line i: row j's value 2i in its low
 *   nibble and 2i + 1 in its high nibble) and factors [N / 16, K / 32, 2, 16] fp16 (the
 *   panel rows' scales d, then their mins m, per group of 32 values): w = d * q + m.
 *   q8 panels: codes [N / 16, K, 16] int8 (byte j of line k: row j's code at k); the rows'
 *   scales [N] stay as they are, applied to the sums.
 *   fp32 panels: [N / 16, K, 16] floats (value j of line k: row j's weight at k), for fp32
 *   layers: nothing to widen, so two panels go together (24 accumulators: 12 activation rows
 *   x 32 outputs, two weight loads per 24 multiply-adds) with the panels' next lines
 *   prefetched; measured on a par with or ahead of oneDNN's packed GEMM from 1 to 512 rows.
 *
 * The weights are widened to fp32 and multiplied with the fp32 activations, so the result
 * equals the dequantized weight's fp32 product up to summation order (as qgemm.c's tiles).
 * Only the AVX-512 build has these functions (`cpu_native.ISAS`).
 */
#ifdef __AVX512F__
#include <immintrin.h>
#include <stdint.h>

#include "kernels.h"

#define PANEL 16
#define TILE_ROWS 16
#define GROUP 32
#define PAIR_ROWS 12      /* activation rows per fp32 tile of two panels */
#define PREFETCH_LINES 16 /* fp32 panel lines (one cache line each) read ahead */

/* The first `columns` lanes of y rows [rows] (n apart) at the panel's columns = acc *
 * scale (NULL: 1) + bias (NULL: 0); the last panel of N not a multiple of 16 is partial. */
static inline void store_panel(const __m512 acc[TILE_ROWS], int rows, int columns,
                               const float *scale, const float *bias, float *y, int64_t n) {
    const __mmask16 lanes = (__mmask16)((1u << columns) - 1);
    const __m512 s = scale ? _mm512_maskz_loadu_ps(lanes, scale) : _mm512_set1_ps(1.0f);
    const __m512 b = bias ? _mm512_maskz_loadu_ps(lanes, bias) : _mm512_setzero_ps();
    for (int r = 0; r < rows; r++)
        _mm512_mask_storeu_ps(y + r * n, lanes, _mm512_fmadd_ps(acc[r], s, b));
}

/* acc[r] = the 16 dots of activation row r (of `rows`, k apart) with a q4 panel */
static inline __attribute__((always_inline)) void q4_panel_tile(
    const uint8_t *codes, const uint16_t *factors, const float *x, int64_t k, int rows,
    __m512 acc[TILE_ROWS]) {
    const __m128i mask = _mm_set1_epi8(0x0F);
    for (int r = 0; r < rows; r++) acc[r] = _mm512_setzero_ps();
    for (int64_t g = 0; g < k / GROUP; g++) {
        const uint16_t *halfs = factors + g * 2 * PANEL;
        const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)halfs));
        const __m512 m = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(halfs + PANEL)));
        for (int64_t line = g * GROUP / 2; line < (g + 1) * GROUP / 2; line++) {
            const __m128i packed = _mm_loadu_si128((const __m128i *)(codes + line * PANEL));
            const __m128i low = _mm_and_si128(packed, mask);
            const __m128i high = _mm_and_si128(_mm_srli_epi16(packed, 4), mask);
            const __m512 even = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(low)), d, m);
            const __m512 odd = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(high)), d, m);
            const float *values = x + 2 * line;
            for (int r = 0; r < rows; r++) {
                acc[r] = _mm512_fmadd_ps(even, _mm512_set1_ps(values[r * k]), acc[r]);
                acc[r] = _mm512_fmadd_ps(odd, _mm512_set1_ps(values[r * k + 1]), acc[r]);
            }
        }
    }
}

/* acc[r] = the 16 dots (of the codes, unscaled) of activation row r with a q8 panel */
static inline __attribute__((always_inline)) void q8_panel_tile(const int8_t *codes,
                                                               const float *x, int64_t k,
                                                               int rows, __m512 acc[TILE_ROWS]) {
    for (int r = 0; r < rows; r++) acc[r] = _mm512_setzero_ps();
    for (int64_t i = 0; i < k; i++) {
        const __m128i line = _mm_loadu_si128((const __m128i *)(codes + i * PANEL));
        const __m512 w = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(line));
        for (int r = 0; r < rows; r++)
            acc[r] = _mm512_fmadd_ps(w, _mm512_set1_ps(x[r * k + i]), acc[r]);
    }
}

/* acc[r][p] = the 16 dots of activation row r with fp32 panel p of the two at `first` and
 * `second` (which may be the same panel: its outputs are then stored once) */
static inline __attribute__((always_inline)) void f32_pair_tile(const float *first,
                                                               const float *second,
                                                               const float *x, int64_t k,
                                                               int rows,
                                                               __m512 acc[PAIR_ROWS][2]) {
    for (int r = 0; r < rows; r++) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
    for (int64_t i = 0; i < k; i++) {
        _mm_prefetch((const char *)(first + (i + PREFETCH_LINES) * PANEL), _MM_HINT_T0);
        _mm_prefetch((const char *)(second + (i + PREFETCH_LINES) * PANEL), _MM_HINT_T0);
        const __m512 a = _mm512_loadu_ps(first + i * PANEL);
        const __m512 b = _mm512_loadu_ps(second + i * PANEL);
        for (int r = 0; r < rows; r++) {
            const __m512 value = _mm512_set1_ps(x[r * k + i]);
            acc[r][0] = _mm512_fmadd_ps(a, value, acc[r][0]);
            acc[r][1] = _mm512_fmadd_ps(b, value, acc[r][1]);
        }
    }
}

static void f32_tile(const float *first, const float *second, const float *x, int64_t k,
                     int rows, __m512 acc[PAIR_ROWS][2]) {
#define F32_TILE(R) f32_pair_tile(first, second, x, k, R, acc)
    switch (rows) {
        case 12: F32_TILE(12); break;
        case 11: F32_TILE(11); break;
        case 10: F32_TILE(10); break;
        case 9: F32_TILE(9); break;
        case 8: F32_TILE(8); break;
        case 7: F32_TILE(7); break;
        case 6: F32_TILE(6); break;
        case 5: F32_TILE(5); break;
        case 4: F32_TILE(4); break;
        case 3: F32_TILE(3); break;
        case 2: F32_TILE(2); break;
        default: F32_TILE(1); break;
    }
#undef F32_TILE
}

/* The tiles with a constant row count, so the accumulators stay in registers. */
#define ROW_CASES(CALL)                                                                        \
    switch (rows) {                                                                            \
        case 16: CALL(16); break;                                                              \
        case 15: CALL(15); break;                                                              \
        case 14: CALL(14); break;                                                              \
        case 13: CALL(13); break;                                                              \
        case 12: CALL(12); break;                                                              \
        case 11: CALL(11); break;                                                              \
        case 10: CALL(10); break;                                                              \
        case 9: CALL(9); break;                                                                \
        case 8: CALL(8); break;                                                                \
        case 7: CALL(7); break;                                                                \
        case 6: CALL(6); break;                                                                \
        case 5: CALL(5); break;                                                                \
        case 4: CALL(4); break;                                                                \
        case 3: CALL(3); break;                                                                \
        case 2: CALL(2); break;                                                                \
        default: CALL(1); break;                                                               \
    }

static void q4_tile(const uint8_t *codes, const uint16_t *factors, const float *x, int64_t k,
                    int rows, __m512 acc[TILE_ROWS]) {
#define Q4_TILE(R) q4_panel_tile(codes, factors, x, k, R, acc)
    ROW_CASES(Q4_TILE)
#undef Q4_TILE
}

static void q8_tile(const int8_t *codes, const float *x, int64_t k, int rows,
                    __m512 acc[TILE_ROWS]) {
#define Q8_TILE(R) q8_panel_tile(codes, x, k, R, acc)
    ROW_CASES(Q8_TILE)
#undef Q8_TILE
}

/* Columns of a panel that are real weight rows. */
static inline int panel_columns(int64_t panel, int64_t n) {
    return n - panel * PANEL < PANEL ? (int)(n - panel * PANEL) : PANEL;
}

/* x [M, K] fp32; q4 panels (codes, factors) of W [N, K]; bias [N] or NULL -> y [M, N]. */
void q4_panel_linear(const float *x, int64_t m, int64_t k, const uint8_t *codes,
                     const uint16_t *factors, int64_t n, const float *bias, float *y) {
#pragma omp parallel for schedule(static)
    for (int64_t panel = 0; panel < (n + PANEL - 1) / PANEL; panel++) {
        const uint8_t *panel_codes = codes + panel * (k / 2) * PANEL;
        const uint16_t *panel_factors = factors + panel * (k / GROUP) * 2 * PANEL;
        for (int64_t first = 0; first < m; first += TILE_ROWS) {
            const int rows = m - first < TILE_ROWS ? (int)(m - first) : TILE_ROWS;
            __m512 acc[TILE_ROWS];
            q4_tile(panel_codes, panel_factors, x + first * k, k, rows, acc);
            store_panel(acc, rows, panel_columns(panel, n), NULL,
                        bias ? bias + panel * PANEL : NULL, y + first * n + panel * PANEL, n);
        }
    }
}

/* x [M, K] fp32; q8 panels (codes) of W [N, K] with the rows' scales [N]; bias [N] or NULL
 * -> y [M, N]. */
void q8_panel_linear(const float *x, int64_t m, int64_t k, const int8_t *codes,
                     const float *scales, int64_t n, const float *bias, float *y) {
#pragma omp parallel for schedule(static)
    for (int64_t panel = 0; panel < (n + PANEL - 1) / PANEL; panel++) {
        for (int64_t first = 0; first < m; first += TILE_ROWS) {
            const int rows = m - first < TILE_ROWS ? (int)(m - first) : TILE_ROWS;
            __m512 acc[TILE_ROWS];
            q8_tile(codes + panel * k * PANEL, x + first * k, k, rows, acc);
            store_panel(acc, rows, panel_columns(panel, n), scales + panel * PANEL,
                        bias ? bias + panel * PANEL : NULL, y + first * n + panel * PANEL, n);
        }
    }
}
/* x [M, K] fp32; fp32 panels of W [N, K]; bias [N] or NULL -> y [M, N]. */
void f32_panel_linear(const float *x, int64_t m, int64_t k, const float *panels, int64_t n,
                      const float *bias, float *y) {
    const int64_t count = (n + PANEL - 1) / PANEL;
#pragma omp parallel for schedule(static)
    for (int64_t pair = 0; pair < (count + 1) / 2; pair++) {
        const int64_t first = 2 * pair, second = first + 1 < count ? first + 1 : first;
        for (int64_t row = 0; row < m; row += PAIR_ROWS) {
            const int rows = m - row < PAIR_ROWS ? (int)(m - row) : PAIR_ROWS;
            __m512 acc[PAIR_ROWS][2], out[TILE_ROWS];
            f32_tile(panels + first * k * PANEL, panels + second * k * PANEL, x + row * k, k,
                     rows, acc);
            for (int half = 0; half < (second != first ? 2 : 1); half++) {
                const int64_t panel = half ? second : first;
                for (int r = 0; r < rows; r++) out[r] = acc[r][half];
                store_panel(out, rows, panel_columns(panel, n), NULL,
                            bias ? bias + panel * PANEL : NULL, y + row * n + panel * PANEL, n);
            }
        }
    }
}
#endif
