"""`thinfer bench bandwidth`: batch-1 decode speed against the memory-bandwidth bound.

A decode step at batch 1 reads every weight once plus the KV cache of the context, so its
speed is bounded by memory bandwidth. This benchmark measures the device's copy bandwidth
(read + write bytes of a large tensor copy / time: the attainable bandwidth, 3.0 TB/s on an
H100 SXM), then decodes `--output-len` tokens after a `--input-len`-token prompt at batch 1
(prefill excluded, see `thinfer.bench.decode_timing`) and reports:

- bytes per step = all weights (`model_cost.weight_bytes`) + the K and V of the context the
  step attends (input_len + k slots at decode step k), averaged over the decode steps;
- achieved bandwidth = bytes of all decode steps / their time;
- MBU (model bandwidth utilization) = achieved / copy bandwidth;
- bound tokens/s = copy bandwidth / mean bytes per step (so tokens/s / bound = MBU);
- HF transformers `generate` on the same prompt as the peer (tokens/s, MBU, thinfer / HF).
"""

from __future__ import annotations

import argparse
import functools
from collections.abc import Callable
from typing import Any

import torch
from matplotlib.figure import Figure

from thinfer.bench.decode_timing import (
    DecodeTiming,
    DeviceClock,
    build_bench_llm,
    free_device_memory,
    synthetic_prompts,
    time_hf,
    time_thinfer,
)
from thinfer.bench.hf_peer import llm_device, llm_dtype, load_hf_peer
from thinfer.bench.model_cost import weight_bytes
from thinfer.bench.report import model_short_name, write_result
from thinfer.config import ModelConfig

COPY_WARMUP = 2


def device_timings(
    fn: Callable[[], object],
    device: torch.device,
    repeats: int,
    warmup: int = COPY_WARMUP,
    before: Callable[[], object] | None = None,
) -> list[float]:
    """Seconds of each of `repeats` calls of `fn` after `warmup` untimed ones.

    `before` (e.g. an L2 flush) runs untimed before each timed call. CUDA events time each
    call on the device; on CPU, `perf_counter`.
    """
    for _ in range(warmup):
        fn()
    seconds = []
    for _ in range(repeats):
        if before is not None:
            before()
        clock = DeviceClock(device)
        clock.mark()
        fn()
        clock.mark()
        seconds.append(clock.seconds(0, 1))
    return seconds


def graphed(fn: Callable[[], object], device: torch.device) -> Callable[[], object]:
    """On CUDA, `fn` captured once in a CUDA graph, returned as the graph's replay: timings of
    it see the kernels alone, not the host's launch overhead (the engine's decode steps are
    graph replays too). Elsewhere `fn` itself."""
    if device.type != "cuda":
        return fn
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        fn()  # warm-up off the capture: compiles kernels, settles the allocator
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def copy_bandwidth(device: torch.device, num_bytes: int, repeats: int) -> dict[str, float]:
    """Read + write bandwidth of copying a `num_bytes` tensor: best and median, in GB/s."""
    src = torch.ones(num_bytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    moved = 2 * src.numel() * src.element_size()
    seconds = sorted(device_timings(functools.partial(dst.copy_, src), device, repeats))
    del src, dst  # before the engine needs the memory
    free_device_memory(device)
    median = seconds[len(seconds) // 2]
    return {
        "bytes_copied": moved // 2,
        "repeats": repeats,
        "best_seconds": seconds[0],
        "median_seconds": median,
        "gb_per_s": moved / seconds[0] / 1e9,
        "median_gb_per_s": moved / median / 1e9,
    }


def decode_bytes(cfg: ModelConfig, dtype: torch.dtype, input_len: int, steps: int) -> int:
    """Bytes read by `steps` batch-1 decode steps after an `input_len`-token prefill: all
    weights each step, plus the KV of the input_len + k slots decode step k attends."""
    kv_per_token = cfg.kv_elements_per_token * dtype.itemsize
    slots = steps * input_len + steps * (steps + 1) // 2
    return steps * weight_bytes(cfg, dtype) + slots * kv_per_token


def _engine_entry(timing: DecodeTiming, total_bytes: int, copy_gb_s: float) -> dict[str, Any]:
    achieved = total_bytes / timing.decode_seconds / 1e9
    return timing.as_dict() | {"achieved_gb_per_s": achieved, "mbu": achieved / copy_gb_s}


def _validated_copy_bytes(args: argparse.Namespace) -> int:
    for name in ("input_len", "repeats"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.output_len < 2:
        raise ValueError(f"--output-len must be >= 2 (prefill + decode), got {args.output_len}")
    if args.copy_mib is not None and args.copy_mib < 1:
        raise ValueError(f"--copy-mib must be >= 1, got {args.copy_mib}")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return (args.copy_mib or (1024 if device.type == "cuda" else 64)) * 2**20


def run_bandwidth(args: argparse.Namespace) -> dict[str, Any]:
    """Measure copy bandwidth and batch-1 decode, print a summary, write JSON + PNG."""
    num_bytes = _validated_copy_bytes(args)
    llm, extended_from = build_bench_llm(args, args.input_len + args.output_len)
    device, dtype, cfg = llm_device(llm), llm_dtype(llm), llm.model_config
    copy = copy_bandwidth(device, num_bytes, args.repeats)
    prompts = synthetic_prompts(cfg.vocab_size, 1, args.input_len)
    timing = time_thinfer(llm, prompts, args.output_len)
    steps = timing.decode_steps
    total_bytes = decode_bytes(cfg, dtype, args.input_len, steps)
    per_step = total_bytes / steps
    copy_gb_s = copy["gb_per_s"]
    data: dict[str, Any] = {
        "benchmark": "bandwidth",
        "model": llm.source,
        "load_format": args.load_format,
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "input_len": args.input_len,
        "output_len": args.output_len,
        "context_extended_from": extended_from,
        "peer": args.peer,
        "copy": copy,
        "weight_bytes": weight_bytes(cfg, dtype),
        "kv_bytes_per_token": cfg.kv_elements_per_token * dtype.itemsize,
        "bytes_per_step": per_step,
        "bound_tokens_per_s": copy_gb_s * 1e9 / per_step,
        "thinfer": _engine_entry(timing, total_bytes, copy_gb_s),
        "notes": {
            "bytes_per_step": "all weights + K and V of the attended context, mean over the "
            "decode steps",
            "mbu": "achieved GB/s (decode bytes / decode seconds) / copy GB/s (best of repeats)",
            "bound_tokens_per_s": "copy GB/s / bytes per step",
        },
    }
    data["thinfer"]["fraction_of_bound"] = timing.tokens_per_s / data["bound_tokens_per_s"]
    if args.peer == "hf":
        peer = load_hf_peer(llm, args.load_format)
        data["hf"] = _engine_entry(time_hf(peer, prompts, args.output_len), total_bytes, copy_gb_s)
        data["thinfer_over_hf"] = timing.tokens_per_s / data["hf"]["tokens_per_s"]
    _print_summary(data)
    name = f"bandwidth_{model_short_name(llm)}_{device.type}"
    json_path, png_path = write_result(name, data, _plot(data), args.output_dir)
    print(f"wrote {json_path} and {png_path}")
    return data


def _print_summary(data: dict[str, Any]) -> None:
    copy, ours = data["copy"], data["thinfer"]
    print(
        f"copy {copy['gb_per_s']:.1f} GB/s (median {copy['median_gb_per_s']:.1f}); "
        f"{data['bytes_per_step'] / 1e9:.3f} GB per step -> bound "
        f"{data['bound_tokens_per_s']:.1f} tok/s"
    )
    for name in ("thinfer", "hf"):
        if name in data:
            entry = data[name]
            print(
                f"{name:>7}: {entry['tokens_per_s']:.1f} tok/s, {entry['achieved_gb_per_s']:.1f} "
                f"GB/s, MBU {entry['mbu']:.1%}"
            )
    print(f"thinfer at {ours['fraction_of_bound']:.1%} of the bound", end="")
    if "thinfer_over_hf" in data:
        print(f", {data['thinfer_over_hf']:.2f}x HF", end="")
    print(flush=True)


def _bars(ax: Any, labels: list[str], values: list[float], notes: list[str], unit: str) -> None:
    colors = ["#7f7f7f", "#1f77b4", "#ff7f0e"]
    ax.bar(range(len(values)), values, color=colors[: len(values)])
    for x, (value, note) in enumerate(zip(values, notes)):
        ax.annotate(note, (x, value), xytext=(0, 4), textcoords="offset points", ha="center")
    ax.set_xticks(range(len(values)), labels)
    ax.set_ylim(0, max(values) * 1.2)
    ax.set_ylabel(unit)
    ax.grid(axis="y", alpha=0.3)


def _plot(data: dict[str, Any]) -> Figure:
    engines = [name for name in ("thinfer", "hf") if name in data]
    names = {"thinfer": "thinfer", "hf": "HF transformers"}
    fig = Figure(figsize=(10, 4.2))
    left, right = fig.subplots(1, 2)
    copy = data["copy"]["gb_per_s"]
    _bars(
        left,
        ["device copy"] + [names[e] for e in engines],
        [copy] + [data[e]["achieved_gb_per_s"] for e in engines],
        [f"{copy:.0f}"] + [f"MBU {data[e]['mbu']:.1%}" for e in engines],
        "GB/s",
    )
    left.set_title("Copy (read + write) vs decode (bytes read per step x steps/s)", fontsize=10)
    bound = data["bound_tokens_per_s"]
    _bars(
        right,
        ["bound"] + [names[e] for e in engines],
        [bound] + [data[e]["tokens_per_s"] for e in engines],
        [f"{bound:.1f}"] + [f"{data[e]['tokens_per_s']:.1f}" for e in engines],
        "decode tokens / s (batch 1)",
    )
    right.set_title("Batch-1 decode speed vs copy-bandwidth bound", fontsize=10)
    model = data["model"].rstrip("/").split("/")[-1]
    fig.suptitle(
        f"{model} ({data['dtype']}) on {data['device']}: {data['input_len']} prompt + "
        f"{data['output_len']} new tokens, {data['bytes_per_step'] / 1e9:.3f} GB per step",
        fontsize=11,
    )
    fig.tight_layout()
    return fig
