"""Read a llama.cpp GGUF file: config, dequantized tensors under HF names, tokenizer.

Tensors are dequantized to float32 with `gguf.quants.dequantize`. llama.cpp's converter permutes
the rows of the llama architecture's Q and K projections for its interleaved RoPE; they are put
back in HF order here, so the model applies HF's rotate-half RoPE to them (qwen2 files are not
permuted).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType
from gguf.quants import dequantize

from thinfer.config import ModelConfig
from thinfer.loading.gguf_config import gguf_model_config

_TOP_LEVEL = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_BLOCK = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_BLOCK_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
# Tensors that carry no weights of their own; `rope_freqs` is folded into the config.
_SKIPPED = {"rope_freqs.weight"}


class _FastGGUFReader(GGUFReader):
    """GGUFReader over a plain ndarray view of its memory map.

    GGUFReader slices its `np.memmap` once per metadata item (~250k times for a 49k-token
    vocabulary), and each memmap slice pays for `__array_finalize__`; the same slices of a
    plain view of the map cost a third of the time. The view keeps the map alive.
    """

    @property
    def data(self) -> np.ndarray:
        return self._plain_data

    @data.setter
    def data(self, value: np.ndarray) -> None:
        self._plain_data = value.view(np.ndarray)


class GGUFFile:
    """An opened GGUF: `config`, `tensors()` (HF names, float32 CPU) and its tokenizer source.

    Raises ValueError naming the file when it is truncated, corrupt, or of an unsupported kind.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        try:
            self._reader = _FastGGUFReader(path)
        except Exception as exc:  # GGUFReader raises ValueError, IndexError, KeyError, ...
            raise ValueError(
                f"{path}: not a readable GGUF file (truncated or corrupt?): {exc}"
            ) from exc
        self._check_tensor_extents()
        self.metadata = _metadata(self._reader)
        names = {t.name for t in self._reader.tensors}
        rope_freqs = next(
            (
                np.array(t.data, dtype=np.float32)
                for t in self._reader.tensors
                if t.name == "rope_freqs.weight"
            ),
            None,
        )
        self.config: ModelConfig = gguf_model_config(path, self.metadata, names, rope_freqs)
        self._permuted = self.metadata["general.architecture"] == "llama"
        # Map every name now, so an unexpected tensor fails at load time, not mid-iteration.
        self._hf_names = {n: hf_tensor_name(path, n) for n in names if n not in _SKIPPED}

    @property
    def has_tokenizer(self) -> bool:
        """Whether the metadata holds a vocabulary to build a tokenizer from."""
        return "tokenizer.ggml.tokens" in self.metadata

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield `(hf_name, float32 tensor)` for every weight, dequantizing one at a time."""
        heads = {
            ".attn_q.": self.config.num_attention_heads,
            ".attn_k.": self.config.num_key_value_heads,
        }
        for t in self._reader.tensors:
            if t.name in _SKIPPED:
                continue
            name = self._hf_names[t.name]
            shape = tuple(reversed([int(d) for d in t.shape]))
            try:
                array = dequantize(t.data, t.tensor_type).reshape(shape)
            except (NotImplementedError, ValueError) as exc:
                raise ValueError(
                    f"{self.path}: cannot dequantize tensor {t.name!r} "
                    f"({GGMLQuantizationType(t.tensor_type).name}): {exc}"
                ) from exc
            n_head = next((n for key, n in heads.items() if key in t.name), 0)
            if self._permuted and n_head:
                array = unpermute_rows(array, n_head)
            if array.dtype != np.float32 or not array.flags.writeable:
                array = array.astype(np.float32)  # copies: F32 data is a read-only view of the map
            yield name, torch.from_numpy(np.ascontiguousarray(array))

    def _check_tensor_extents(self) -> None:
        size = os.path.getsize(self.path)
        for t in self._reader.tensors:
            if t.data_offset + t.n_bytes > size:
                raise ValueError(
                    f"{self.path}: truncated GGUF file: tensor {t.name!r} needs bytes up to "
                    f"{t.data_offset + t.n_bytes}, the file has {size}"
                )


def hf_tensor_name(path: str, gguf_name: str) -> str:
    """HF Llama name of GGUF tensor `gguf_name` (e.g. blk.3.attn_q.weight ->
    model.layers.3.self_attn.q_proj.weight)."""
    base, _, suffix = gguf_name.rpartition(".")
    if base in _TOP_LEVEL and suffix == "weight":
        return f"{_TOP_LEVEL[base]}.weight"
    match = _BLOCK_RE.fullmatch(gguf_name)
    if match and match.group(2) in _BLOCK:
        layer, part, kind = match.groups()
        return f"model.layers.{layer}.{_BLOCK[part]}.{kind}"
    raise ValueError(f"{path}: unexpected tensor {gguf_name!r} for a Llama-family model")


def unpermute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation (`convert_hf_to_gguf.py`, `LlamaModel.permute`).

    llama.cpp stores each head's rows interleaved as pairs (x0, x_{d/2}), (x1, x_{d/2+1}), ...
    for its adjacent-pair RoPE; HF keeps the two halves of a head apart (rotate-half RoPE).
    Works for weights [rows, cols] and biases [rows].
    """
    rows = w.shape[0]
    half = rows // n_head // 2
    return w.reshape(n_head, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _metadata(reader: GGUFReader) -> dict[str, Any]:
    """Key -> value of every metadata field; array fields are given as their length only.

    float32 values are given as the shortest decimal that rounds to them (1e-05, not
    9.999999747378752e-06): the value the converter was given, as a HF config.json holds it.
    """
    out: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if not field.types:
            continue
        if field.types[0] == GGUFValueType.ARRAY:
            out[key] = len(field.data)
        elif field.types[0] == GGUFValueType.FLOAT32:
            out[key] = float(str(np.float32(field.contents())))
        else:
            out[key] = field.contents()
    return out
