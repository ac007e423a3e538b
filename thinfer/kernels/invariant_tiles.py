"""Tile plans for the batch-invariant matmul: tiles that change with M, proven to change no bit.

`thinfer.kernels.invariant_matmul` is batch-invariant with one fixed tile shape per weight
shape, but no one tile shape is fast at every M: a decode step (M = 1-64) is bound by reading
the weights and wants many narrow programs, a prefill chunk (M = 512-8192) is bound by the
tensor cores and wants wide tiles that reuse what they read. Tiles may change with M only if
each output keeps its bits, and that depends on the GPU's instructions for each tile shape
(see the kernel's docstring), so `tune_tiles` measures it for one weight shape:

1. every candidate in `CANDIDATES` runs on the same operands (`PROBE_ROWS` random rows, not a
   multiple of any tile height, so edge tiles are masked), and on their first row alone; a
   candidate whose first row differs between the two calls is dropped (not row-invariant),
   one that does not compile or launch (too much shared memory) is dropped;
2. the others fall into classes of bitwise-identical outputs (`torch.equal` on every one of
   the PROBE_ROWS x N outputs); only tiles of one class may be mixed;
3. every candidate is timed at each M of `BUCKETS`; the class with the least total time (a
   sum of log times over the buckets: each M counts alike) wins, and each bucket takes that
   class's fastest tiles.

The plan is registered for the weight's shape, dtype and device (`register_plan`), so every
later call of that shape uses it. The engine's deterministic mode tunes each linear shape
once per process on CUDA (`thinfer.models.linear.set_batch_invariant`); `thinfer bench
matmul` reports the classes and the plan beside the fixed tiles and cuBLAS.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence

import torch

from thinfer.kernels.invariant_matmul import (
    Tiles,
    invariant_config,
    invariant_linear,
    register_plan,
)

PROBE_ROWS = 200
# Largest M of each bucket; a call with more rows than the last takes the last bucket's tiles.
BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
# Narrow 16-row tiles with deep K steps for decode (the weights' bandwidth: many programs
# for a small N), mid-size ones for M of a few hundred (enough programs without split-K),
# the wide tiles of Triton's Hopper matmul tutorial for prefill. On an H200 all of them sum
# every output bitwise alike (bench/results/matmul_cuda.json, "classes").
CANDIDATES = (
    Tiles(16, 16, 128, 2, 4),
    Tiles(16, 32, 128, 4, 4),
    Tiles(16, 32, 256, 4, 3),
    Tiles(16, 64, 128, 4, 4),
    Tiles(16, 64, 64, 4, 5),
    Tiles(16, 128, 64, 4, 4),
    Tiles(32, 32, 128, 4, 4),
    Tiles(32, 64, 64, 4, 4),
    Tiles(64, 32, 128, 4, 4),
    Tiles(64, 64, 64, 4, 3),
    Tiles(64, 128, 64, 4, 4),
    Tiles(64, 256, 64, 8, 3),
    Tiles(128, 64, 64, 4, 4),
    Tiles(128, 128, 64, 4, 4),
    Tiles(128, 128, 64, 8, 3),
    Tiles(128, 128, 128, 8, 3),
    Tiles(128, 256, 64, 8, 3),
    Tiles(128, 256, 64, 8, 4),
    Tiles(256, 128, 64, 8, 3),
)
_L2_FLUSH_BYTES = 256 << 20  # written between timed calls: more than any GPU's L2


@dataclasses.dataclass(frozen=True)
class TilePlan:
    """The outcome of `tune_tiles` for one weight shape: the chosen tiles per M bucket, every
    candidate's class (None: dropped, with the reason in `dropped`) and its seconds per
    bucket."""

    n: int
    k: int
    buckets: tuple[int, ...]
    plan: tuple[tuple[int, Tiles], ...]
    classes: dict[str, int | None]
    dropped: dict[str, str]
    seconds: dict[str, list[float]]

    def as_dict(self) -> dict:
        """JSON-ready: tiles as labels."""
        return {
            "n": self.n,
            "k": self.k,
            "plan": [{"max_m": top, "tiles": tiles.label()} for top, tiles in self.plan],
            "classes": self.classes,
            "dropped": self.dropped,
            "seconds": self.seconds,
            "buckets": list(self.buckets),
        }


def _time_call(call: Callable[[], torch.Tensor], device: torch.device, repeats: int) -> float:
    """Median seconds of `repeats` calls (after one untimed), the L2 cleared before each on
    CUDA; perf_counter elsewhere."""
    call()
    times = []
    flush = None
    if device.type == "cuda":
        flush = torch.empty(_L2_FLUSH_BYTES, dtype=torch.uint8, device=device)
    for _ in range(repeats):
        if flush is not None:
            flush.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            call()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            began = time.perf_counter()
            call()
            times.append(time.perf_counter() - began)
    return sorted(times)[len(times) // 2]


def _classify(
    weight: torch.Tensor, probe: torch.Tensor, candidates: Sequence[Tiles]
) -> tuple[dict[Tiles, int], dict[str, str]]:
    """Each candidate's class of bitwise-identical outputs on `probe`, and the dropped ones
    with why."""
    representatives: list[torch.Tensor] = []
    classes: dict[Tiles, int] = {}
    dropped: dict[str, str] = {}
    for tiles in candidates:
        try:
            full = invariant_linear(probe, weight, tiles=tiles)
            first = invariant_linear(probe[:1], weight, tiles=tiles)
        except Exception as exc:  # noqa: BLE001 - Triton's compile and resource errors vary
            dropped[tiles.label()] = f"{type(exc).__name__}: {str(exc)[:200]}"
            continue
        if not torch.equal(first, full[:1]):
            dropped[tiles.label()] = "row 0 changed between M=1 and M=PROBE_ROWS"
            continue
        same = next((i for i, rep in enumerate(representatives) if torch.equal(rep, full)), None)
        if same is None:
            representatives.append(full)
            same = len(representatives) - 1
        classes[tiles] = same
    return classes, dropped


def tune_tiles(
    weight: torch.Tensor,
    candidates: Sequence[Tiles] | None = None,
    buckets: Sequence[int] | None = None,
    repeats: int = 5,
    register: bool = True,
) -> TilePlan:
    """Verify, time and choose tiles per M bucket for `weight` [N, K] (see the module
    docstring; None: `CANDIDATES`, `BUCKETS`); register the plan for its shape unless
    `register` is False. Where no candidate survives, the plan is the default tiles for
    every M."""
    candidates = CANDIDATES if candidates is None else candidates
    buckets = BUCKETS if buckets is None else buckets
    if not buckets or list(buckets) != sorted(set(buckets)) or buckets[0] < 1:
        raise ValueError(f"buckets must be increasing positive M values, got {buckets}")
    n, k = weight.shape
    gen = torch.Generator(device=weight.device).manual_seed(n * 7919 + k)
    rows = max(PROBE_ROWS, buckets[-1])
    x = torch.randn(rows, k, generator=gen, device=weight.device).to(weight.dtype)
    classes, dropped = _classify(weight, x[:PROBE_ROWS], candidates)
    seconds = {
        tiles: [
            _time_call(
                lambda t=tiles, m=m: invariant_linear(x[:m], weight, tiles=t), x.device, repeats
            )
            for m in buckets
        ]
        for tiles in classes
    }
    plan = _choose(classes, seconds, buckets) or (
        (buckets[-1], invariant_config(n, k, weight.dtype)),
    )
    if register:
        register_plan(weight, plan)
    return TilePlan(
        n=n,
        k=k,
        buckets=tuple(buckets),
        plan=plan,
        classes={t.label(): classes.get(t) for t in candidates},
        dropped=dropped,
        seconds={t.label(): s for t, s in seconds.items()},
    )


def _choose(
    classes: dict[Tiles, int], seconds: dict[Tiles, list[float]], buckets: Sequence[int]
) -> tuple[tuple[int, Tiles], ...]:
    """The fastest class overall (least sum of log best-seconds per bucket), and in it the
    fastest tiles per bucket; neighbouring buckets with the same tiles merged."""
    best_total, best_plan = math.inf, ()
    for label in set(classes.values()):
        members = [t for t, c in classes.items() if c == label]
        picks = [min(members, key=lambda t, i=i: seconds[t][i]) for i in range(len(buckets))]
        total = sum(math.log(max(seconds[t][i], 1e-12)) for i, t in enumerate(picks))
        if total < best_total:
            best_total = total
            plan: list[tuple[int, Tiles]] = []
            for top, tiles in zip(buckets, picks):
                if plan and plan[-1][1] == tiles:
                    plan[-1] = (top, tiles)
                else:
                    plan.append((top, tiles))
            best_plan = tuple(plan)
    return best_plan
