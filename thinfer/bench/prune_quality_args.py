"""Options of `thinfer bench prune-quality`: the parser and the checks made before a model
loads."""

from __future__ import annotations

import argparse
from typing import Any

from thinfer.bench.report import DEFAULT_OUTPUT_DIR

DEFAULT_RATIOS = "0.2,0.35"
_POSITIVE = (
    "heal_steps", "count", "batch_size", "samples", "eval_samples", "facts", "steps",
    "speed_repeats",
)  # fmt: skip


def parse_methods(text: str | None) -> list[str]:
    """ "depth-ppl,wanda-sp" -> the list; None or "" -> every method `run_prune` knows now."""
    from thinfer.pruning.run import METHODS

    if not text:
        return list(METHODS)
    methods = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise ValueError(
            f"--methods: unknown {unknown or text!r}; use some of {', '.join(METHODS)}"
        )
    return list(dict.fromkeys(methods))


def parse_ratios(text: str) -> list[float]:
    """ "0.2,0.35" -> [0.2, 0.35]; ValueError unless every ratio is a number in (0, 1)."""
    try:
        ratios = [float(part) for part in text.split(",") if part.strip()]
    except ValueError as exc:
        raise ValueError(f"--ratios: expected comma-separated numbers, got {text!r}") from exc
    if not ratios or any(not 0.0 < r < 1.0 for r in ratios):
        raise ValueError(f"--ratios: every ratio must be in (0, 1), got {text!r}")
    return list(dict.fromkeys(ratios))


def check_args(args: argparse.Namespace) -> tuple[list[str], list[float]]:
    """The methods and ratios; ValueError for any bad option, before a model loads."""
    methods, ratios = parse_methods(args.methods), parse_ratios(args.ratios)
    for name in _POSITIVE:
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.max_tokens < 2:
        raise ValueError(
            f"--max-tokens must be >= 2 (decode steps are timed), got {args.max_tokens}"
        )
    if args.facts > args.steps:
        raise ValueError(f"--facts ({args.facts}) cannot exceed --steps ({args.steps})")
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    return methods, ratios


def add_parser(kinds: Any) -> None:
    """Register `thinfer bench prune-quality`."""
    pq = kinds.add_parser(
        "prune-quality",
        help="pruning results table: perplexity, proxy accuracy, speed per method x ratio",
        description="For each --methods x --ratios: `thinfer prune` with LoRA healing; held-out "
        "perplexity and proxy-task accuracy (full KV cache) of the dense, pruned and healed "
        "models, and the healed model's decode tokens/s against the dense model's in the same "
        "run. Writes JSON + PNG and prints a markdown table.",
    )
    pq.add_argument("--model", default=None, help="HF dir or GGUF (default: embedded SmolLM2)")
    pq.add_argument("--load-format", default="auto", choices=["auto", "gguf", "safetensors"])
    pq.add_argument(
        "--methods", default=None, help="comma-separated (default: every `thinfer prune` method)"
    )
    pq.add_argument(
        "--ratios", default=DEFAULT_RATIOS, help=f"in (0, 1) (default {DEFAULT_RATIOS})"
    )
    pq.add_argument("--heal-steps", type=int, default=50, help="LoRA steps (default 50)")
    pq.add_argument("--samples", type=int, default=10, help="calibration windows (default 10)")
    pq.add_argument("--eval-samples", type=int, default=10, help="held-out windows (default 10)")
    pq.add_argument("--calib", nargs="+", default=None, help="calibration text (see prune)")
    pq.add_argument("--count", type=int, default=40, help="held-out proxy traces (default 40)")
    pq.add_argument("--seed", type=int, default=1, help="proxy held-out split seed (default 1)")
    pq.add_argument("--facts", type=int, default=3, help="critical results per trace (3)")
    pq.add_argument("--steps", type=int, default=30, help="steps per trace (default 30)")
    pq.add_argument("--batch-size", type=int, default=16, help="decode batch (default 16)")
    pq.add_argument("--max-tokens", type=int, default=64, help="greedy tokens each (default 64)")
    pq.add_argument(
        "--speed-repeats", type=int, default=3,
        help="alternate dense/pruned decode timings per row; medians kept (default 3)",
    )  # fmt: skip
    pq.add_argument("--device", default=None, help="thinfer's device (default: cuda if available)")
    pq.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    pq.add_argument("--output-dir", default=str(DEFAULT_OUTPUT_DIR))
    pq.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from thinfer.bench.prune_quality import run_prune_quality

    return 0 if run_prune_quality(args) else 1
