"""`ModelConfig` from a GGUF file's metadata (llama.cpp's `{arch}.*` keys)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from thinfer.config import ModelConfig

# GGUF `general.architecture` -> the HF class name thinfer records as `ModelConfig.architecture`.
GGUF_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}

# The Llama 3.1 "llama3" RoPE scaling (HF's defaults), which llama.cpp stores as a tensor.
_LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}


def gguf_model_config(
    path: str, fields: dict[str, Any], tensor_names: set[str], rope_freqs: np.ndarray | None
) -> ModelConfig:
    """Build the config of the GGUF at `path` from its metadata `fields` (key -> value).

    `tensor_names` decides tied embeddings (no `output.weight`) and q/k/v biases;
    `rope_freqs` is the file's `rope_freqs.weight` (Llama 3.1 RoPE scaling) or None.
    """
    arch = fields.get("general.architecture")
    if arch not in GGUF_ARCHITECTURES:
        raise ValueError(
            f"{path}: GGUF architecture {arch!r} is not supported; "
            f"supported: {', '.join(GGUF_ARCHITECTURES)}"
        )

    def get(key: str, default: Any = None, required: bool = False) -> Any:
        full = f"{arch}.{key}"
        if full not in fields:
            if required:
                raise ValueError(f"{path}: GGUF metadata lacks {full!r}")
            return default
        return fields[full]

    vocab = get("vocab_size") or fields.get("tokenizer.ggml.tokens")
    if vocab is None:
        raise ValueError(f"{path}: GGUF metadata gives no vocab size ({arch}.vocab_size or tokens)")
    eos = [
        fields[k]
        for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id")
        if k in fields
    ]
    try:
        n_head = int(get("attention.head_count", required=True))
        hidden = int(get("embedding_length", required=True))
        head_dim = get("attention.key_length") or get("rope.dimension_count") or hidden // n_head
        theta = float(get("rope.freq_base", 10000.0))
        rope_scaling = _rope_scaling(path, get, rope_freqs, int(head_dim), theta)
        return ModelConfig(
            vocab_size=int(vocab),
            hidden_size=hidden,
            intermediate_size=int(get("feed_forward_length", required=True)),
            num_hidden_layers=int(get("block_count", required=True)),
            num_attention_heads=n_head,
            num_key_value_heads=int(get("attention.head_count_kv", n_head)),
            head_dim=int(head_dim),
            rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
            rope_theta=theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=int(get("context_length", 4096)),
            tie_word_embeddings="output.weight" not in tensor_names,
            attention_bias="blk.0.attn_q.bias" in tensor_names,
            architecture=GGUF_ARCHITECTURES[arch],
            bos_token_id=fields.get("tokenizer.ggml.bos_token_id"),
            eos_token_ids=[int(e) for e in dict.fromkeys(eos)],
        )
    except (TypeError, ValueError, ZeroDivisionError) as exc:
        message = str(exc)
        raise ValueError(message if message.startswith(path) else f"{path}: {message}") from None


def _rope_scaling(
    path: str, get: Any, rope_freqs: np.ndarray | None, head_dim: int, theta: float
) -> dict[str, Any] | None:
    kind = get("rope.scaling.type")
    if rope_freqs is not None:
        if kind not in (None, "none"):
            raise ValueError(f"{path}: both rope_freqs.weight and rope.scaling.type={kind!r}")
        if not np.allclose(rope_freqs, llama3_rope_factors(head_dim, theta), rtol=1e-4):
            raise ValueError(
                f"{path}: rope_freqs.weight does not match Llama 3.1 RoPE scaling with HF's "
                f"default parameters {_LLAMA3_ROPE}; other factors are not supported"
            )
        return dict(_LLAMA3_ROPE)
    if kind in (None, "none"):
        return None
    if kind not in ("linear", "yarn"):
        raise ValueError(f"{path}: rope.scaling.type {kind!r} is not supported (linear, yarn)")
    scaling: dict[str, Any] = {"rope_type": kind, "factor": float(get("rope.scaling.factor", 1.0))}
    original = get("rope.scaling.original_context_length")
    if original is not None:
        scaling["original_max_position_embeddings"] = int(original)
    return scaling


def llama3_rope_factors(head_dim: int, theta: float) -> np.ndarray:
    """The per-frequency divisors llama.cpp's converter writes as `rope_freqs.weight`."""
    p = _LLAMA3_ROPE
    old_len = p["original_max_position_embeddings"]
    low_wavelen = old_len / p["low_freq_factor"]
    high_wavelen = old_len / p["high_freq_factor"]
    factors = []
    for i in range(0, head_dim, 2):
        wavelen = 2 * math.pi * theta ** (i / head_dim)
        if wavelen < high_wavelen:
            factors.append(1.0)
        elif wavelen > low_wavelen:
            factors.append(p["factor"])
        else:
            smooth = (old_len / wavelen - p["low_freq_factor"]) / (
                p["high_freq_factor"] - p["low_freq_factor"]
            )
            factors.append(1 / ((1 - smooth) / p["factor"] + smooth))
    return np.asarray(factors, dtype=np.float32)
