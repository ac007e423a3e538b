"""`thinfer dynts proxy-traces`: write train / held-out splits of the proxy reasoning task."""

from __future__ import annotations

import argparse
from typing import Any


def _proxy_traces(args: argparse.Namespace) -> int:
    from thinfer.dynts.proxy import make_problems
    from thinfer.dynts.traces import write_traces
    from thinfer.loading.checkpoint import load_checkpoint

    for name in ("count", "facts", "steps"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.facts > args.steps:
        raise ValueError(f"--facts ({args.facts}) cannot exceed --steps ({args.steps})")
    tokenizer = load_checkpoint(args.model, args.load_format).tokenizer
    if tokenizer is None:
        raise ValueError("this model has no tokenizer")
    problems = make_problems(
        tokenizer, args.count, args.seed, num_facts=args.facts, num_steps=args.steps
    )
    write_traces(args.output, [p.trace for p in problems])
    mean = sum(len(p.trace.token_ids) for p in problems) / len(problems)
    print(f"wrote {len(problems)} proxy traces (mean {mean:.0f} tokens) -> {args.output}")
    return 0


def add_proxy_traces_command(commands: Any) -> None:
    """`thinfer dynts proxy-traces`: the proxy task as trace JSONL (with answers)."""
    p = commands.add_parser(
        "proxy-traces",
        help="generate proxy reasoning traces (critical results among filler steps)",
        description="Write traces of the proxy task (thinfer/dynts/proxy.py): named "
        "intermediate results among filler steps, then an answer that recalls one of them. "
        "Use different seeds for the training and held-out splits.",
    )
    p.add_argument("--output", required=True, help="JSONL file to write")
    p.add_argument("--count", type=int, default=200, help="number of traces (default 200)")
    p.add_argument("--seed", type=int, default=0, help="split seed (default 0)")
    p.add_argument("--facts", type=int, default=3, help="critical results per trace (3)")
    p.add_argument("--steps", type=int, default=30, help="steps per trace (default 30)")
    p.add_argument("--model", default=None, help="whose tokenizer (default: SmolLM2)")
    p.add_argument("--load-format", default="auto", choices=["auto", "gguf", "safetensors"])
    p.set_defaults(func=_proxy_traces)


def _proxy_eval(args: argparse.Namespace) -> int:
    from thinfer.dynts.proxy_eval import run_proxy_eval

    if args.budget < 2 or args.count < 1:
        raise ValueError("--budget must be >= 2 and --count >= 1")
    run_proxy_eval(args)
    return 0


def add_proxy_eval_command(commands: Any) -> None:
    """`thinfer dynts proxy-eval`: accuracy per method on held-out proxy traces."""
    p = commands.add_parser(
        "proxy-eval",
        help="accuracy per compression method on held-out proxy traces",
        description="Replay held-out proxy traces up to the answer prefix with each method's "
        "compression, generate the answer greedily, report accuracy and peak KV (JSON + PNG).",
    )
    p.add_argument("--methods", default="full,window,streamingllm,sepllm,h2o,snapkv,rkv,dynts")
    p.add_argument("--budget", type=int, default=256)
    p.add_argument("--window", type=int, default=64, help="W for DynTS / the uniform trigger")
    p.add_argument("--ratio", type=float, default=0.3)
    p.add_argument("--trigger", default="native", choices=["native", "uniform"])
    p.add_argument(
        "--scoring",
        default="per_head",
        choices=["per_head", "shared"],
        help="H2O/SnapKV/R-KV: keep slots per head (default) or one shared score per token",
    )
    p.add_argument("--predictor", default=None, help="DynTS head (thinfer dynts train)")
    p.add_argument("--count", type=int, default=40, help="held-out traces (default 40)")
    p.add_argument("--seed", type=int, default=1, help="held-out split seed (default 1)")
    p.add_argument("--facts", type=int, default=3)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--model", default=None)
    p.add_argument("--num-kv-blocks", type=int, default=2048)
    p.add_argument("--output-dir", default="bench/results")
    p.set_defaults(func=_proxy_eval)
