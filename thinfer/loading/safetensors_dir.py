"""Read a HF checkpoint directory: `config.json`, `*.safetensors` shards, tokenizer files.

Every shard's header is checked when the directory is opened (cheap: a few KB per file), so a
truncated or corrupt file fails at load time with its name, not half-way through the weights.
Tensors are then read lazily, one at a time, in the file's own dtype.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from thinfer.config import ModelConfig
from thinfer.loading.tokenizer import TOKENIZER_FILES

INDEX_FILE = "model.safetensors.index.json"
# Buffers some checkpoints save that are not weights (the model recomputes them).
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq", "rotary_emb.cos_cached", "rotary_emb.sin_cached")


def read_json(path: str) -> dict[str, Any]:
    """Parse JSON object file `path`; ValueError naming the file if it is not one."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: invalid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def hf_dir_config(directory: str) -> ModelConfig:
    """`ModelConfig` of HF directory `directory`, eos ids of `generation_config.json` merged in."""
    config_path = os.path.join(directory, "config.json")
    if not os.path.isfile(config_path):
        raise ValueError(f"{directory}: no config.json in the model directory")
    try:
        config = ModelConfig.from_hf_dict(read_json(config_path))
    except ValueError as exc:
        message = str(exc)
        if message.startswith(config_path):
            raise
        raise ValueError(f"{config_path}: {message.removeprefix('config.json: ')}") from None
    gen_path = os.path.join(directory, "generation_config.json")
    if os.path.isfile(gen_path):
        eos = read_json(gen_path).get("eos_token_id")
        extra = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        config.eos_token_ids = list(dict.fromkeys(config.eos_token_ids + extra))
    return config


def has_tokenizer(directory: str) -> bool:
    """Whether HF tokenizer files are present in `directory`."""
    return any(os.path.isfile(os.path.join(directory, n)) for n in TOKENIZER_FILES)


def safetensors_files(directory: str) -> list[str]:
    """Paths of the directory's weight files: the shards its index names, else `*.safetensors`."""
    index_path = os.path.join(directory, INDEX_FILE)
    if os.path.isfile(index_path):
        weight_map = read_json(index_path).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index_path}: no 'weight_map' object")
        names = sorted(set(weight_map.values()))
        missing = [n for n in names if not os.path.isfile(os.path.join(directory, n))]
        if missing:
            raise ValueError(f"{index_path}: shard(s) missing from the directory: {missing}")
    else:
        names = sorted(n for n in os.listdir(directory) if n.endswith(".safetensors"))
        if not names:
            raise ValueError(f"{directory}: no *.safetensors files in the model directory")
    return [os.path.join(directory, n) for n in names]


def check_safetensors_header(path: str) -> list[str]:
    """Validate the header of safetensors file `path` against its size; return tensor names."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise ValueError(f"{path}: truncated safetensors file ({size} bytes, no header)")
        (header_len,) = struct.unpack("<Q", prefix)
        if 8 + header_len > size:
            raise ValueError(
                f"{path}: truncated safetensors file: header claims {header_len} bytes, "
                f"the file has {size}"
            )
        try:
            header = json.loads(f.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"{path}: corrupt safetensors header: {exc}") from exc
    if not isinstance(header, dict):
        raise ValueError(f"{path}: corrupt safetensors header (not a JSON object)")
    names = [k for k in header if k != "__metadata__"]
    try:
        end = max((int(header[k]["data_offsets"][1]) for k in names), default=0)
    except (KeyError, IndexError, TypeError, ValueError) as exc:
        raise ValueError(f"{path}: corrupt safetensors header: bad data_offsets ({exc})") from exc
    if 8 + header_len + end > size:
        raise ValueError(
            f"{path}: truncated safetensors file: tensors need {8 + header_len + end} bytes, "
            f"the file has {size}"
        )
    return names


class SafetensorsDir:
    """An opened HF directory: its `config` and its weights (`tensors()`)."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.config = hf_dir_config(directory)
        self.files = safetensors_files(directory)
        for path in self.files:
            check_safetensors_header(path)

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield `(hf_name, CPU tensor)` lazily, file by file, in the files' dtypes.

        `lm_head.weight` is left out when the config ties it to the embeddings (as HF does).
        """
        tied = self.config.tie_word_embeddings
        for path in self.files:
            try:
                with safe_open(path, framework="pt", device="cpu") as f:
                    for name in f.keys():
                        if name.endswith(_IGNORED_SUFFIXES) or (tied and name == "lm_head.weight"):
                            continue
                        yield name, f.get_tensor(name)
            except (SafetensorError, OSError) as exc:
                raise ValueError(f"{path}: cannot read safetensors file: {exc}") from exc
