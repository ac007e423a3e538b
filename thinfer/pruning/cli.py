"""`thinfer prune`: structured pruning of a checkpoint into a new one (docs/pruning.md)."""

from __future__ import annotations

import argparse
import json
from typing import Any


def add_prune_parser(subparsers: Any) -> None:
    """Add `prune` to the `thinfer` sub-commands."""
    from thinfer.pruning.run import METHODS

    parser = subparsers.add_parser(
        "prune",
        help="remove decoder blocks (depth) or attention groups and MLP channels (width)",
        description="Score the model's blocks or channels on calibration text, remove the "
        "least important ones, and save an HF-format checkpoint that `thinfer` (and, for "
        "uniform shapes, HF transformers) loads. Perplexity is measured on held-out text "
        "before and after.",
    )
    parser.add_argument("--model", default=None, help="HF directory or GGUF (default: embedded)")
    parser.add_argument("--load-format", default="auto", choices=["auto", "gguf", "safetensors"])
    parser.add_argument("--method", required=True, choices=METHODS)
    amount = parser.add_mutually_exclusive_group(required=True)
    amount.add_argument(
        "--ratio", type=float, help="depth: this fraction of the blocks; width: per layer"
    )
    amount.add_argument("--remove-blocks", type=int, help="depth: remove this many blocks")
    parser.add_argument(
        "--calib",
        nargs="+",
        default=None,
        help="calibration text files, directories of *.txt or globs (default: the CPython "
        "documentation topics every Python ships); the last 20%% is held out for evaluation",
    )
    parser.add_argument(
        "--samples", type=int, default=10, help="calibration windows of 128 tokens (10)"
    )
    parser.add_argument(
        "--eval-samples", type=int, default=10, help="held-out windows of 128 tokens (10)"
    )
    parser.add_argument(
        "--heal",
        choices=["none", "lora"],
        default="none",
        help="retrain the pruned model with LoRA on the calibration text, merged into the "
        "saved weights (default none)",
    )
    parser.add_argument("--heal-steps", type=int, default=100, help="LoRA steps of 4 windows (100)")
    parser.add_argument("--output", required=True, help="new directory for the pruned model")
    parser.set_defaults(func=cmd_prune)


def cmd_prune(args: argparse.Namespace) -> int:
    """Run `thinfer prune`; prints the report's summary."""
    from thinfer.pruning.run import run_prune

    if args.samples < 1 or args.eval_samples < 1:
        raise ValueError("--samples and --eval-samples must be >= 1")
    report = run_prune(
        args.output,
        args.method,
        model=args.model,
        load_format=args.load_format,
        ratio=args.ratio,
        remove=args.remove_blocks,
        calib=args.calib,
        samples=args.samples,
        eval_samples=args.eval_samples,
        heal_steps=args.heal_steps if args.heal == "lora" else 0,
    )
    dense, pruned = report["dense"], report["pruned"]
    summary = {
        "output": args.output,
        "method": report["method"],
        "removed_blocks": report.get("removed_blocks"),
        "shape": {k: v for k, v in (report.get("shape") or {}).items() if "dropped" not in k}
        or None,
        "parameters": f"{dense['parameters']} -> {pruned['parameters']}",
        "held_out_ppl": f"{dense['ppl']:.2f} -> {pruned['ppl']:.2f}"
        + (f" -> {report['healed']['ppl']:.2f} healed" if "healed" in report else ""),
    }
    print(json.dumps({k: v for k, v in summary.items() if v is not None}, indent=2))
    return 0
