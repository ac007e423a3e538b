"""`thinfer bench matmul`: the cost of batch invariance for linear layers (the LLM-42 "seed
figure"): TFLOPS against M (tokens) of the batch-invariant matmul and of the library's
default kernel, per weight shape [N, K], and whether each kernel's rows change with M.

- CUDA (bf16): invariant = `thinfer.kernels.invariant_matmul.invariant_linear` (Triton,
  fixed tiles and K order), default = `F.linear` (cuBLAS). Each timed call is a CUDA graph
  replay after an L2-evicting write.
- CPU (fp32): invariant = `tiled_linear` over oneDNN's packed weights with the tile sizes
  `choose_tiles` verifies for the shape (as the engine does), default = the packed oneDNN
  call on all M rows at once, and `mkl` = plain `F.linear`. perf_counter.

Invariance: x is one [max M, K] tensor; for each M the kernel gets its first M rows, and a
kernel is invariant for a shape when row 0 (and every other of the M rows) is bitwise the
same as in the call with the largest M. The JSON records per shape and M the seconds, the
TFLOPS (2 M N K / median seconds), invariant / baseline TFLOPS, and the M where rows changed.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from thinfer.bench.attention_bench import L2_FLUSH_BYTES
from thinfer.bench.bandwidth import device_timings, graphed
from thinfer.bench.report import DEFAULT_OUTPUT_DIR, write_result

Kernel = Callable[[torch.Tensor], torch.Tensor]

# Weight shapes [N, K]: Llama-2-7B's (the paper's) and the default model's (SmolLM2-135M:
# hidden 576, 9 query / 3 KV heads of 64, intermediate 1536, vocabulary 49152; qkv and
# gate/up fused as thinfer.models.llama loads them).
SHAPE_GROUPS: dict[str, list[tuple[str, int, int]]] = {
    "llama2-7b": [
        ("llama2-7b q/k/v/o", 4096, 4096),
        ("llama2-7b gate/up", 11008, 4096),
        ("llama2-7b down", 4096, 11008),
    ],
    "smollm2": [
        ("smollm2 qkv", 960, 576),
        ("smollm2 o", 576, 576),
        ("smollm2 gate_up", 3072, 576),
        ("smollm2 down", 576, 1536),
        ("smollm2 lm_head", 49152, 576),
    ],
}
DEFAULT_SHAPES = {"cuda": "llama2-7b,smollm2", "cpu": "smollm2,4096x4096"}
DEFAULT_MAX_M = {"cuda": 8192, "cpu": 512}


def parse_shapes(text: str) -> list[tuple[str, int, int]]:
    """ "llama2-7b,576x1536" -> (label, N, K) per shape: group names of `SHAPE_GROUPS` and
    NxK literals (labelled as the known shape of those sizes if there is one)."""
    known = {(n, k): label for group in SHAPE_GROUPS.values() for label, n, k in group}
    shapes: list[tuple[str, int, int]] = []
    for part in (p.strip().lower() for p in text.split(",") if p.strip()):
        if part in SHAPE_GROUPS:
            shapes += SHAPE_GROUPS[part]
            continue
        try:
            n, k = (int(v) for v in part.split("x"))
        except ValueError:
            n = k = 0
        if n < 1 or k < 1:
            raise ValueError(
                f"--shapes: {part!r} is neither NxK nor one of {', '.join(SHAPE_GROUPS)}"
            )
        shapes.append((known.get((n, k), f"{n}x{k}"), n, k))
    if not shapes:
        raise ValueError(f"--shapes: no shape in {text!r}")
    return list(dict.fromkeys(shapes))  # each once, in order


def powers_of_two(max_m: int) -> list[int]:
    """1, 2, 4, ... up to `max_m` (and `max_m` itself when it is not a power of two)."""
    if max_m < 1:
        raise ValueError(f"--max-m must be >= 1, got {max_m}")
    ms = [2**i for i in range(int(math.log2(max_m)) + 1)]
    return ms if ms[-1] == max_m else [*ms, max_m]


def cuda_kernels(weight: torch.Tensor) -> tuple[dict[str, Kernel], dict[str, Any]]:
    """The Triton invariant kernel with its fixed default tiles, the same kernel with the tile
    plan `tune_tiles` verified and chose for this shape (tiles by M), and cuBLAS."""
    from thinfer.kernels.invariant_matmul import invariant_config, invariant_linear
    from thinfer.kernels.invariant_tiles import tune_tiles

    fixed = invariant_config(*weight.shape, weight.dtype)
    tuned = tune_tiles(weight)  # registered: invariant_linear without tiles= uses it
    kernels = {
        "invariant": lambda x: invariant_linear(x, weight, tiles=fixed),
        "invariant_tuned": lambda x: invariant_linear(x, weight),
        "default": _f_linear(weight),
    }
    return kernels, {"triton_tiles": dataclasses.asdict(fixed), "tile_plan": tuned.as_dict()}


def cpu_kernels(weight: torch.Tensor) -> tuple[dict[str, Kernel], dict[str, Any]]:
    """Tiled oneDNN (invariant), oneDNN on all rows (default) and MKL's `F.linear`."""
    from thinfer.models.invariant_linear import choose_tiles, plain_matmul, tiled_linear

    n, k = weight.shape
    packed = None
    if torch.backends.mkldnn.is_available():
        try:
            packed = torch.ops.mkldnn._reorder_linear_weight(weight)
        except (RuntimeError, AttributeError):
            packed = None
    plain = plain_matmul(weight, packed)
    tiles = choose_tiles(plain, k, weight.dtype)  # what the engine would run
    passed = tiles != (1,)
    kernels = {"invariant": lambda x: tiled_linear(x, plain, n, tile_rows=tiles)}
    kernels["default"] = plain
    if packed is not None:
        kernels["mkl"] = _f_linear(weight)
    info = {"onednn_packed": packed is not None, "self_test": passed, "tile_rows": list(tiles)}
    return kernels, info


def _f_linear(weight: torch.Tensor) -> Kernel:
    return lambda x: F.linear(x, weight)


def measure_shape(
    n: int, k: int, ms: list[int], device: torch.device, dtype: torch.dtype, args: Any
) -> dict[str, Any]:
    """Seconds, TFLOPS and row invariance of every kernel for W [N, K] at each M."""
    gen = torch.Generator(device=device).manual_seed(n * 31 + k)
    weight = (torch.randn(n, k, generator=gen, device=device) * 0.02).to(dtype)
    x_all = torch.randn(ms[-1], k, generator=gen, device=device).to(dtype)
    make = cuda_kernels if device.type == "cuda" else cpu_kernels
    kernels, info = make(weight)
    flush = None
    if device.type == "cuda":
        flush = torch.empty(L2_FLUSH_BYTES, dtype=torch.uint8, device=device).zero_
    entry: dict[str, Any] = {"n": n, "k": k, **info, "kernels": {}, "invariance": {}}
    for name, kernel in kernels.items():
        full = kernel(x_all)
        seconds, row0_changed, rows_changed = [], [], []
        for m in ms:
            x = x_all[:m]
            y = kernel(x)
            if not torch.equal(y[0], full[0]):
                row0_changed.append(m)
            if not torch.equal(y, full[:m]):
                rows_changed.append(m)
            call = graphed(functools.partial(kernel, x), device)
            times = device_timings(call, device, args.repeats, args.warmup, flush)
            seconds.append(sorted(times)[len(times) // 2])
        tflops = [2 * m * n * k / s / 1e12 for m, s in zip(ms, seconds)]
        entry["kernels"][name] = {"seconds": seconds, "tflops": tflops}
        entry["invariance"][name] = {
            "row0_invariant": not row0_changed,
            "row0_changed_at_m": row0_changed,
            "rows_changed_at_m": rows_changed,
        }
        del full
    for mine in ("invariant", "invariant_tuned"):
        for other in ("default", "mkl"):
            if mine in entry["kernels"] and other in entry["kernels"]:
                pairs = zip(entry["kernels"][mine]["tflops"], entry["kernels"][other]["tflops"])
                entry[f"ratio_{mine}_over_{other}"] = [i / o for i, o in pairs]
    return entry


def run_matmul(args: argparse.Namespace) -> dict[str, Any]:
    """Measure every shape, print a line per (shape, M), write JSON + PNG; return the data."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type not in DEFAULT_MAX_M:
        raise ValueError(f"--device must be cuda or cpu, got {device}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device here")
    if args.repeats < 1 or args.warmup < 0:
        raise ValueError(
            f"--repeats must be >= 1 and --warmup >= 0, got {args.repeats}, {args.warmup}"
        )
    shapes = parse_shapes(args.shapes or DEFAULT_SHAPES[device.type])
    ms = powers_of_two(DEFAULT_MAX_M[device.type] if args.max_m is None else args.max_m)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if device.type == "cpu":  # the engine's allocator settings: tile buffers are reused memory
        from thinfer.engine.cpu_malloc import tune_malloc_for_decode

        tune_malloc_for_decode()
    results: dict[str, Any] = {}
    for label, n, k in shapes:
        entry = measure_shape(n, k, ms, device, dtype, args)
        results[label] = entry
        for i, m in enumerate(ms):
            cells = "  ".join(
                f"{name} {timing['tflops'][i]:8.4f}" for name, timing in entry["kernels"].items()
            )
            ratios = "  ".join(
                f"{key.removeprefix('ratio_').replace('_over_', '/')} {values[i]:.3f}"
                for key, values in entry.items()
                if key.startswith("ratio_") and key.endswith("_default")
            )
            print(f"{label:>18} [{n}x{k}] M={m:<5} TFLOPS {cells}  {ratios}", flush=True)
        changed = {name: v["row0_changed_at_m"] for name, v in entry["invariance"].items()}
        print(f"{label:>18} row 0 changed (vs M={ms[-1]}) at M: {changed}", flush=True)
    data: dict[str, Any] = {
        "benchmark": "matmul",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "device_type": device.type,
        "dtype": str(dtype).removeprefix("torch."),
        "m": ms,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "kernels": _descriptions(device),
        "notes": {
            "tflops": "2 * M * N * K / median seconds / 1e12",
            "ratio": "invariant TFLOPS / default TFLOPS per M (below 1: invariance costs)",
            "invariance": "rows of x[:M] against the same rows of the call with the largest "
            "M, bitwise; row0_invariant is the paper's check",
            "timing": "CUDA graph replay after an L2-evicting write (GPU); perf_counter (CPU)",
        },
        "shapes": results,
    }
    from thinfer.bench.matmul_plot import plot_matmul

    json_path, png_path = write_result(
        f"matmul_{device.type}", data, plot_matmul(data), args.output_dir
    )
    print(f"wrote {json_path} and {png_path}")
    return data


def _descriptions(device: torch.device) -> dict[str, str]:
    if device.type == "cuda":
        return {
            "invariant": "Triton invariant_linear: fixed tiles per (N, K), fixed BLOCK_K order, "
            "no split-K",
            "invariant_tuned": "the same kernel with the tile plan tune_tiles chose per M "
            "bucket among tiles verified to give bitwise-identical outputs on this GPU",
            "default": "torch.nn.functional.linear (cuBLAS)",
        }
    return {
        "invariant": "tiled_linear over oneDNN packed weights (fixed-size row tiles)",
        "default": "oneDNN packed matmul on all M rows (mkldnn._linear_pointwise)",
        "mkl": "torch.nn.functional.linear (MKL)",
    }


def add_parser(kinds: Any) -> argparse.ArgumentParser:
    """Register `thinfer bench matmul`; the caller sets its `func`."""
    mm = kinds.add_parser(
        "matmul",
        help="TFLOPS vs M of the batch-invariant matmul against the default kernel",
        description="Per weight shape [N, K] and M = 1, 2, 4, ...: TFLOPS of the "
        "batch-invariant matmul (Triton on CUDA, bf16; row tiles over oneDNN on CPU, fp32) "
        "and of the default kernel (cuBLAS; oneDNN and MKL), the ratio, and whether each "
        "kernel's row 0 changes bitwise with M (JSON + PNG).",
    )
    mm.add_argument(
        "--shapes",
        default=None,
        help="comma-separated groups (llama2-7b, smollm2) and NxK (default: both groups on "
        "CUDA; smollm2,4096x4096 on CPU)",
    )
    mm.add_argument(
        "--max-m", type=int, default=None, help="largest M (default 8192 CUDA, 512 CPU)"
    )
    mm.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    mm.add_argument("--repeats", type=int, default=10, help="timed calls per point (median)")
    mm.add_argument("--warmup", type=int, default=2, help="untimed calls first")
    mm.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    mm.add_argument("--output-dir", default=str(DEFAULT_OUTPUT_DIR))
    return mm
