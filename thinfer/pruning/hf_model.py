"""Any checkpoint thinfer loads, as an HF transformers model to prune.

Pruning needs gradients (Taylor scores), activation statistics and module surgery, which
HF's modules give directly; the weights come from thinfer's own loaders (so a GGUF works
too: its tensors arrive with HF names, Q/K rows already un-permuted) and are cast to fp32.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from thinfer.config import ModelConfig
from thinfer.loading import load_checkpoint
from thinfer.loading.tokenizer import Tokenizer

_HF_TYPES = {"llama": "LlamaConfig", "mistral": "MistralConfig", "qwen2": "Qwen2Config"}


@dataclass
class PruningModel:
    """The HF model being pruned, its tokenizer, and where it came from."""

    model: nn.Module
    tokenizer: Tokenizer
    source: str

    @property
    def layers(self) -> nn.ModuleList:
        """The decoder blocks, in order."""
        return self.model.model.layers

    def num_parameters(self) -> int:
        """Parameters, counting tied embeddings once."""
        return sum(p.numel() for p in {id(p): p for p in self.model.parameters()}.values())


def hf_config(cfg: ModelConfig) -> Any:
    """A transformers config of the same shape as `cfg`."""
    import transformers

    family = next((f for f in _HF_TYPES if cfg.architecture.lower().startswith(f)), "llama")
    config_class = getattr(transformers, _HF_TYPES[family])
    fields: dict[str, Any] = dict(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads,
        head_dim=cfg.head_dim,
        rms_norm_eps=cfg.rms_norm_eps,
        rope_theta=cfg.rope_theta,
        rope_scaling=cfg.rope_scaling,
        max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=cfg.tie_word_embeddings,
        bos_token_id=cfg.bos_token_id,
        eos_token_id=cfg.eos_token_ids[0] if len(cfg.eos_token_ids) == 1 else cfg.eos_token_ids,
        torch_dtype="float32",
    )
    if family == "llama":
        fields["attention_bias"] = cfg.attention_bias
    if family == "mistral":
        fields["sliding_window"] = None
    return config_class(**fields)


def load_for_pruning(model: str | None = None, load_format: str = "auto") -> PruningModel:
    """The checkpoint at `model` (None: the embedded default model) as an fp32 HF model in
    eval mode; ValueError when it has no tokenizer (calibration text must be tokenized)."""
    from transformers import AutoModelForCausalLM

    checkpoint = load_checkpoint(model, load_format)
    if checkpoint.tensors is None:
        raise ValueError("pruning needs real weights: dummy checkpoints have nothing to score")
    if checkpoint.tokenizer is None:
        raise ValueError(f"{checkpoint.source}: no tokenizer, so no calibration text")
    net = AutoModelForCausalLM.from_config(hf_config(checkpoint.config), dtype=torch.float32)
    state = {name: tensor.float() for name, tensor in checkpoint.tensors()}
    missing, unexpected = net.load_state_dict(state, strict=False)
    missing = [m for m in missing if not (m == "lm_head.weight" and net.config.tie_word_embeddings)]
    if missing or unexpected:
        raise ValueError(
            f"{checkpoint.source}: tensors do not match the model: missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}"
        )
    if net.config.tie_word_embeddings:
        net.tie_weights()
    return PruningModel(net.eval().requires_grad_(False), checkpoint.tokenizer, checkpoint.source)
