/* Decode attention over the paged KV cache in fp32, reading keys and values where they lie
 * (no gathered copy): one query per sequence, q [B, Hq, D] (rows `q_row_stride` floats
 * apart: views of a fused qkv projection are fine), attends to the first
 * context_lens[b] slots of its blocks (row table_rows[b] of block_tables; table_rows NULL:
 * row b), so the rows of a prefill chunk can each be a "decode" over their own length of
 * one sequence's table; a KV head serves Hq / Hkv query heads (GQA). The cache
 * of a layer is [num_blocks, block_size, Hkv, D]; slot s of sequence b is in block
 * block_tables[b, s / block_size] at offset s % block_size.
 *
 * Per (sequence, KV head), in parallel: the scores of its query heads over all slots, an
 * exact softmax (max subtracted, expf), then the probability-weighted sum of the values.
 * The cache is cold by the time a layer's attention runs (the weights streamed through it),
 * so both passes prefetch the key / value rows PREFETCH_SLOTS slots ahead: without that a
 * pass waits on one cache miss after another (measured 10x slower at 1k slots). The values
 * are summed CHUNK slots at a time, each query head's output row held in registers over the
 * chunk (the chunk's values stay in L1 for the next query head).
 * `thinfer.attention.torch_paged.decode_attention` is the torch reference.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#include "fp32_tiles.h"
#include "kernels.h"
#include "vector_exp.h"

#define PREFETCH_SLOTS 8
#define CHUNK 32

/* offsets[s] = where slot s's row (of KV head kvh) starts in a cache of the layer, for the
 * first `length` slots of a sequence: its blocks walked once, no division per slot. */
static void slot_offsets(const int64_t *table, int64_t block_size, int64_t kv_heads,
                         int64_t kvh, int64_t head_dim, int64_t length, int64_t *offsets) {
    for (int64_t s = 0, block = 0; s < length; block++)
        for (int64_t i = 0; i < block_size && s < length; i++, s++)
            offsets[s] = ((table[block] * block_size + i) * kv_heads + kvh) * head_dim;
}

static inline void prefetch_row(const float *row, int64_t head_dim) {
    for (int64_t i = 0; i < head_dim; i += 16) _mm_prefetch((const char *)(row + i), _MM_HINT_T0);
}

/* result[8 * VECTORS] += sum over slots [first, last) of p[s] * value(s), in registers */
#define WEIGHTED_VALUES(VECTORS)                                                              \
    static inline void weighted_values_##VECTORS(const float *v_cache, const int64_t *offsets, \
                                                 const float *p, int64_t first, int64_t last,  \
                                                 float *result) {                              \
        __m256 acc[VECTORS];                                                                   \
        for (int i = 0; i < VECTORS; i++) acc[i] = _mm256_loadu_ps(result + 8 * i);            \
        for (int64_t s = first; s < last; s++) {                                               \
            const float *value = v_cache + offsets[s];                                         \
            const __m256 weight = _mm256_set1_ps(p[s]);                                        \
            for (int i = 0; i < VECTORS; i++)                                                  \
                acc[i] = _mm256_fmadd_ps(weight, _mm256_loadu_ps(value + 8 * i), acc[i]);      \
        }                                                                                      \
        for (int i = 0; i < VECTORS; i++) _mm256_storeu_ps(result + 8 * i, acc[i]);            \
    }
WEIGHTED_VALUES(8)  /* head_dim 64 */
WEIGHTED_VALUES(16) /* head_dim 128 */

/* The same for any head size */
static inline void weighted_values(const float *v_cache, const int64_t *offsets, const float *p,
                                   int64_t first, int64_t last, int64_t head_dim,
                                   float *result) {
    if (head_dim == 64) return weighted_values_8(v_cache, offsets, p, first, last, result);
    if (head_dim == 128) return weighted_values_16(v_cache, offsets, p, first, last, result);
    for (int64_t s = first; s < last; s++)
        for (int64_t i = 0; i < head_dim; i++) result[i] += p[s] * v_cache[offsets[s] + i];
}

/* row[s] = exp(row[s] - top) / sum over the row, in place */
static void softmax_row(float *row, int64_t length) {
    float top = -INFINITY, total = 0.0f;
    for (int64_t s = 0; s < length; s++) top = fmaxf(top, row[s]);
    const __m256 shift = _mm256_set1_ps(top);
    __m256 sums = _mm256_setzero_ps();
    int64_t s = 0;
    for (; s + 8 <= length; s += 8) {
        const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(row + s), shift));
        _mm256_storeu_ps(row + s, e);
        sums = _mm256_add_ps(sums, e);
    }
    total = hsum(sums);
    for (; s < length; s++) {
        row[s] = expf(row[s] - top);
        total += row[s];
    }
    const float inverse = 1.0f / total;
    for (s = 0; s < length; s++) row[s] *= inverse;
}

/* The dots of one query [D] with the keys of 8 slots, as one vector: eight independent
 * accumulators, then a horizontal-add tree (D a multiple of 8). */
static inline __m256 eight_dots(const float *query, const float *const keys[8], int64_t head_dim) {
    __m256 acc[8];
    for (int j = 0; j < 8; j++) acc[j] = _mm256_setzero_ps();
    for (int64_t i = 0; i < head_dim; i += 8) {
        const __m256 part = _mm256_loadu_ps(query + i);
        for (int j = 0; j < 8; j++)
            acc[j] = _mm256_fmadd_ps(part, _mm256_loadu_ps(keys[j] + i), acc[j]);
    }
    const __m256 pairs0 = _mm256_hadd_ps(acc[0], acc[1]), pairs1 = _mm256_hadd_ps(acc[2], acc[3]);
    const __m256 pairs2 = _mm256_hadd_ps(acc[4], acc[5]), pairs3 = _mm256_hadd_ps(acc[6], acc[7]);
    const __m256 quads0 = _mm256_hadd_ps(pairs0, pairs1), quads1 = _mm256_hadd_ps(pairs2, pairs3);
    return _mm256_add_ps(_mm256_permute2f128_ps(quads0, quads1, 0x20),
                         _mm256_permute2f128_ps(quads0, quads1, 0x31));
}

void paged_decode_attention(const float *q, int64_t q_row_stride, int64_t seqs, int64_t q_heads,
                            int64_t kv_heads, int64_t head_dim, const float *k_cache,
                            const float *v_cache, int64_t block_size, const int64_t *block_tables,
                            int64_t table_width, const int64_t *table_rows,
                            const int64_t *context_lens, float scale, float *out) {
    const int64_t group = q_heads / kv_heads;
    const int vector_keys = head_dim % 8 == 0;
    const __m256 scaling = _mm256_set1_ps(scale);
#pragma omp parallel for schedule(dynamic, 1) collapse(2)
    for (int64_t b = 0; b < seqs; b++) {
        for (int64_t kvh = 0; kvh < kv_heads; kvh++) {
            const int64_t length = context_lens[b];
            const size_t slot_bytes = sizeof(float) * (size_t)group + sizeof(int64_t);
            void *memory = malloc(slot_bytes * (size_t)length); /* offsets, then scores */
            int64_t *offsets = (int64_t *)memory;
            float *scores = (float *)(offsets + length);
            const int64_t table = table_rows ? table_rows[b] : b;
            slot_offsets(block_tables + table * table_width, block_size, kv_heads, kvh, head_dim,
                         length, offsets);
            int64_t s = 0;
            for (; vector_keys && s + 8 <= length; s += 8) {
                const float *keys[8];
                for (int j = 0; j < 8; j++) {
                    keys[j] = k_cache + offsets[s + j];
                    if (s + j + PREFETCH_SLOTS < length)
                        prefetch_row(k_cache + offsets[s + j + PREFETCH_SLOTS], head_dim);
                }
                for (int64_t g = 0; g < group; g++) {
                    const float *query = q + b * q_row_stride + (kvh * group + g) * head_dim;
                    _mm256_storeu_ps(scores + g * length + s,
                                     _mm256_mul_ps(eight_dots(query, keys, head_dim), scaling));
                }
            }
            for (; s < length; s++) {
                for (int64_t g = 0; g < group; g++) {
                    const float *query = q + b * q_row_stride + (kvh * group + g) * head_dim;
                    scores[g * length + s] =
                        dot_floats(query, k_cache + offsets[s], head_dim) * scale;
                }
            }
            for (s = 0; s < length && s < CHUNK; s++) prefetch_row(v_cache + offsets[s], head_dim);
            for (int64_t g = 0; g < group; g++) softmax_row(scores + g * length, length);
            /* out rows of this KV head's query heads: the probability-weighted values */
            float *result = out + (b * q_heads + kvh * group) * head_dim;
            for (int64_t i = 0; i < group * head_dim; i++) result[i] = 0.0f;
            for (int64_t first = 0; first < length; first += CHUNK) {
                const int64_t last = first + CHUNK < length ? first + CHUNK : length;
                for (s = last; s < last + CHUNK && s < length; s++)
                    prefetch_row(v_cache + offsets[s], head_dim);
                for (int64_t g = 0; g < group; g++)
                    weighted_values(v_cache, offsets, scores + g * length, first, last, head_dim,
                                    result + g * head_dim);
            }
            free(memory);
        }
    }
}
