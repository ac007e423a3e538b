"""Where a batch-1 decode step's time goes: wall time per token against the GPU kernels'
time per token (torch.profiler), with and without CUDA graphs and in the deterministic mode,
the kernels that take it and the host-side ops (launches, copies, synchronizations).

The gap between wall and kernel time is host overhead (scheduling, sampling, launches); the
kernel table shows whether the weight GEMVs run near the copy bandwidth. A stage of
`thinfer bench gpu-check` (`python -m thinfer.bench.gpu_probe profile`).
"""

from __future__ import annotations

import time
from typing import Any

import torch

TOP_KERNELS = 20


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _kernel_table(prof: Any, tokens: int) -> tuple[float, list[dict[str, Any]]]:
    """(kernel microseconds per token, the top kernels by time) from a finished profile."""
    rows = []
    for event in prof.key_averages():
        micros = getattr(event, "self_device_time_total", 0.0)
        if micros > 0:
            rows.append({"kernel": event.key[:120], "us": micros, "count": event.count})
    total = sum(row["us"] for row in rows)
    rows.sort(key=lambda row: row["us"], reverse=True)
    top = [
        {
            "kernel": row["kernel"],
            "us_per_token": row["us"] / tokens,
            "calls_per_token": row["count"] / tokens,
            "share": row["us"] / total if total else 0.0,
        }
        for row in rows[:TOP_KERNELS]
    ]
    return total / tokens, top


def _host_table(prof: Any, tokens: int) -> list[dict[str, Any]]:
    """The host-side events (torch ops, CUDA runtime calls such as launches, copies and
    synchronizations) with the most self CPU time, per token."""
    rows = [
        {
            "op": event.key[:120],
            "self_cpu_us_per_token": event.self_cpu_time_total / tokens,
            "calls_per_token": event.count / tokens,
        }
        for event in prof.key_averages()
        if event.self_cpu_time_total > 0
    ]
    rows.sort(key=lambda row: row["self_cpu_us_per_token"], reverse=True)
    return rows[:TOP_KERNELS]


def profile_decode(llm: Any, prompt: list[int], steps: int) -> dict[str, Any]:
    """Batch-1 greedy decode of `steps` tokens: wall ms per token (unprofiled), kernel ms per
    token and the top kernels (profiled run)."""
    from thinfer import SamplingParams

    device = next(llm.engine.model.parameters()).device
    params = SamplingParams(max_tokens=steps, temperature=0.0, ignore_eos=True)
    llm.generate([prompt], params)  # warm-up: compiles kernels, captures graphs
    _sync(device)
    start = time.perf_counter()
    llm.generate([prompt], params)
    _sync(device)
    wall = time.perf_counter() - start
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        llm.generate([prompt], params)
        _sync(device)
    kernel_us, top = _kernel_table(prof, steps)
    return {
        "host_ops": _host_table(prof, steps),
        "steps": steps,
        "wall_ms_per_token": 1e3 * wall / steps,
        "kernel_ms_per_token": kernel_us / 1e3,
        "kernel_share_of_wall": (kernel_us / 1e3) / (1e3 * wall / steps) if wall else None,
        "top_kernels": top,
    }
