"""What a model costs per step, from its shape alone: linear-layer FLOPs and weight bytes
(used by `bench decode-curve` for GFLOPs and by `bench bandwidth` for bytes per step)."""

from __future__ import annotations

import torch

from thinfer.config import ModelConfig


def linear_params_per_layer(cfg: ModelConfig, layer: int | None = None) -> int:
    """Weights of one decoder layer's linear layers (q, k, v, o, gate, up, down): layer
    `layer`'s own (FLAP-pruned models differ per layer), or None: a layer of the config's
    widest shape."""
    group = cfg.num_attention_heads // cfg.num_key_value_heads
    kv_heads = cfg.num_key_value_heads if layer is None else cfg.layer_kv_heads(layer)
    ffn = cfg.intermediate_size if layer is None else cfg.layer_ffn_size(layer)
    q, kv = kv_heads * group * cfg.head_dim, kv_heads * cfg.head_dim
    return cfg.hidden_size * (2 * q + 2 * kv) + 3 * cfg.hidden_size * ffn


def linear_params(cfg: ModelConfig) -> int:
    """Weights of all decoder layers' linear layers, each layer at its own width."""
    return sum(linear_params_per_layer(cfg, i) for i in range(cfg.num_hidden_layers))


def linear_flops(cfg: ModelConfig, num_tokens: int, num_sampled: int) -> int:
    """FLOPs of all decoder linears on `num_tokens` rows plus `lm_head` on `num_sampled` rows."""
    layers = linear_params(cfg) * num_tokens
    return 2 * (layers + cfg.hidden_size * cfg.vocab_size * num_sampled)


def weight_bytes(cfg: ModelConfig, dtype: torch.dtype) -> int:
    """About the bytes of the model's weights in `dtype` (linears, embeddings, norms)."""
    embeddings = cfg.vocab_size * cfg.hidden_size * (1 if cfg.tie_word_embeddings else 2)
    norms = 2 * cfg.hidden_size * cfg.num_hidden_layers
    return (linear_params(cfg) + norms + embeddings + cfg.hidden_size) * dtype.itemsize
