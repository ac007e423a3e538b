"""Named model shapes for dummy (randomly initialized) weights.

A preset lets benchmarks and tests build a model of a real model's size without its weights.
"""

from __future__ import annotations

from dataclasses import replace

from thinfer.config import ModelConfig

_LLAMA = "LlamaForCausalLM"


PRESETS: dict[str, ModelConfig] = {
    "llama-7b": ModelConfig(
        architecture=_LLAMA,
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        rms_norm_eps=1e-6,
        max_position_embeddings=2048,
        bos_token_id=1,
        eos_token_ids=[2],
    ),
    "llama-13b": ModelConfig(
        architecture=_LLAMA,
        vocab_size=32000,
        hidden_size=5120,
        intermediate_size=13824,
        num_hidden_layers=40,
        num_attention_heads=40,
        num_key_value_heads=40,
        rms_norm_eps=1e-6,
        max_position_embeddings=2048,
        bos_token_id=1,
        eos_token_ids=[2],
    ),
    "llama-2-7b": ModelConfig(
        architecture=_LLAMA,
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        rms_norm_eps=1e-5,
        max_position_embeddings=4096,
        bos_token_id=1,
        eos_token_ids=[2],
    ),
    "llama-3-8b": ModelConfig(
        architecture=_LLAMA,
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        max_position_embeddings=8192,
        bos_token_id=128000,
        eos_token_ids=[128001, 128009],
    ),
    # Llama 3.1 8B, the shape of DeepSeek-R1-Distill-Llama-8B: 128K context (llama3 RoPE).
    "llama-3.1-8b": ModelConfig(
        architecture=_LLAMA,
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        max_position_embeddings=131072,
        bos_token_id=128000,
        eos_token_ids=[128001, 128009],
    ),
    "qwen2.5-7b": ModelConfig(
        vocab_size=152064,
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        rms_norm_eps=1e-6,
        rope_theta=1e6,
        max_position_embeddings=32768,
        attention_bias=True,
        architecture="Qwen2ForCausalLM",
        bos_token_id=151643,
        eos_token_ids=[151645, 151643],
    ),
    "smollm2-135m": ModelConfig(
        architecture=_LLAMA,
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        rms_norm_eps=1e-5,
        rope_theta=1e5,
        max_position_embeddings=8192,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_ids=[2],
    ),
    # A few-MB model for fast tests of the engine.
    "tiny": ModelConfig(
        architecture=_LLAMA,
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        bos_token_id=1,
        eos_token_ids=[2],
    ),
}


def preset_config(name: str) -> ModelConfig:
    """A fresh copy of preset `name`'s config; ValueError listing the presets if unknown."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; presets: {', '.join(PRESETS)}")
    cfg = PRESETS[name]
    scaling = dict(cfg.rope_scaling) if cfg.rope_scaling is not None else None
    return replace(cfg, eos_token_ids=list(cfg.eos_token_ids), rope_scaling=scaling)
