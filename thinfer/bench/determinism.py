"""`thinfer bench determinism`: what the deterministic mode costs and what it buys.

Cost: tokens/s of batch generation (greedy, EOS ignored) per batch size, with and without
`deterministic=True`, on the same loaded model in the same run (the ratio is the cost).
Benefit (Thinking Machines' "1000 runs" experiment): one prompt generated N times, each time
beside a random set of batch mates (random count, prompts and lengths, random place in the
arrival order), in each mode; counted are the distinct completions (token ids) and the
distinct logprob sequences (bitwise). The deterministic mode must give one of each.

Engines are rebuilt before each measurement: the mode is set on the shared model's layers
when an engine is built (`thinfer.engine.factory.build_engine`).
"""

from __future__ import annotations

import argparse
import math
import random
import time
from typing import TYPE_CHECKING, Any

from matplotlib.figure import Figure

from thinfer.bench.prompts import tokenize_bench_prompts
from thinfer.bench.report import model_short_name, write_result
from thinfer.sampling_params import SamplingParams

if TYPE_CHECKING:
    from thinfer.llm import LLM

MODES = {"default": False, "deterministic": True}


def _engine(base: LLM, deterministic: bool, args: argparse.Namespace, seqs: int) -> LLM:
    from thinfer.llm import LLM

    return LLM(
        base.loaded,
        max_num_seqs=seqs,
        num_kv_blocks=args.num_kv_blocks,
        max_num_batched_tokens=args.max_num_batched_tokens,
        deterministic=deterministic,
    )


def _prompts(base: LLM, count: int) -> list[list[int]]:
    """The benchmark prompts as token ids (random ids for a model without a tokenizer)."""
    return tokenize_bench_prompts(base.tokenizer, base.model_config.vocab_size, count)


def measure_throughput(base: LLM, args: argparse.Namespace, batch: int) -> dict[str, float]:
    """tokens/s per mode for `batch` prompts of `args.output_len` new tokens each."""
    prompts = _prompts(base, batch)
    params = SamplingParams(max_tokens=args.output_len, temperature=0.0, ignore_eos=True)
    result: dict[str, float] = {}
    for mode, flag in MODES.items():
        llm = _engine(base, flag, args, batch)
        llm.generate(prompts[:1], SamplingParams(max_tokens=2))  # warm-up
        started = time.perf_counter()
        llm.generate(prompts, params)
        result[mode] = batch * args.output_len / (time.perf_counter() - started)
    return result


def count_distinct(base: LLM, args: argparse.Namespace, flag: bool) -> dict[str, int]:
    """Distinct completions and logprob sequences of one prompt over `args.runs` runs with
    random batch mates (the same draws in both modes: seeded by `args.seed`), or over the
    runs done in `args.runs_budget_s / 2` seconds when that is set (then `runs` says how
    many)."""
    deadline = math.inf if args.runs_budget_s is None else args.runs_budget_s / 2
    started = time.perf_counter()
    done = 0
    draw = random.Random(args.seed)
    *pool, target = _prompts(base, 25)
    greedy = SamplingParams(
        max_tokens=args.completion_len, temperature=0.0, logprobs=0, ignore_eos=True
    )
    llm = _engine(base, flag, args, args.max_mates + 1)
    completions: set[tuple[int, ...]] = set()  # the target is the last benchmark prompt
    logprobs: set[tuple[float, ...]] = set()
    while done < args.runs and time.perf_counter() - started < deadline:
        done += 1
        mates = draw.sample(pool, draw.randint(0, args.max_mates))
        place = draw.randint(0, len(mates))
        prompts = mates[:place] + [target] + mates[place:]
        params = [
            SamplingParams(max_tokens=draw.randint(1, 2 * args.completion_len), ignore_eos=True)
            for _ in mates
        ]
        params.insert(place, greedy)
        out = llm.generate(prompts, params)[place].outputs[0]
        completions.add(tuple(out.token_ids))
        logprobs.add(tuple(next(iter(step.values())) for step in out.logprobs or []))
    return {
        "runs": done,
        "distinct_completions": len(completions),
        "distinct_logprobs": len(logprobs),
    }


def run_determinism(args: argparse.Namespace) -> dict[str, Any]:
    """Run both measurements, print them, write JSON + PNG; return the data."""
    from thinfer.llm import LLM

    sizes = [int(s) for s in args.batch_sizes.split(",")]
    if any(s < 1 for s in sizes) or args.runs < 1 or args.max_mates < 0:
        raise ValueError("batch sizes and --runs must be >= 1, --max-mates >= 0")
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    base = LLM(args.model, load_format=args.load_format, dtype=args.dtype, device=args.device)
    data: dict[str, Any] = {
        "benchmark": "determinism",
        "model": base.source,
        "device": str(next(base.engine.model.parameters()).device),
        "output_len": args.output_len,
        "throughput_tokens_per_s": {},
        "runs": args.runs,
        "runs_budget_s": args.runs_budget_s,
        "completion_len": args.completion_len,
        "max_mates": args.max_mates,
        "distinct": {},
    }
    name = f"determinism_{model_short_name(base)}_{data['device'].split(':')[0]}"
    for batch in sizes:  # the record is rewritten after every part: a cut run keeps the rest
        row = measure_throughput(base, args, batch)
        row["ratio"] = row["deterministic"] / row["default"]
        data["throughput_tokens_per_s"][str(batch)] = row
        print(
            f"batch {batch}: default {row['default']:.1f} tok/s, deterministic "
            f"{row['deterministic']:.1f} tok/s ({row['ratio']:.2f}x)",
            flush=True,
        )
        write_result(name, data, _plot(data), args.output_dir)
    for mode, flag in MODES.items():
        counts = data["distinct"][mode] = count_distinct(base, args, flag)
        print(f"{mode}: {counts}", flush=True)
        json_path, png_path = write_result(name, data, _plot(data), args.output_dir)
    print(f"wrote {json_path} and {png_path}")
    return data


def _plot(data: dict[str, Any]) -> Figure:
    fig = Figure(figsize=(10, 3.8))
    ax = fig.add_subplot(1, 2, 1)
    sizes = list(data["throughput_tokens_per_s"])
    for offset, mode in ((-0.2, "default"), (0.2, "deterministic")):
        values = [data["throughput_tokens_per_s"][b][mode] for b in sizes]
        ax.bar([i + offset for i in range(len(sizes))], values, width=0.4, label=mode)
    for i, b in enumerate(sizes):
        row = data["throughput_tokens_per_s"][b]
        ax.annotate(f"{row['ratio']:.2f}x", (i + 0.2, row["deterministic"]), ha="center")
    ax.set_xticks(range(len(sizes)), [f"batch {b}" for b in sizes])
    ax.set_ylabel("tokens/s")
    ax.legend(fontsize=8)
    ax = fig.add_subplot(1, 2, 2)
    modes = list(data["distinct"])
    for offset, key in ((-0.2, "distinct_completions"), (0.2, "distinct_logprobs")):
        values = [data["distinct"][m][key] for m in modes]
        ax.bar([i + offset for i in range(len(modes))], values, width=0.4, label=key)
    ax.set_xticks(range(len(modes)), modes)
    runs = sorted({data["distinct"][m]["runs"] for m in modes})
    ax.set_ylabel(f"distinct over {'/'.join(map(str, runs))} runs")
    ax.legend(fontsize=8)
    fig.suptitle(f"Deterministic mode: {data['model'].split('/')[-1]} ({data['device']})")
    return fig


def add_parser(kinds: Any) -> None:
    """Register `thinfer bench determinism`."""
    det = kinds.add_parser(
        "determinism",
        help="cost (tokens/s ratio) and effect (distinct completions) of --deterministic",
        description="tokens/s with and without the deterministic mode per batch size, and the "
        "distinct completions / logprobs of one prompt over N runs with random batch mates.",
    )
    det.add_argument("--model", default=None, help="default: the embedded SmolLM2")
    det.add_argument("--load-format", default="auto")
    det.add_argument("--dtype", default="auto")
    det.add_argument("--device", default=None)
    det.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    det.add_argument("--batch-sizes", default="1,16,64")
    det.add_argument("--output-len", type=int, default=64, help="new tokens per prompt")
    det.add_argument("--runs", type=int, default=50, help="runs of the one prompt (GPU: 1000)")
    det.add_argument(
        "--runs-budget-s",
        type=float,
        default=None,
        help="stop the runs after this many seconds (half per mode; default: all --runs)",
    )
    det.add_argument("--completion-len", type=int, default=64)
    det.add_argument("--max-mates", type=int, default=7, help="most batch mates in a run")
    det.add_argument("--num-kv-blocks", type=int, default=2048)
    det.add_argument("--max-num-batched-tokens", type=int, default=512)
    det.add_argument("--seed", type=int, default=0)
    det.add_argument("--output-dir", default="bench/results")
    det.set_defaults(func=lambda args: 0 if run_determinism(args) else 1)
