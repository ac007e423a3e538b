"""Typed configuration objects, validated when they are built.

`ModelConfig` describes the shape of a Llama-family decoder (read from a HF `config.json`,
from GGUF metadata, or from a named preset). `EngineConfig` holds what the engine needs to
size its batches and its paged KV cache.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}

# Attention backends a model can use (see thinfer.attention.backend).
ATTENTION_BACKENDS = ("auto", "torch", "triton")


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """Turn a user dtype ("auto", "bf16", torch.float16, ...) into a torch dtype.

    "auto" is float32 on CPU (fast and exact there) and bfloat16 on accelerators.
    """
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.float32 if device.type == "cpu" else torch.bfloat16
    if dtype not in _DTYPES:
        raise ValueError(f"dtype: unknown value {dtype!r}; use auto, {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


@dataclass
class ModelConfig:
    """Shape of a Llama-family decoder (Llama 2/3, Mistral, Qwen2, SmolLM2).

    `attention_bias` is True for Qwen2-style q/k/v biases. `rope_scaling` follows HF's
    dictionary (`rope_type` "default", "linear", "llama3", "dynamic").

    Width-pruned models (FLAP, `thinfer.pruning.flap`) may differ per layer:
    `layer_num_key_value_heads` and `layer_intermediate_sizes` give each layer's KV heads
    (its query heads are that many whole GQA groups) and MLP width, and `output_bias` adds
    biases to o_proj and down_proj. Then `num_key_value_heads`, `num_attention_heads` and
    `intermediate_size` are the widest layer's, which sizes the KV cache.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int = 0
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    architecture: str = "llama"
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    layer_num_key_value_heads: list[int] | None = None
    layer_intermediate_sizes: list[int] | None = None
    output_bias: bool = False

    def __post_init__(self) -> None:
        if self.head_dim == 0:
            self.head_dim = self.hidden_size // max(self.num_attention_heads, 1)
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "max_position_embeddings",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"model config: {name} must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"model config: num_attention_heads ({self.num_attention_heads}) must be a "
                f"multiple of num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.head_dim % 2:
            raise ValueError(f"model config: head_dim must be even for RoPE, got {self.head_dim}")
        self._check_layer_widths("layer_num_key_value_heads", self.num_key_value_heads)
        self._check_layer_widths("layer_intermediate_sizes", self.intermediate_size)

    def _check_layer_widths(self, name: str, widest: int) -> None:
        """ValueError unless the per-layer list `name` (if any) has one width per layer, each
        in [1, widest], and some layer as wide as `widest`."""
        widths = getattr(self, name)
        if widths is None:
            return
        if len(widths) != self.num_hidden_layers or not all(
            isinstance(w, int) and 1 <= w <= widest for w in widths
        ):
            raise ValueError(
                f"model config: {name} must list {self.num_hidden_layers} integers in "
                f"[1, {widest}], got {widths!r}"
            )
        if max(widths) != widest:
            raise ValueError(
                f"model config: the widest layer of {name} ({max(widths)}) must equal the "
                f"model's width {widest}"
            )

    @property
    def uniform_width(self) -> bool:
        """True when every layer has the same heads and MLP width."""
        return all(
            widths is None or len(set(widths)) == 1
            for widths in (self.layer_num_key_value_heads, self.layer_intermediate_sizes)
        )

    def layer_kv_heads(self, layer: int) -> int:
        """KV heads of layer `layer`."""
        widths = self.layer_num_key_value_heads
        return self.num_key_value_heads if widths is None else widths[layer]

    def layer_ffn_size(self, layer: int) -> int:
        """MLP width of layer `layer`."""
        widths = self.layer_intermediate_sizes
        return self.intermediate_size if widths is None else widths[layer]

    @property
    def kv_elements_per_token(self) -> int:
        """Numbers of K and V stored per token over all layers (times the dtype's size = bytes)."""
        return 2 * self.num_hidden_layers * self.num_key_value_heads * self.head_dim

    @classmethod
    def from_hf_dict(cls, cfg: dict[str, Any]) -> ModelConfig:
        """Build from a HF `config.json` dictionary (LlamaConfig, MistralConfig, Qwen2Config)."""
        archs = cfg.get("architectures") or []
        model_type = cfg.get("model_type", "llama")
        known = {"llama", "mistral", "qwen2"}
        if model_type not in known:
            raise ValueError(
                f"config.json: model_type {model_type!r} is not supported; "
                f"supported: {', '.join(sorted(known))}"
            )
        required = (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
        )
        missing = [k for k in required if k not in cfg]
        if missing:
            raise ValueError(f"config.json: missing field(s) {', '.join(missing)}")
        eos = cfg.get("eos_token_id")
        eos_ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        rope_params = cfg.get("rope_parameters") or {}
        rope_theta = cfg.get("rope_theta", rope_params.get("rope_theta", 10000.0))
        rope_scaling = cfg.get("rope_scaling")
        if rope_scaling is None and rope_params.get("rope_type", "default") != "default":
            rope_scaling = dict(rope_params)
        return cls(
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_hidden_layers=cfg["num_hidden_layers"],
            num_attention_heads=cfg["num_attention_heads"],
            num_key_value_heads=cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
            head_dim=cfg.get("head_dim") or 0,
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-5)),
            rope_theta=float(rope_theta),
            rope_scaling=rope_scaling,
            max_position_embeddings=cfg.get("max_position_embeddings", 4096),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=bool(cfg.get("attention_bias", model_type == "qwen2")),
            architecture=archs[0] if archs else model_type,
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=eos_ids,
            layer_num_key_value_heads=cfg.get("layer_num_key_value_heads"),
            layer_intermediate_sizes=cfg.get("layer_intermediate_sizes"),
            output_bias=bool(cfg.get("output_bias", False)),
        )


@dataclass(frozen=True)
class EngineConfig:
    """What the engine needs to size batches and the KV cache.

    KV capacity is `num_kv_blocks` blocks of `block_size` tokens when given, else the
    fraction `kv_cache_memory_fraction` of the device memory left after loading weights
    (on CPU: of the RAM available), capped at what `max_num_seqs` full-length sequences need.
    `attention_backend` is one of ATTENTION_BACKENDS ("auto": Triton kernels on CUDA when
    triton imports, else the torch backend). `cuda_graphs` lets steps of single-token decodes
    replay CUDA graphs captured per batch-size bucket; it takes effect only where graphs apply
    (the triton backend on a CUDA device, see `thinfer.engine.decode_graphs`), and False
    turns them off. `fused_ops` runs the decoder's small ops (residual add + RMSNorm, RoPE,
    SiLU-multiply) through fused Triton kernels: "auto" exactly when the attention backend is
    triton, True always (where the kernels can run), False never (see `thinfer.models.fused`).
    `gemm_dataflow` is the path of a table measured by `thinfer bench gemm-dataflow` that
    picks cuBLAS, the flat GEMM or the GEMV per linear layer and batch size (see
    `thinfer.kernels.gemm_dataflow`); None runs cuBLAS everywhere. `deterministic` makes
    every request's output (token ids and logprobs, bitwise) independent of its batch mates,
    chunking and arrival order (batch-invariant kernels; see docs/determinism.md and
    `thinfer.engine.deterministic`); it replaces the attention backend, the fused ops and the
    dataflow table, so it cannot be combined with explicit ones. Frozen: an engine with
    other settings is a new engine (`thinfer.engine.factory.build_engine`).
    """

    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    block_size: int = 16
    num_kv_blocks: int | None = None
    kv_cache_memory_fraction: float = 0.5
    max_model_len: int | None = None
    seed: int = 0
    attention_backend: str = "auto"
    cuda_graphs: bool = True
    fused_ops: str | bool = "auto"
    gemm_dataflow: str | None = None
    deterministic: bool = False

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "block_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.num_kv_blocks is not None and (
            not isinstance(self.num_kv_blocks, int) or self.num_kv_blocks <= 0
        ):
            raise ValueError(
                f"num_kv_blocks must be a positive integer, got {self.num_kv_blocks!r}"
            )
        if not 0.0 < self.kv_cache_memory_fraction <= 1.0:
            raise ValueError(
                f"kv_cache_memory_fraction must be in (0, 1], got {self.kv_cache_memory_fraction!r}"
            )
        if self.max_model_len is not None and self.max_model_len <= 0:
            raise ValueError(f"max_model_len must be positive, got {self.max_model_len!r}")
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(
                f"attention_backend must be one of {', '.join(ATTENTION_BACKENDS)}, "
                f"got {self.attention_backend!r}"
            )
        if not isinstance(self.deterministic, bool):
            raise ValueError(f"deterministic must be True or False, got {self.deterministic!r}")
        if not isinstance(self.cuda_graphs, bool):
            raise ValueError(f"cuda_graphs must be True or False, got {self.cuda_graphs!r}")
        if not (isinstance(self.fused_ops, bool) or self.fused_ops == "auto"):
            raise ValueError(f"fused_ops must be 'auto', True or False, got {self.fused_ops!r}")
        if self.gemm_dataflow is not None and (
            not isinstance(self.gemm_dataflow, str) or not self.gemm_dataflow
        ):
            raise ValueError(
                f"gemm_dataflow must be the path of a table or None, got {self.gemm_dataflow!r}"
            )
