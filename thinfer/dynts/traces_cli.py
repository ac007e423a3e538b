"""`thinfer dynts traces`: sample reasoning traces with the engine and keep the correct ones."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from thinfer.dynts.traces import DEFAULT_THINK_END


def _traces(args: argparse.Namespace) -> int:
    from thinfer.cli_args import llm_kwargs
    from thinfer.dynts.trace_gen import generate_traces
    from thinfer.dynts.traces import write_traces
    from thinfer.eval.dataset import load_problems
    from thinfer.eval.runner import validate_sampling
    from thinfer.llm import LLM

    validate_sampling(args)
    problems = load_problems(args.dataset, args.limit)
    llm = LLM(**llm_kwargs(args))  # type: ignore[arg-type]
    traces, counts = generate_traces(llm, problems, args)
    write_traces(args.output, traces)
    solved = sum(1 for n in counts.per_problem_kept.values() if n)
    print(
        f"{counts.generated} samples of {len(problems)} problems: {counts.truncated} hit "
        f"--max-tokens, {counts.with_marker} contain {args.think_end!r}, {counts.kept} "
        f"answered correctly after it; kept {counts.kept} traces ({solved} problems) "
        f"-> {args.output}",
        file=sys.stderr,
    )
    if not traces:
        print("thinfer: warning: no trace was kept", file=sys.stderr)
    return 0


def add_traces_command(commands: Any) -> None:
    """`thinfer dynts traces`: training traces from a problem set (JSONL)."""
    from thinfer.cli_args import add_model_args
    from thinfer.eval.cli import add_sampling_args

    p = commands.add_parser(
        "traces",
        help="sample reasoning traces with the engine and keep the correct ones",
        description="Sample every problem k times with the full cache (problem i's sample j "
        "uses seed + i*k + j), keep the samples whose completion contains the think-end "
        "marker and whose answer after it equals the reference (last \\boxed{} or "
        "--answer-pattern, symbolic check), and write them as token-id traces for "
        "`thinfer dynts label`. The problem set is the JSONL of `thinfer eval` "
        "(problem/question/prompt + answer). Traces made elsewhere need no conversion: "
        "`label` reads prompt/completion text or token ids directly.",
    )
    p.add_argument("--dataset", required=True, help="JSONL problems with reference answers")
    p.add_argument("--output", required=True, help="trace JSONL to write")
    add_sampling_args(p, default_samples=4)
    p.add_argument(
        "--think-end",
        default=DEFAULT_THINK_END,
        help=f"marker that ends the thinking (default {DEFAULT_THINK_END!r})",
    )
    add_model_args(p)
    p.set_defaults(func=_traces)
