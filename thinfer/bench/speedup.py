"""`thinfer bench speedup`: decode tokens/s of thinfer over HF transformers, per input length
and batch size (the FlashDecoding++ grid: input 128/1k/8k/32k x batch 1/2/4/8).

Each cell feeds both engines the same `batch` prompts of exactly `input_len` random token ids
and decodes `--output-len` tokens greedily, EOS ignored, after a short warm-up at the cell's
batch size; decoding alone is timed (see `thinfer.bench.decode_timing` for how, and why HF is
timed with forward hooks inside one `generate`). Both models stay loaded; each cell gives
thinfer a KV cache of exactly what the cell needs and frees it before HF runs, so HF gets all
the rest. A cell where an engine raises `torch.OutOfMemoryError` is marked "oom" for that
engine; memory is freed and the grid goes on.
"""

from __future__ import annotations

import argparse
import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import matplotlib
import numpy as np
import torch
from matplotlib.figure import Figure

from thinfer.bench.decode_timing import (
    DecodeTiming,
    build_bench_llm,
    free_device_memory,
    parse_positive_ints,
    synthetic_prompts,
    time_hf,
    time_thinfer,
)
from thinfer.bench.hf_peer import llm_device, llm_dtype, load_hf_peer
from thinfer.bench.report import model_short_name, write_result

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from thinfer.llm import LLM


def guarded(run: Callable[[], DecodeTiming], device: torch.device) -> dict[str, Any]:
    """`run()`'s timing as a dict with status "ok", or status "oom" if it ran out of memory."""
    try:
        timing: DecodeTiming = run()
        return {"status": "ok"} | timing.as_dict()
    except torch.OutOfMemoryError as exc:
        return {"status": "oom", "error": str(exc).strip().splitlines()[0][:300]}
    finally:
        free_device_memory(device)


def cell_label(cell: dict[str, Any]) -> str:
    """The speedup as "6.12x", or which engines ran out of memory: "oom (hf|thinfer|both)"."""
    if cell["speedup"] is not None:
        return f"{cell['speedup']:.2f}x"
    failed = [name for name in ("thinfer", "hf") if cell[name]["status"] != "ok"]
    return "oom (both)" if len(failed) == 2 else f"oom ({failed[0]})"


def _cell(
    llm: LLM, peer: PreTrainedModel, input_len: int, batch: int, output_len: int
) -> dict[str, Any]:
    """Both engines on the same prompts; their timings (or "oom") and the speedup."""
    prompts = synthetic_prompts(llm.model_config.vocab_size, batch, input_len)
    device = llm_device(llm)
    cell: dict[str, Any] = {"input_len": input_len, "batch_size": batch}
    cell["thinfer"] = guarded(functools.partial(time_thinfer, llm, prompts, output_len), device)
    cell["hf"] = guarded(functools.partial(time_hf, peer, prompts, output_len), device)
    ok = cell["thinfer"]["status"] == cell["hf"]["status"] == "ok"
    cell["speedup"] = cell["thinfer"]["tokens_per_s"] / cell["hf"]["tokens_per_s"] if ok else None
    cell["label"] = cell_label(cell)
    return cell


def _validate(args: argparse.Namespace) -> tuple[list[int], list[int]]:
    lens = parse_positive_ints(args.input_lens, "--input-lens")
    sizes = parse_positive_ints(args.batch_sizes, "--batch-sizes")
    if args.output_len < 2:
        raise ValueError(f"--output-len must be >= 2 (prefill + decode), got {args.output_len}")
    return lens, sizes


def run_speedup(args: argparse.Namespace) -> dict[str, Any]:
    """Run the speedup grid, print a table, write JSON + PNG; return the results.

    The JSON and PNG are rewritten after every cell ("complete": false until the last), so a
    run stopped early (a time budget, an OOM kill) still leaves the cells it measured."""
    lens, sizes = _validate(args)
    llm, extended_from = build_bench_llm(args, max(lens) + args.output_len)
    device = llm_device(llm)
    peer = load_hf_peer(llm, args.load_format)
    print(f"{llm.source}: decode {args.output_len} tokens, thinfer vs HF", flush=True)
    name = f"speedup_{model_short_name(llm)}_{device.type}"
    cells: list[dict[str, Any]] = []
    for input_len in lens:
        for batch in sizes:
            cells.append(_cell(llm, peer, input_len, batch, args.output_len))
            print_speedup_row(cells[-1])
            data = speedup_record(llm, args, extended_from, cells)
            json_path, png_path = write_result(name, data, plot_speedup(data), args.output_dir)
    print(f"wrote {json_path} and {png_path}")
    return data


def speedup_record(
    llm: LLM, args: argparse.Namespace, extended_from: int | None, cells: list[dict[str, Any]]
) -> dict[str, Any]:
    """The JSON record of the cells measured so far (the grid is `complete` when all are)."""
    lens = list(dict.fromkeys(c["input_len"] for c in cells))
    sizes = list(dict.fromkeys(c["batch_size"] for c in cells))
    speedups = [c["speedup"] for c in cells if c["speedup"] is not None]
    grid_lens, grid_sizes = _validate(args)
    return {
        "benchmark": "speedup",
        "model": llm.source,
        "load_format": args.load_format,
        "device": str(llm_device(llm)),
        "dtype": str(llm_dtype(llm)).removeprefix("torch."),
        "input_lens": lens,
        "batch_sizes": sizes,
        "output_len": args.output_len,
        "complete": len(cells) == len(grid_lens) * len(grid_sizes),
        "context_extended_from": extended_from,
        "max_model_len": llm.max_model_len,
        "notes": {
            "tokens_per_s": "decode tokens (batch x (output_len - 1)) / decode seconds; the "
            "prefill and the first token are excluded; warm-up per cell and engine",
            "hf_timing": "forward pre-hook marks in one generate(): decode = start of the 2nd "
            "forward to the end of generate (CUDA events on GPU)",
            "speedup": "thinfer tokens_per_s / HF tokens_per_s; null where an engine ran out of "
            "memory (status 'oom')",
        },
        "cells": cells,
        "table": {
            str(n): {str(c["batch_size"]): c["label"] for c in cells if c["input_len"] == n}
            for n in lens
        },
        "min_speedup": min(speedups, default=None),
        "max_speedup": max(speedups, default=None),
        "oom_cells": sum(c["speedup"] is None for c in cells),
    }


def _rate(result: dict[str, Any]) -> str:
    return f"{result['tokens_per_s']:.1f}" if result["status"] == "ok" else "oom"


def print_speedup_row(cell: dict[str, Any]) -> None:
    """One line per cell: both engines' decode tokens/s and the speedup (or "oom")."""
    print(
        f"input {cell['input_len']:>6}  batch {cell['batch_size']:>3}  "
        f"thinfer {_rate(cell['thinfer']):>9} tok/s  HF {_rate(cell['hf']):>9} tok/s  "
        f"{cell['label']}",
        flush=True,
    )


def plot_speedup(data: dict[str, Any]) -> Figure:
    """Heatmap of the speedup over (input length, batch size); OOM cells grey and labelled."""
    lens, sizes = data["input_lens"], data["batch_sizes"]
    by_key = {(c["input_len"], c["batch_size"]): c for c in data["cells"]}
    grid = np.full((len(lens), len(sizes)), np.nan)
    for row, n in enumerate(lens):
        for col, b in enumerate(sizes):
            if (n, b) in by_key and by_key[(n, b)]["speedup"] is not None:
                grid[row, col] = by_key[(n, b)]["speedup"]
    fig = Figure(figsize=(1.9 * len(sizes) + 2.6, 1.1 * len(lens) + 1.8))
    ax = fig.add_subplot(1, 1, 1)
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="#d9d9d9")
    image = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, aspect="auto", vmin=0)
    fig.colorbar(image, ax=ax, label="decode speedup, thinfer / HF")
    for row, n in enumerate(lens):
        for col, b in enumerate(sizes):
            if (n, b) not in by_key:
                continue  # not measured (yet)
            cell = by_key[(n, b)]
            text = f"{cell['label']}\n{_rate(cell['thinfer'])} / {_rate(cell['hf'])}"
            ax.text(
                col,
                row,
                text,
                ha="center",
                va="center",
                fontsize=8,
                color="black",
                bbox={"boxstyle": "round", "facecolor": "white", "alpha": 0.7, "lw": 0},
            )
    ax.set_xticks(range(len(sizes)), [str(b) for b in sizes])
    ax.set_yticks(range(len(lens)), [str(n) for n in lens])
    ax.set_xlabel("batch size")
    ax.set_ylabel("input length (tokens)")
    model = data["model"].rstrip("/").split("/")[-1]
    ax.set_title(
        f"Decode speedup over HF transformers: {model} ({data['dtype']}) on {data['device']}, "
        f"{data['output_len']} new tokens\ncell: speedup, thinfer / HF decode tokens/s",
        fontsize=10,
    )
    return fig
