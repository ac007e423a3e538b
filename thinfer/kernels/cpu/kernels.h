/* The exported kernels of this directory, for the ones that call others (decoder_stack.c).
 * `thinfer.kernels.cpu_native.SIGNATURES` lists the same functions for ctypes. */
#ifndef THINFER_KERNELS_H
#define THINFER_KERNELS_H

#include <stdint.h>

void add_rms_norm(const float *x, const float *residual, const float *weight, int64_t rows,
                  int64_t dim, float eps, float *normed, float *residual_out);
void rope(float *q, int64_t q_row_stride, int64_t q_heads, float *k, int64_t k_row_stride,
          int64_t k_heads, int64_t tokens, int64_t head_dim, const int64_t *positions,
          const float *cos_table, const float *sin_table);
void silu_mul(const float *gate_up, int64_t rows, int64_t width, float *out);
void paged_decode_attention(const float *q, int64_t q_row_stride, int64_t seqs, int64_t q_heads,
                            int64_t kv_heads, int64_t head_dim, const float *k_cache,
                            const float *v_cache, int64_t block_size, const int64_t *block_tables,
                            int64_t table_width, const int64_t *table_rows,
                            const int64_t *context_lens, float scale, float *out);
void f32_linear(const float *x, int64_t m, int64_t k, const float *weight, int64_t n,
                const float *bias, float *y);
void q4_linear(const float *x, int64_t m, int64_t k, const uint8_t *codes, const uint16_t *dm,
               int64_t n, const float *bias, float *y);
void q8_linear(const float *x, int64_t m, int64_t k, const int8_t *codes, const float *scales,
               int64_t n, const float *bias, float *y);
#ifdef __AVX512F__
void q4_panel_linear(const float *x, int64_t m, int64_t k, const uint8_t *codes,
                     const uint16_t *factors, int64_t n, const float *bias, float *y);
void q8_panel_linear(const float *x, int64_t m, int64_t k, const int8_t *codes,
                     const float *scales, int64_t n, const float *bias, float *y);
void f32_panel_linear(const float *x, int64_t m, int64_t k, const float *panels, int64_t n,
                      const float *bias, float *y);
#endif

#endif
