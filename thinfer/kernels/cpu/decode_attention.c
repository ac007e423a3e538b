/* Decode attention over the paged KV cache in fp32, reading keys and values where they lie
 * (no gathered copy): one query per sequence, q [B, Hq, D], attends to the first
 * context_lens[b] slots of its blocks; a KV head serves Hq / Hkv query heads (GQA). The cache
 * of a layer is [num_blocks, block_size, Hkv, D]; slot s of sequence b is in block
 * block_tables[b, s / block_size] at offset s % block_size.
 *
 * Per (sequence, KV head), in parallel: the scores of its query heads over all slots, an
 * exact softmax (max subtracted, expf), then the probability-weighted sum of the values.
 * `thinfer.attention.torch_paged.decode_attention` is the torch reference.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#include "fp32_tiles.h"

/* y += a * x over len values (x and y do not overlap). */
static inline void axpy(float a, const float *restrict x, float *restrict y, int64_t len) {
    const __m256 scale = _mm256_set1_ps(a);
    int64_t i = 0;
    for (; i + 8 <= len; i += 8)
        _mm256_storeu_ps(y + i, _mm256_fmadd_ps(scale, _mm256_loadu_ps(x + i),
                                                _mm256_loadu_ps(y + i)));
    for (; i < len; i++) y[i] += a * x[i];
}

void paged_decode_attention(const float *q, int64_t seqs, int64_t q_heads, int64_t kv_heads,
                            int64_t head_dim, const float *k_cache, const float *v_cache,
                            int64_t block_size, const int64_t *block_tables, int64_t table_width,
                            const int64_t *context_lens, float scale, float *out) {
    const int64_t group = q_heads / kv_heads;
#pragma omp parallel for schedule(dynamic, 1) collapse(2)
    for (int64_t b = 0; b < seqs; b++) {
        for (int64_t kvh = 0; kvh < kv_heads; kvh++) {
            const int64_t length = context_lens[b];
            const int64_t *table = block_tables + b * table_width;
            float *scores = (float *)malloc(sizeof(float) * (size_t)(group * length));
            for (int64_t s = 0; s < length; s++) {
                const int64_t slot = table[s / block_size] * block_size + s % block_size;
                const float *key = k_cache + (slot * kv_heads + kvh) * head_dim;
                for (int64_t g = 0; g < group; g++) {
                    const float *query = q + (b * q_heads + kvh * group + g) * head_dim;
                    scores[g * length + s] = dot_floats(query, key, head_dim) * scale;
                }
            }
            for (int64_t g = 0; g < group; g++) {
                float *row = scores + g * length;
                float top = -INFINITY, total = 0.0f;
                for (int64_t s = 0; s < length; s++) top = fmaxf(top, row[s]);
                for (int64_t s = 0; s < length; s++) {
                    row[s] = expf(row[s] - top);
                    total += row[s];
                }
                const float inverse = 1.0f / total;
                for (int64_t s = 0; s < length; s++) row[s] *= inverse;
            }
            /* out rows of this KV head's query heads: the probability-weighted values */
            float *result = out + (b * q_heads + kvh * group) * head_dim;
            for (int64_t i = 0; i < group * head_dim; i++) result[i] = 0.0f;
            for (int64_t s = 0; s < length; s++) {
                const int64_t slot = table[s / block_size] * block_size + s % block_size;
                const float *value = v_cache + (slot * kv_heads + kvh) * head_dim;
                for (int64_t g = 0; g < group; g++)
                    axpy(scores[g * length + s], value, result + g * head_dim, head_dim);
            }
            free(scores);
        }
    }
}
