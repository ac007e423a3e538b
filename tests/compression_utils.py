"""Test helper: run the compression selection (schedule + scores + keep rule) on a hand-made
slot state whose slots are in token order, and return the kept slot indices."""

from __future__ import annotations

from typing import Any

import torch

from thinfer.compression import CompressionConfig
from thinfer.compression.selection import SequenceView, select_slots
from thinfer.compression.slot_state import SlotState


def make_state(
    config: CompressionConfig,
    kv_len: int,
    layers: int = 1,
    kv_heads: int = 1,
    values: dict[str, torch.Tensor] | None = None,
    protected: torch.Tensor | None = None,
) -> SlotState:
    """Slots 0..kv_len-1 holding tokens 0..kv_len-1, with the given per-slot values."""
    prefix = (layers, kv_heads) if config.per_head else ()
    state = SlotState(prefix, config.params.slot_values, torch.device("cpu"))
    flags = protected if protected is not None else torch.zeros(kv_len, dtype=torch.bool)
    state.append(torch.arange(kv_len), flags)
    for name, value in (values or {}).items():
        state.value(name).copy_(value)
    return state


def select(
    config: CompressionConfig,
    kv_len: int,
    generated: int = 0,
    state: SlotState | None = None,
    tokens: list[int] | None = None,
    keys: torch.Tensor | None = None,
    queries: torch.Tensor | None = None,
    resources: Any = None,
    prompt_len: int | None = None,
) -> torch.Tensor | None:
    """Kept slot indices, ascending ([n] or [layers, kv_heads, n]); None while waiting.

    keys [layers, kv_len, kv_heads, D]; queries [layers, w, heads, D].
    """
    state = state if state is not None else make_state(config, kv_len)
    all_tokens = tokens if tokens is not None else [1] * kv_len
    view = SequenceView(
        kv_len,
        generated,
        prompt_len if prompt_len is not None else kv_len - generated,
        lambda: all_tokens,
    )
    chosen = select_slots(
        config,
        state,
        view,
        resources=resources,
        layer_keys=(lambda layer: keys[layer]) if keys is not None else None,
        queries=queries,
        num_layers=keys.shape[0] if keys is not None else 0,
    )
    if chosen is None:
        return None
    mask, count = chosen
    slots = torch.arange(kv_len).expand_as(mask)
    return slots[mask].view(*mask.shape[:-1], count)
