"""The Triton decode kernel's launch settings swept at one context length: chunk size
(`split_tokens`) and warps per program, each timed like `bench decode-attention`'s kernel, so
the defaults (`DECODE_SPLIT_TOKENS`, `DECODE_NUM_WARPS`) come from measurements."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch

from thinfer.bench.bandwidth import device_timings, graphed


def sweep_launch_settings(
    inputs: dict[str, torch.Tensor],
    scale: float,
    split_tokens: list[int],
    num_warps: list[int],
    num_bytes: int,
    timing: tuple[int, int, Callable[[], object] | None],
) -> list[dict[str, Any]]:
    """TB/s of `paged_decode_attention` on `inputs` (see `decode_inputs`) for every
    (split_tokens, num_warps); `timing` is (iters, warmup, the untimed call before each)."""
    from thinfer.kernels.decode_attention import paged_decode_attention

    iters, warmup, before = timing
    device = inputs["q"].device
    cache = (inputs["q"], inputs["k_cache"], inputs["v_cache"], inputs["block_tables"])
    rows = []
    for split in split_tokens:
        for warps in num_warps:
            run = functools.partial(
                paged_decode_attention,
                *cache,
                inputs["context_lens"],
                scale,
                split_tokens=split,
                num_warps=warps,
            )
            seconds = sorted(device_timings(graphed(run, device), device, iters, warmup, before))
            median = seconds[len(seconds) // 2]
            rows.append(
                {
                    "split_tokens": split,
                    "num_warps": warps,
                    "median_seconds": median,
                    "tb_per_s": num_bytes / median / 1e12,
                }
            )
    return rows


def best_setting(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The fastest row of a sweep (None for an empty sweep)."""
    return max(rows, key=lambda row: row["tb_per_s"], default=None)
