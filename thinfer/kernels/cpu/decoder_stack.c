/* A whole decode step of a Llama-family decoder in one call: every layer's add + RMSNorm,
 * fused qkv product, RoPE, KV store, paged attention, o product, add + RMSNorm, gate/up
 * product, SiLU-multiply and down product, then the final norm, for a batch of sequences
 * that decode one token each. At decode batch sizes the Python between these kernels (a
 * dozen calls per layer) cost as much as a third of the step; here they are the same
 * kernels in the same order on the same values, so the result equals the per-layer path's
 * bitwise (`thinfer.models.native_stack` holds the Python side and says when it applies).
 */
#include <stdlib.h>
#include <string.h>

#include "kernels.h"

/* How a product's weights are held (`thinfer.models.native_stack.PRODUCT_KINDS`). */
enum { F32 = 0, Q4_ROWS = 1, Q8_ROWS = 2, Q4_PANELS = 3, Q8_PANELS = 4, F32_PANELS = 5 };

typedef struct {
    int64_t kind, n, k;
    const void *weight; /* fp32 weight or panels | q4 codes or panels | q8 codes or panels */
    const void *extra;  /* NULL | q4 fp16 scales and mins or panel factors | q8 scales */
    const float *bias;  /* [N] or NULL */
} Product;

typedef struct {
    int64_t q_heads, kv_heads, ffn; /* per layer: a width-pruned model's layers differ */
    const float *input_norm, *post_norm; /* [hidden] */
    Product qkv, o, gate_up, down;
    float *k_cache, *v_cache; /* [blocks, block_size, kv_heads, head_dim] */
} Layer;

typedef struct {
    int64_t num_layers, hidden, head_dim, block_size;
    float eps, scale;
    const float *cos, *sin; /* RoPE tables [positions, head_dim] */
    const float *final_norm;
    const Layer *layers;
} Stack;

static void product(const Product *p, const float *x, int64_t m, float *y) {
    switch (p->kind) {
        case F32: f32_linear(x, m, p->k, p->weight, p->n, p->bias, y); return;
        case Q4_ROWS: q4_linear(x, m, p->k, p->weight, p->extra, p->n, p->bias, y); return;
        case Q8_ROWS: q8_linear(x, m, p->k, p->weight, p->extra, p->n, p->bias, y); return;
#ifdef __AVX512F__
        case Q4_PANELS:
            q4_panel_linear(x, m, p->k, p->weight, p->extra, p->n, p->bias, y);
            return;
        case Q8_PANELS:
            q8_panel_linear(x, m, p->k, p->weight, p->extra, p->n, p->bias, y);
            return;
        case F32_PANELS: f32_panel_linear(x, m, p->k, p->weight, p->n, p->bias, y); return;
#endif
        default: abort(); /* the Python side builds only kinds this build has */
    }
}

/* hidden [M, H]: the embeddings of M sequences' new tokens in, their final normed hidden
 * states out. Token t is at positions[t], writes its key and value to flat slot slots[t] and
 * attends to the first context_lens[t] slots of block table row t ([M, table_width]). */
void decoder_stack(const Stack *stack, int64_t m, float *hidden, const int64_t *positions,
                   const int64_t *slots, const int64_t *block_tables, int64_t table_width,
                   const int64_t *context_lens) {
    if (m <= 0) return;
    const int64_t h = stack->hidden, d = stack->head_dim;
    int64_t widest_qkv = 0, widest_q = 0, widest_ffn = 0;
    for (int64_t l = 0; l < stack->num_layers; l++) {
        const Layer *layer = stack->layers + l;
        const int64_t qkv_width = (layer->q_heads + 2 * layer->kv_heads) * d;
        widest_qkv = qkv_width > widest_qkv ? qkv_width : widest_qkv;
        widest_q = layer->q_heads * d > widest_q ? layer->q_heads * d : widest_q;
        widest_ffn = layer->ffn > widest_ffn ? layer->ffn : widest_ffn;
    }
    float *memory = malloc(sizeof(float) * (size_t)m *
                           (size_t)(3 * h + widest_qkv + widest_q + 3 * widest_ffn));
    float *residual = memory, *normed = residual + m * h, *block_out = normed + m * h;
    float *qkv = block_out + m * h, *attended = qkv + m * widest_qkv;
    float *gate_up = attended + m * widest_q, *activated = gate_up + m * 2 * widest_ffn;
    for (int64_t l = 0; l < stack->num_layers; l++) {
        const Layer *layer = stack->layers + l;
        const int64_t q_size = layer->q_heads * d, kv_size = layer->kv_heads * d;
        const int64_t qkv_width = q_size + 2 * kv_size;
        if (l == 0) /* the embeddings are the residual stream */
            add_rms_norm(NULL, hidden, layer->input_norm, m, h, stack->eps, normed, residual);
        else
            add_rms_norm(block_out, residual, layer->input_norm, m, h, stack->eps, normed,
                         residual);
        product(&layer->qkv, normed, m, qkv);
        rope(qkv, qkv_width, layer->q_heads, qkv + q_size, qkv_width, layer->kv_heads, m, d,
             positions, stack->cos, stack->sin);
        for (int64_t t = 0; t < m; t++) {
            const float *key = qkv + t * qkv_width + q_size;
            memcpy(layer->k_cache + slots[t] * kv_size, key, sizeof(float) * kv_size);
            memcpy(layer->v_cache + slots[t] * kv_size, key + kv_size, sizeof(float) * kv_size);
        }
        paged_decode_attention(qkv, qkv_width, m, layer->q_heads, layer->kv_heads, d,
                               layer->k_cache, layer->v_cache, stack->block_size, block_tables,
                               table_width, NULL, context_lens, stack->scale, attended);
        product(&layer->o, attended, m, block_out);
        add_rms_norm(block_out, residual, layer->post_norm, m, h, stack->eps, normed, residual);
        product(&layer->gate_up, normed, m, gate_up);
        silu_mul(gate_up, m, layer->ffn, activated);
        product(&layer->down, activated, m, block_out);
    }
    add_rms_norm(block_out, residual, stack->final_norm, m, h, stack->eps, hidden, residual);
    free(memory);
}
