"""The models `thinfer bench prune-latency` compares: pruned shapes and how each engine gets one.

Shapes (`--preset`, dummy weights): the dense preset; "depth", the same with fewer decoder
blocks (Shortened LLaMA); "width", every block kept but narrowed uniformly (whole KV groups
of attention heads, MLP channels) to the depth variant's parameter count. The uniform width
shape stands in for FLAP's and LLM-Pruner's non-uniform per-layer shapes of the same size.

Models: thinfer gets a `LoadedModel` (a checkpoint it loads, or a config with dummy
weights); the HF transformers peer gets the same checkpoint (`from_pretrained` for an HF
directory, thinfer's own tensors for a GGUF file) or the same config with HF's random init.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import torch

from thinfer.bench.hf_peer import hf_config
from thinfer.bench.model_cost import linear_params_per_layer
from thinfer.config import ModelConfig

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from thinfer.engine.factory import LoadedModel


def layer_params(cfg: ModelConfig, layer: int | None = None) -> int:
    """Parameters of one decoder block (layer `layer`'s own width, None: the widest): its
    linears, q/k/v biases if any, o/down biases if any (FLAP), and two norms."""
    group = cfg.num_attention_heads // cfg.num_key_value_heads
    kv = cfg.num_key_value_heads if layer is None else cfg.layer_kv_heads(layer)
    qkv_bias = (kv * group + 2 * kv) * cfg.head_dim if cfg.attention_bias else 0
    output_bias = 2 * cfg.hidden_size if cfg.output_bias else 0
    return linear_params_per_layer(cfg, layer) + qkv_bias + output_bias + 2 * cfg.hidden_size


def param_count(cfg: ModelConfig) -> int:
    """Parameters of a model of shape `cfg`, tied embeddings counted once."""
    embeddings = cfg.vocab_size * cfg.hidden_size * (1 if cfg.tie_word_embeddings else 2)
    layers = sum(layer_params(cfg, i) for i in range(cfg.num_hidden_layers))
    return embeddings + layers + cfg.hidden_size


def shape(cfg: ModelConfig) -> dict[str, Any]:
    """The fields of `cfg` that pruning changes (and the hidden and vocab sizes)."""
    keys = ("num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads")
    keys += ("head_dim", "intermediate_size", "vocab_size")
    fields: dict[str, Any] = {key: getattr(cfg, key) for key in keys}
    for key in ("layer_num_key_value_heads", "layer_intermediate_sizes"):  # FLAP's widths
        if getattr(cfg, key) is not None:
            fields[key] = getattr(cfg, key)
    return fields


def default_remove_blocks(num_layers: int) -> int:
    """Blocks the depth variant removes: 9 of 32 (the paper's LLaMA-7B -> 4.9B), 11 of 40
    (Vicuna-13B), else round(0.28 L)."""
    return {32: 9, 40: 11}.get(num_layers, round(0.28 * num_layers))


def depth_config(cfg: ModelConfig, remove_blocks: int) -> ModelConfig:
    """`cfg` with `remove_blocks` fewer decoder blocks; ValueError unless 0 < it < L."""
    if not 0 < remove_blocks < cfg.num_hidden_layers:
        raise ValueError(
            f"--remove-blocks must be in 1..{cfg.num_hidden_layers - 1}, got {remove_blocks}"
        )
    return replace(cfg, num_hidden_layers=cfg.num_hidden_layers - remove_blocks)


def width_config(cfg: ModelConfig, remove_blocks: int) -> ModelConfig:
    """All blocks of `cfg`, narrowed uniformly so the model has the parameters of
    `depth_config(cfg, remove_blocks)`: every layer keeps round(kept share x KV groups) whole
    KV groups (each with its query heads; head_dim kept) and the MLP width that brings the
    layer to (L - remove_blocks) / L of its parameters."""
    depth = depth_config(cfg, remove_blocks)
    keep = depth.num_hidden_layers / cfg.num_hidden_layers
    group = cfg.num_attention_heads // cfg.num_key_value_heads
    kv = max(1, round(cfg.num_key_value_heads * keep))
    narrow = replace(cfg, num_key_value_heads=kv, num_attention_heads=kv * group)
    target = keep * layer_params(cfg)
    without_mlp = layer_params(replace(narrow, intermediate_size=1)) - 3 * cfg.hidden_size
    mlp = max(1, round((target - without_mlp) / (3 * cfg.hidden_size)))
    return replace(narrow, intermediate_size=mlp)


def preset_variants(cfg: ModelConfig, remove_blocks: int | None) -> dict[str, ModelConfig]:
    """dense, depth and width shapes of preset `cfg` (see the module doc)."""
    remove = (
        default_remove_blocks(cfg.num_hidden_layers) if remove_blocks is None else remove_blocks
    )
    return {
        "dense": cfg,
        "depth": depth_config(cfg, remove),
        "width": width_config(cfg, remove),
    }


def parse_models(specs: list[str]) -> dict[str, str | None]:
    """["dense=", "d8=/tmp/d8"] -> {"dense": None, "d8": "/tmp/d8"} (an empty path is the
    embedded default model); ValueError on a spec without a name or a repeated name."""
    models: dict[str, str | None] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or name in models:
            raise ValueError(f"--models: expected distinct NAME=PATH, got {spec!r}")
        models[name] = path or None
    return models


def dummy_loaded(
    cfg: ModelConfig, dtype: torch.dtype, device: torch.device, name: str, seed: int = 0
) -> LoadedModel:
    """A thinfer model of shape `cfg` with dummy weights, ready like `load_model`'s."""
    from thinfer.engine.factory import LoadedModel
    from thinfer.models import build_model
    from thinfer.models.linear import pack_linears

    net = build_model(cfg, dtype, device)
    net.init_dummy_weights(seed)
    net.eval()
    pack_linears(net)
    return LoadedModel(net, None, name)


def hf_from_config(cfg: ModelConfig, dtype: torch.dtype, device: torch.device) -> PreTrainedModel:
    """The HF transformers model of shape `cfg`, randomly initialized on `device`."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    with torch.device(device):  # drawn where it runs: a 7B CPU init takes minutes
        model: Any = AutoModelForCausalLM.from_config(hf_config(cfg), dtype=dtype)
    return model.to(device).eval()


def hf_from_checkpoint(
    path: str | None, dtype: torch.dtype, device: torch.device
) -> PreTrainedModel:
    """The HF transformers model of the checkpoint thinfer loads from `path` (None: the
    embedded default): `from_pretrained` for an HF directory of a uniform shape; for a GGUF
    file or a FLAP checkpoint (per-layer widths, which `from_pretrained` cannot build), the
    config's shape fitted to thinfer's own loaded tensors (`hf_model_from_checkpoint`)."""
    from transformers import AutoModelForCausalLM

    from thinfer.loading import load_checkpoint
    from thinfer.loading.hf_config import hf_model_from_checkpoint

    checkpoint = load_checkpoint(path)
    uniform = checkpoint.config.uniform_width and not checkpoint.config.output_bias
    if path is not None and os.path.isdir(path) and uniform:
        model: Any = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        return model.to(device).eval()
    return hf_model_from_checkpoint(checkpoint, dtype).to(device)


Builders = list[tuple[str, "Callable[[], LoadedModel]", "Callable[[], PreTrainedModel]"]]


def builders(
    preset: str | None,
    remove_blocks: int | None,
    models: list[str] | None,
    dtype: torch.dtype,
    device: torch.device,
    seed: int = 0,
) -> Builders:
    """(name, thinfer model builder, HF model builder) per variant: the `preset_variants` of
    `preset` with dummy weights, else the checkpoints of `models` (`parse_models`)."""
    if preset is not None:
        from thinfer.loading.dummy import preset_config

        def pair(
            name: str, cfg: ModelConfig
        ) -> tuple[Callable[[], LoadedModel], Callable[[], PreTrainedModel]]:
            return (
                lambda: dummy_loaded(cfg, dtype, device, f"{preset}:{name}", seed),
                lambda: hf_from_config(cfg, dtype, device),
            )

        shapes = preset_variants(preset_config(preset), remove_blocks)
        return [(name, *pair(name, cfg)) for name, cfg in shapes.items()]
    if remove_blocks is not None:
        raise ValueError("--remove-blocks applies to --preset variants only")
    from thinfer.engine.factory import load_model

    def checkpoint(
        path: str | None,
    ) -> tuple[Callable[[], LoadedModel], Callable[[], PreTrainedModel]]:
        return (
            lambda: load_model(path, dtype=dtype, device=device),
            lambda: hf_from_checkpoint(path, dtype, device),
        )

    return [(name, *checkpoint(path)) for name, path in parse_models(models or []).items()]
