"""The cached DynTS training features: one `torch.save` file written by `thinfer dynts label`.

Layout (plain dicts, lists, tensors, strings and numbers, so `torch.load(weights_only=True)`
reads it):

    {"format": "thinfer-dynts-features", "version": 1,
     "model": str, "hidden_size": int, "num_layers": int, "num_heads": int,
     "think_end_token_ids": [int], "skipped": {reason: count},
     "traces": [{"id": str, "prompt_len": int, "answer_start": int,
                 "hidden": [T, hidden] float, "labels": [T] float32,
                 "thinking_mask": [T] bool}, ...]}

`labels` are the raw mean attention probabilities (before any training-time rescale);
`thinking_mask` marks the positions the loss uses: after the prompt and before the
think-end marker (the marker and the answer are never scored by the engine).
"""

from __future__ import annotations

import os
import pickle
from typing import Any

import torch

FORMAT = "thinfer-dynts-features"
VERSION = 1


def thinking_mask(total: int, prompt_len: int, answer_start: int, marker_len: int) -> torch.Tensor:
    """[total] bool: True at thinking positions prompt_len <= p < answer_start - marker_len."""
    positions = torch.arange(total)
    return (positions >= prompt_len) & (positions < answer_start - marker_len)


def save_features(path: str, features: dict[str, Any]) -> None:
    """Write a features dict (see the module docstring) after checking it."""
    check_features(features, path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    torch.save(features, path)


def load_features(path: str) -> dict[str, Any]:
    """Read and check a features file; ValueError says what is wrong with it."""
    if not os.path.isfile(path):
        raise ValueError(f"features file does not exist: {path}")
    try:
        features = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{path}: not a readable features file ({first})") from e
    check_features(features, path)
    return features


def check_features(features: object, where: str) -> None:
    """ValueError unless `features` has the documented layout."""
    if not isinstance(features, dict) or features.get("format") != FORMAT:
        raise ValueError(f"{where}: not a DynTS features file (written by `thinfer dynts label`)")
    if features.get("version") != VERSION:
        raise ValueError(f"{where}: features version {features.get('version')}, need {VERSION}")
    hidden_size = features.get("hidden_size")
    if not isinstance(hidden_size, int) or hidden_size < 2:
        raise ValueError(f"{where}: hidden_size must be an integer >= 2")
    traces = features.get("traces")
    if not isinstance(traces, list):
        raise ValueError(f"{where}: 'traces' must be a list")
    for number, trace in enumerate(traces):
        _check_trace(trace, hidden_size, f"{where}: trace {number}")


def _check_trace(trace: object, hidden_size: int, where: str) -> None:
    if not isinstance(trace, dict):
        raise ValueError(f"{where}: expected a dict")
    for key in ("hidden", "labels", "thinking_mask"):
        if not isinstance(trace.get(key), torch.Tensor):
            raise ValueError(f"{where}: missing tensor {key!r}")
    hidden, labels, mask = trace["hidden"], trace["labels"], trace["thinking_mask"]
    if hidden.dim() != 2 or hidden.shape[1] != hidden_size or not hidden.is_floating_point():
        raise ValueError(
            f"{where}: hidden must be a float [tokens, {hidden_size}] tensor, "
            f"got {hidden.dtype} {tuple(hidden.shape)}"
        )
    tokens = hidden.shape[0]
    if labels.shape != (tokens,) or not labels.is_floating_point():
        raise ValueError(f"{where}: labels must be a float [{tokens}] tensor")
    if mask.shape != (tokens,) or mask.dtype != torch.bool:
        raise ValueError(f"{where}: thinking_mask must be a bool [{tokens}] tensor")
    if not torch.isfinite(labels).all() or not torch.isfinite(hidden).all():
        raise ValueError(f"{where}: hidden states and labels must be finite")
