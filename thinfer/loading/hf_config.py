"""`hf_config`: the transformers config of a thinfer `ModelConfig` (the HF peer of the
benchmarks, and the HF copy of a model being pruned)."""

from __future__ import annotations

from typing import Any

import torch

from thinfer.config import ModelConfig
from thinfer.loading.checkpoint import Checkpoint


def hf_config(cfg: ModelConfig) -> object:
    """A transformers LlamaConfig (or Qwen2Config) with the shape of a thinfer ModelConfig."""
    from transformers import LlamaConfig, Qwen2Config

    rope: dict[str, object] = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling:
        rope.update(cfg.rope_scaling)
        rope["rope_theta"] = cfg.rope_theta
        rope.setdefault("rope_type", rope.pop("type", "default"))
    common = dict(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads,
        head_dim=cfg.head_dim,
        rms_norm_eps=cfg.rms_norm_eps,
        rope_parameters=rope,
        max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=cfg.tie_word_embeddings,
        bos_token_id=cfg.bos_token_id,
        eos_token_id=cfg.eos_token_ids[0] if cfg.eos_token_ids else None,
    )
    # transformers refuses a hidden size that is not a multiple of the head count, though
    # its attention computes with head_dim alone (a width-pruned model drops whole heads):
    # such a config is built with a head count that passes, then given the real one.
    heads = (cfg.num_attention_heads, cfg.num_key_value_heads)
    if cfg.hidden_size % cfg.num_attention_heads:
        common["num_attention_heads"] = common["num_key_value_heads"] = 1
    if "qwen2" in cfg.architecture.lower():
        config = Qwen2Config(**common)
    else:
        config = LlamaConfig(attention_bias=cfg.attention_bias, **common)
    config.num_attention_heads, config.num_key_value_heads = heads
    return config


def hf_model_from_checkpoint(checkpoint: Checkpoint, dtype: torch.dtype) -> Any:
    """An HF transformers model of `checkpoint`'s shape holding its weights (HF names, Q/K
    rows already un-permuted for a GGUF), tied embeddings tied, in eval mode; ValueError
    when the checkpoint has no weights or its tensors do not match the model.

    A FLAP-pruned checkpoint (per-layer widths, o_proj/down_proj biases) has no HF config
    that says its shape; its model is built at the widest layer's shape and each projection
    then rebuilt at its tensor's shape (HF's attention and MLP run such layers as they
    are: the query heads per KV head stay the same), as `thinfer prune` holds it in memory.
    """
    from transformers import AutoModelForCausalLM

    if checkpoint.tensors is None:
        raise ValueError(f"{checkpoint.source}: dummy checkpoint, no weights to load")
    model: Any = AutoModelForCausalLM.from_config(hf_config(checkpoint.config), dtype=dtype)
    state = {name: tensor.to(dtype) for name, tensor in checkpoint.tensors()}
    cfg = checkpoint.config
    if not cfg.uniform_width or cfg.output_bias:
        _fit_projections(model, state, cfg)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = model.config.tie_word_embeddings
    missing = [m for m in missing if not (m == "lm_head.weight" and tied)]
    if missing or unexpected:
        raise ValueError(
            f"{checkpoint.source}: tensors do not match the HF model: missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}"
        )
    if tied:
        model.tie_weights()
    return model.eval()


def _fit_projections(model: Any, state: dict[str, torch.Tensor], cfg: ModelConfig) -> None:
    """Rebuild every decoder projection of `model` at its tensor's shape in `state`, with a
    bias where `state` has one, and record the per-layer widths in the HF config (so saving
    the model writes a config thinfer reads back)."""
    for name, module in list(model.named_modules()):
        weight = state.get(f"{name}.weight")
        if not isinstance(module, torch.nn.Linear) or weight is None or ".layers." not in name:
            continue
        has_bias = f"{name}.bias" in state
        if tuple(module.weight.shape) == tuple(weight.shape) and (module.bias is None) != has_bias:
            continue
        parent, _, child = name.rpartition(".")
        rebuilt = torch.nn.Linear(
            weight.shape[1], weight.shape[0], bias=has_bias, dtype=weight.dtype
        )
        setattr(model.get_submodule(parent), child, rebuilt)
    model.config.layer_num_key_value_heads = cfg.layer_num_key_value_heads
    model.config.layer_intermediate_sizes = cfg.layer_intermediate_sizes
    model.config.output_bias = cfg.output_bias
