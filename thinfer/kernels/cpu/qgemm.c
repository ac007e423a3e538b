/* Quantized matmuls for CPU decoding: y[M, N] = x[M, K] W^T (+ bias), AVX2 + FMA + F16C.
 *
 * The activations are quantized first (q8_quantize): each group of 32 values along K gets
 * int8 codes and one fp32 scale, x ~= xd * xq, and the fp32 sum of its values. The weights are
 * one of two formats:
 *
 *   q4 (q4_gemm): a group of 32 values along K is 16 bytes of 4-bit codes q in [0, 15] (byte j
 *   holds value j in its low nibble and value j + 16 in its high nibble, GGUF Q4_1's layout)
 *   and one fp16 (scale d, min m) pair: w = d * q + m.
 *   dot(w, x) over a group = d * xd * sum(q * xq) + m * sum(x).
 *
 *   q8 (q8_gemm): int8 codes c in [-127, 127] with one fp32 scale per output row: w = s * c.
 *   dot(w, x) over a row = s * sum over groups of xd * sum(c * xq).
 *
 * Integer group dots run on _mm256_maddubs_epi16 (unsigned x signed bytes into int16 pairs:
 * at most 2 * 15 * 127 for q4 and 2 * 127 * 127 for q8, no saturation), then
 * _mm256_madd_epi16 into int32 and one fp32 fused multiply-add per group, the scheme of
 * llama.cpp's Q4_1 x Q8_1 and Q8_0 x Q8_0 dots. Output rows are split across the OpenMP
 * threads of the process (the runtime torch already loaded: the same libgomp.so.1).
 * `thinfer.kernels.cpu_qgemm` holds the torch reference this must match.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#define GROUP 32

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* x [M, K] -> xq [M, K] int8, xd [M, K / 32] scales, xs [M, K / 32] sums. */
void q8_quantize(const float *x, int64_t m, int64_t k, int8_t *xq, float *xd, float *xs) {
    const int64_t groups = k / GROUP;
    for (int64_t g = 0; g < m * groups; g++) {
        const float *src = x + g * GROUP;
        float amax = 0.0f, sum = 0.0f;
        for (int i = 0; i < GROUP; i++) {
            amax = fmaxf(amax, fabsf(src[i]));
            sum += src[i];
        }
        const float d = amax / 127.0f;
        const float inv = d > 0.0f ? 1.0f / d : 0.0f;
        for (int i = 0; i < GROUP; i++) xq[g * GROUP + i] = (int8_t)lrintf(src[i] * inv);
        xd[g] = d;
        xs[g] = sum;
    }
}

static inline __m256i unpack_q4(const uint8_t *bytes) {
    const __m128i packed = _mm_loadu_si128((const __m128i *)bytes);
    const __m128i mask = _mm_set1_epi8(0x0F);
    const __m128i low = _mm_and_si128(packed, mask);
    const __m128i high = _mm_and_si128(_mm_srli_epi16(packed, 4), mask);
    return _mm256_set_m128i(high, low);
}

static inline __m256 group_dot(__m256i products16) {
    return _mm256_cvtepi32_ps(_mm256_madd_epi16(products16, _mm256_set1_epi16(1)));
}

/* Quantized activations of x [M, K] in one buffer: codes, then scales, then sums. */
typedef struct {
    int8_t *xq;
    float *xd, *xs;
    void *memory;
} Activations;

static Activations quantize_activations(const float *x, int64_t m, int64_t k) {
    const int64_t groups = k / GROUP;
    Activations a;
    const size_t bytes = (size_t)(m * k + 2 * m * groups * (int64_t)sizeof(float));
    a.memory = aligned_alloc(32, (bytes + 31) / 32 * 32);  /* a multiple of the alignment */
    a.xd = (float *)a.memory;
    a.xs = a.xd + m * groups;
    a.xq = (int8_t *)(a.xs + m * groups);
    q8_quantize(x, m, k, a.xq, a.xd, a.xs);
    return a;
}

/* halfs[0, len) -> floats */
static inline void halfs_to_floats(const uint16_t *halfs, int64_t len, float *out) {
    int64_t i = 0;
    for (; i + 8 <= len; i += 8)
        _mm256_storeu_ps(out + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(halfs + i))));
    for (; i < len; i++) out[i] = _cvtsh_ss(halfs[i]);
}

static inline float dot_floats(const float *a, const float *b, int64_t len) {
    __m256 acc = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= len; i += 8)
        acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
    float sum = hsum(acc);
    for (; i < len; i++) sum += a[i] * b[i];
    return sum;
}

/* sum over groups of factor[g] * (integer dot of the unsigned codes and the int8 codes xq) */
static inline float q4_row_dot(const uint8_t *w_codes, int unpacked, const int8_t *xq,
                               const float *factor, int64_t groups) {
    __m256 acc = _mm256_setzero_ps();
    for (int64_t g = 0; g < groups; g++) {
        const __m256i w = unpacked ? _mm256_load_si256((const __m256i *)(w_codes + g * GROUP))
                                   : unpack_q4(w_codes + g * (GROUP / 2));
        const __m256i v = _mm256_loadu_si256((const __m256i *)(xq + g * GROUP));
        acc = _mm256_fmadd_ps(group_dot(_mm256_maddubs_epi16(w, v)),
                              _mm256_broadcast_ss(factor + g), acc);
    }
    return hsum(acc);
}

/* x [M, K] fp32; codes [N, K / 2], dm [N, 2, K / 32] fp16 (the row's scales, then its mins),
 * bias [N] or NULL -> y [M, N]. With M > 1 a row's codes are unpacked once into a buffer. */
void q4_linear(const float *x, int64_t m, int64_t k, const uint8_t *codes, const uint16_t *dm,
               int64_t n, const float *bias, float *y) {
    const int64_t groups = k / GROUP;
    const Activations a = quantize_activations(x, m, k);
#pragma omp parallel
    {
        uint8_t *row_codes = (uint8_t *)aligned_alloc(32, (size_t)(k + 31) / 32 * 32);
        float *scales = (float *)malloc(sizeof(float) * (size_t)groups * 3);
        float *mins = scales + groups, *factor = mins + groups;
#pragma omp for schedule(static)
        for (int64_t row = 0; row < n; row++) {
            const uint8_t *wrow = codes + row * (k / 2);
            halfs_to_floats(dm + row * groups * 2, groups, scales);
            halfs_to_floats(dm + row * groups * 2 + groups, groups, mins);
            if (m > 1)
                for (int64_t g = 0; g < groups; g++)
                    _mm256_store_si256((__m256i *)(row_codes + g * GROUP),
                                       unpack_q4(wrow + g * (GROUP / 2)));
            const float b = bias ? bias[row] : 0.0f;
            for (int64_t i = 0; i < m; i++) {
                const float *drow = a.xd + i * groups;
                for (int64_t g = 0; g < groups; g++) factor[g] = scales[g] * drow[g];
                const float dot = m > 1 ? q4_row_dot(row_codes, 1, a.xq + i * k, factor, groups)
                                        : q4_row_dot(wrow, 0, a.xq + i * k, factor, groups);
                y[i * n + row] = dot + dot_floats(mins, a.xs + i * groups, groups) + b;
            }
        }
        free(row_codes);
        free(scales);
    }
    free(a.memory);
}

/* x [M, K] fp32; codes [N, K] int8, scales [N] fp32, bias [N] or NULL -> y [M, N]. */
void q8_linear(const float *x, int64_t m, int64_t k, const int8_t *codes, const float *scales,
               int64_t n, const float *bias, float *y) {
    const int64_t groups = k / GROUP;
    const Activations a = quantize_activations(x, m, k);
#pragma omp parallel for schedule(static)
    for (int64_t row = 0; row < n; row++) {
        const int8_t *wrow = codes + row * k;
        const float b = bias ? bias[row] : 0.0f;
        for (int64_t i = 0; i < m; i++) {
            const int8_t *xrow = a.xq + i * k;
            const float *drow = a.xd + i * groups;
            __m256 acc = _mm256_setzero_ps();
            for (int64_t g = 0; g < groups; g++) {
                const __m256i w = _mm256_loadu_si256((const __m256i *)(wrow + g * GROUP));
                const __m256i v = _mm256_loadu_si256((const __m256i *)(xrow + g * GROUP));
                const __m256i products = _mm256_maddubs_epi16(_mm256_sign_epi8(w, w),
                                                              _mm256_sign_epi8(v, w));
                acc = _mm256_fmadd_ps(group_dot(products), _mm256_broadcast_ss(drow + g), acc);
            }
            y[i * n + row] = scales[row] * hsum(acc) + b;
        }
    }
    free(a.memory);
}
