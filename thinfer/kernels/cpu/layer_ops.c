/* The small per-layer ops of a decoder block in fp32, one pass each: residual add + RMSNorm,
 * RoPE (rotate-half layout, in place) and silu(gate) * up. At decode batch sizes each torch
 * op costs more in dispatch than in arithmetic (RMSNorm alone is six ops); these do the
 * arithmetic of the torch path (`thinfer.models.fused.LayerOps`) in one call, and differ
 * from it only by fp32 summation order and the last bits of exp (SiLU's exp8: 2 ulp).
 * `thinfer.kernels.cpu_layer_ops` holds the Python side and the tests compare the two.
 */
#include <math.h>
#include <stdint.h>

#include "kernels.h"
#include "vector_exp.h"

/* Rows of x [rows, dim]: residual_out = residual + x (x NULL: residual), normed =
 * residual_out * rsqrt(mean(residual_out^2) + eps) * weight. residual_out may alias residual. */
void add_rms_norm(const float *x, const float *residual, const float *weight, int64_t rows,
                  int64_t dim, float eps, float *normed, float *residual_out) {
#pragma omp parallel for schedule(static) if (rows * dim >= 65536)
    for (int64_t r = 0; r < rows; r++) {
        const float *res = residual + r * dim;
        float *sum_row = residual_out + r * dim;
        float squares = 0.0f;
        for (int64_t i = 0; i < dim; i++) {
            const float value = x ? res[i] + x[r * dim + i] : res[i];
            sum_row[i] = value;
            squares += value * value;
        }
        const float scale = 1.0f / sqrtf(squares / (float)dim + eps);
        float *out = normed + r * dim;
        for (int64_t i = 0; i < dim; i++) out[i] = sum_row[i] * scale * weight[i];
    }
}

static void rotate_heads(float *rows, int64_t row_stride, int64_t heads, int64_t tokens,
                         int64_t head_dim, const int64_t *positions, const float *cos_table,
                         const float *sin_table) {
    const int64_t half = head_dim / 2;
    for (int64_t t = 0; t < tokens; t++) {
        const float *c = cos_table + positions[t] * head_dim;
        const float *s = sin_table + positions[t] * head_dim;
        for (int64_t h = 0; h < heads; h++) {
            float *x = rows + t * row_stride + h * head_dim;
            for (int64_t i = 0; i < half; i++) {
                const float first = x[i], second = x[i + half];
                x[i] = first * c[i] - second * s[i];
                x[i + half] = second * c[i + half] + first * s[i + half];
            }
        }
    }
}

/* Rotate q [tokens, q_heads, head_dim] and k [tokens, k_heads, head_dim] in place (rows
 * `*_row_stride` floats apart, heads contiguous) by the cos/sin rows [max_pos, head_dim]
 * of `positions`: x * cos + rotate_half(x) * sin. */
void rope(float *q, int64_t q_row_stride, int64_t q_heads, float *k, int64_t k_row_stride,
          int64_t k_heads, int64_t tokens, int64_t head_dim, const int64_t *positions,
          const float *cos_table, const float *sin_table) {
    rotate_heads(q, q_row_stride, q_heads, tokens, head_dim, positions, cos_table, sin_table);
    rotate_heads(k, k_row_stride, k_heads, tokens, head_dim, positions, cos_table, sin_table);
}

/* gate_up [rows, 2 * width] (gate first) -> out [rows, width] = silu(gate) * up, eight
 * values at a time through exp8 (within 2 ulp of expf). */
void silu_mul(const float *gate_up, int64_t rows, int64_t width, float *out) {
#pragma omp parallel for schedule(static) if (rows * width >= 16384)
    for (int64_t r = 0; r < rows; r++) {
        const float *gate = gate_up + r * 2 * width, *up = gate + width;
        float *target = out + r * width;
        int64_t i = 0;
        for (; i + 8 <= width; i += 8) {
            const __m256 g = _mm256_loadu_ps(gate + i);
            const __m256 denominator =
                _mm256_add_ps(_mm256_set1_ps(1.0f), exp8(_mm256_sub_ps(_mm256_setzero_ps(), g)));
            _mm256_storeu_ps(target + i,
                             _mm256_mul_ps(_mm256_div_ps(g, denominator), _mm256_loadu_ps(up + i)));
        }
        for (; i < width; i++) target[i] = gate[i] / (1.0f + expf(-gate[i])) * up[i];
    }
}
