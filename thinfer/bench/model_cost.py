"""What a model costs per step, from its shape alone: linear-layer FLOPs and weight bytes
(used by `bench decode-curve` for GFLOPs and by `bench bandwidth` for bytes per step)."""

from __future__ import annotations

import torch

from thinfer.config import ModelConfig


def linear_params_per_layer(cfg: ModelConfig) -> int:
    """Weights of one decoder layer's linear layers (q, k, v, o, gate, up, down)."""
    q = cfg.num_attention_heads * cfg.head_dim
    kv = cfg.num_key_value_heads * cfg.head_dim
    return cfg.hidden_size * (2 * q + 2 * kv) + 3 * cfg.hidden_size * cfg.intermediate_size


def linear_flops(cfg: ModelConfig, num_tokens: int, num_sampled: int) -> int:
    """FLOPs of all decoder linears on `num_tokens` rows plus `lm_head` on `num_sampled` rows."""
    layers = cfg.num_hidden_layers * linear_params_per_layer(cfg) * num_tokens
    return 2 * (layers + cfg.hidden_size * cfg.vocab_size * num_sampled)


def weight_bytes(cfg: ModelConfig, dtype: torch.dtype) -> int:
    """About the bytes of the model's weights in `dtype` (linears, embeddings, norms)."""
    embeddings = cfg.vocab_size * cfg.hidden_size * (1 if cfg.tie_word_embeddings else 2)
    per_layer = linear_params_per_layer(cfg) + 2 * cfg.hidden_size
    return (cfg.num_hidden_layers * per_layer + embeddings + cfg.hidden_size) * dtype.itemsize
