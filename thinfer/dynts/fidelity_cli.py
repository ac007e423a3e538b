"""`thinfer dynts fidelity`: NLL increase of each compression method on real long text."""

from __future__ import annotations

import argparse
from typing import Any

DEFAULT_METHODS = "full,window,streamingllm,sepllm,h2o,snapkv,rkv,dynts"


def _fidelity(args: argparse.Namespace) -> int:
    from thinfer.dynts.fidelity import run_fidelity

    if args.budget < 2 or args.count < 1 or args.length < 2:
        raise ValueError("--budget and --length must be >= 2 and --count >= 1")
    if args.length <= args.budget:
        raise ValueError(
            f"--length ({args.length}) must exceed --budget ({args.budget}), "
            "or nothing is ever evicted"
        )
    run_fidelity(args)
    return 0


def add_fidelity_command(commands: Any) -> None:
    """`thinfer dynts fidelity`: per-token NLL increase vs the full cache on text files."""
    p = commands.add_parser(
        "fidelity",
        help="per-token NLL increase of each compression method vs the full cache on real text",
        description="Cut one window of --length tokens from each of --count text files "
        "(chosen with --seed), force its continuation after --prompt-tokens tokens through "
        "the decode path under every method at the same budget, and report the mean NLL "
        "increase over the full cache (all tokens, tokens after the budget, by position) "
        "and peak KV (JSON + PNG).",
    )
    p.add_argument(
        "--texts", nargs="+", required=True, help="text files, directories of *.txt, or globs"
    )
    p.add_argument("--methods", default=DEFAULT_METHODS, help="comma-separated; full is added")
    p.add_argument("--budget", type=int, default=256)
    p.add_argument("--window", type=int, default=64, help="W for DynTS / the uniform trigger")
    p.add_argument("--ratio", type=float, default=0.3)
    p.add_argument("--trigger", default="uniform", choices=["native", "uniform"])
    p.add_argument(
        "--scoring",
        default="per_head",
        choices=["per_head", "shared"],
        help="H2O/SnapKV/R-KV: keep slots per head (default) or one shared score per token",
    )
    p.add_argument("--predictor", default=None, help="DynTS head (thinfer dynts train)")
    p.add_argument("--count", type=int, default=16, help="windows, one per file (default 16)")
    p.add_argument("--length", type=int, default=1024, help="tokens per window (default 1024)")
    p.add_argument("--prompt-tokens", type=int, default=32, help="prompt part (default 32)")
    p.add_argument("--seed", type=int, default=0, help="which files and offsets (default 0)")
    p.add_argument("--model", default=None)
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--num-kv-blocks", type=int, default=4096)
    p.add_argument("--output-dir", default="bench/results")
    p.set_defaults(func=_fidelity)
