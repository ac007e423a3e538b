"""`thinfer eval`: the command-line options of the evaluation runner (see docs/eval.md)."""

from __future__ import annotations

import argparse
from typing import Any

from thinfer.bench.report import DEFAULT_OUTPUT_DIR

ALL_METHODS = "full,window,streamingllm,sepllm,h2o,snapkv,rkv,dynts"


def _eval(args: argparse.Namespace) -> int:
    from thinfer.eval.runner import run_eval

    run_eval(args)
    return 0


def add_eval_parser(subparsers: Any) -> None:
    """Add `eval` to the `thinfer` sub-commands."""
    from thinfer.cli_args import add_model_args
    from thinfer.compression.config import TRIGGERS

    ev = subparsers.add_parser(
        "eval",
        help="Pass@1 and peak KV of compression methods on a JSONL benchmark",
        description="Sample every problem k times per method (the DynTS protocol: temperature "
        "0.6, top-p 0.95, top-k 20, up to 16384 new tokens), check the last \\boxed{} answer "
        "against the reference (symbolic equality), and report Pass@1, pass@k, generated "
        "lengths and peak KV lengths per method as JSON + PNG. --seed also seeds the "
        "samples: problem i's sample j uses seed + i*k + j, the same under every method.",
    )
    ev.add_argument("--dataset", required=True, help="JSONL file of problems (docs/eval.md)")
    ev.add_argument(
        "--methods",
        default=None,
        help=f"comma-separated (default {ALL_METHODS}; dynts only with --predictor)",
    )
    ev.add_argument("--budget", type=int, required=True, help="KV slots per sample (B)")
    ev.add_argument(
        "--window", type=int, default=None, help="recent tokens kept (W; default per method)"
    )
    ev.add_argument(
        "--ratio", type=float, default=0.3, help="share of older tokens kept (r; default 0.3)"
    )
    ev.add_argument("--trigger", default="native", choices=list(TRIGGERS), help="default native")
    ev.add_argument(
        "--scoring",
        default="per_head",
        choices=["per_head", "shared"],
        help="H2O/SnapKV/R-KV: keep slots per head (default) or one shared score per token",
    )
    ev.add_argument("--predictor", default=None, help="DynTS head (safetensors); dynts needs it")
    ev.add_argument("--think-end", default="</think>", help="marker that ends the thinking (DynTS)")
    add_sampling_args(ev, default_samples=5)
    ev.add_argument(
        "--keep-text", action="store_true", help="store every sample's text in the JSON"
    )
    ev.add_argument(
        "--output-dir",
        default=str(DEFAULT_OUTPUT_DIR),
        help="where the JSON and PNG go (default: bench/results)",
    )
    add_model_args(ev)
    ev.set_defaults(func=_eval)


def add_sampling_args(parser: argparse.ArgumentParser, default_samples: int) -> None:
    """The sampling, problem-set and grading options shared by `thinfer eval` and
    `thinfer dynts traces` (defaults: the DynTS protocol)."""
    parser.add_argument(
        "--samples",
        type=int,
        default=default_samples,
        help=f"samples per problem, k (default {default_samples})",
    )
    parser.add_argument("--max-tokens", type=int, default=16384, help="default 16384")
    parser.add_argument("--temperature", type=float, default=0.6, help="default 0.6")
    parser.add_argument("--top-p", type=float, default=0.95, help="default 0.95")
    parser.add_argument("--top-k", type=int, default=20, help="default 20")
    parser.add_argument("--limit", type=int, default=None, help="only the first N problems")
    parser.add_argument(
        "--answer-pattern",
        default=None,
        help="regex with one group: its last match is the answer (default: last \\boxed{})",
    )
    parser.add_argument(
        "--answer-timeout",
        dest="timeout",
        type=float,
        default=2.0,
        help="seconds for one symbolic answer check (default 2)",
    )
    parser.add_argument(
        "--chat",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="apply the chat template (default: when the tokenizer has one)",
    )
