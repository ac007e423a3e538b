"""`thinfer bench throughput|latency`: the benchmark sub-commands of the `thinfer` CLI."""

from __future__ import annotations

import argparse
from typing import Any

from thinfer.bench.report import DEFAULT_OUTPUT_DIR


def _common(parser: argparse.ArgumentParser) -> None:
    from thinfer.cli import add_model_args

    add_model_args(parser)
    parser.add_argument(
        "--peer",
        default="hf",
        choices=["hf", "none"],
        help="compare with HF transformers on the same checkpoint (default), or not",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: torch's choice; recorded in the JSON)",
    )
    parser.add_argument(
        "--output-dir",
        default=str(DEFAULT_OUTPUT_DIR),
        help="where the JSON and PNG go (default: bench/results)",
    )


def _set_threads(args: argparse.Namespace) -> None:
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        import torch

        torch.set_num_threads(args.threads)


def _throughput(args: argparse.Namespace) -> int:
    from thinfer.bench.throughput import run_throughput

    _set_threads(args)
    run_throughput(args)
    return 0


def _latency(args: argparse.Namespace) -> int:
    from thinfer.bench.latency import run_latency

    _set_threads(args)
    run_latency(args)
    return 0


def add_bench_parser(subparsers: Any) -> None:
    """Add `bench` (with `throughput` and `latency`) to the `thinfer` sub-command parsers."""
    bench = subparsers.add_parser("bench", help="benchmark thinfer against HF transformers")
    kinds = bench.add_subparsers(dest="bench_command", required=True)

    tp = kinds.add_parser(
        "throughput",
        help="tokens/s of batch generation per batch size",
        description="Offline batch generation (greedy, EOS ignored) per batch size; "
        "--max-num-seqs is ignored: each run uses its batch size.",
    )
    _common(tp)
    tp.add_argument("--batch-sizes", default="1,16", help="comma-separated (default 1,16)")
    tp.add_argument("--num-prompts", type=int, default=32)
    tp.add_argument("--max-tokens", type=int, default=128)
    tp.set_defaults(func=_throughput)

    lat = kinds.add_parser(
        "latency",
        help="TTFT/TPOT of single requests, and of thinfer under load",
        description="Each prompt alone through both engines, then all prompts at once "
        "through thinfer (--max-num-seqs concurrent, default 16).",
    )
    _common(lat)
    lat.add_argument("--num-prompts", type=int, default=16)
    lat.add_argument("--max-tokens", type=int, default=64)
    lat.set_defaults(func=_latency, max_num_seqs=16)
