"""Test helpers: run the compression selection (schedule + scores + keep rule) on a hand-made
slot state whose slots are in token order, and return the kept slot indices; every built-in
method x schedule x scoring mode as request configs (`combos`, `config_for`)."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import torch

from thinfer.compression import METHODS, CompressionConfig
from thinfer.compression.config import needs_predictor
from thinfer.compression.method import method_class
from thinfer.compression.selection import SequenceView, select_slots
from thinfer.compression.slot_state import SlotState
from thinfer.dynts import ImportancePredictor, save_predictor

MAX_TOKENS = 40  # enough for every method to evict at BUDGET with the test prompts
BUDGET = 24


def combos() -> list[tuple[str, str, str]]:
    """Every built-in method (but the full cache) x schedule x the scoring modes it has."""
    method_class("full")  # registers the built-ins
    found = []
    for name, cls in METHODS.items():
        if name == "full":
            continue
        scorings = ("per_head", "shared") if cls.per_head else ("shared",)
        found += [(name, t, s) for t, s in itertools.product(("native", "uniform"), scorings)]
    return found


def write_random_predictor(directory: Path, llm: Any) -> str:
    """A DynTS head with random weights (seed 0) for `llm`'s model, saved in `directory`."""
    torch.manual_seed(0)
    path = directory / "head.safetensors"
    save_predictor(ImportancePredictor(llm.model_config.hidden_size), str(path))
    return str(path)


def config_for(method: str, trigger: str, scoring: str, predictor: str) -> dict:
    config = {"method": method, "budget": BUDGET, "trigger": trigger, "scoring": scoring}
    config["window"] = 6 if trigger == "uniform" or method in ("h2o", "sepllm") else None
    if method in ("snapkv", "rkv"):
        config.update(interval=8, observation_window=4)
    if needs_predictor(method):
        config.update(predictor=predictor, think_end_token_ids=[13])  # "." ends thinking
    return config


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
