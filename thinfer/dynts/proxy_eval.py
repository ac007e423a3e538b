"""Accuracy per compression method on held-out proxy traces (replay + short greedy answer).

Each trace is replayed through the decode path up to and including the answer prefix
("... The code of Alpha is") with the method's compression active, then `ANSWER_TOKENS`
tokens are generated greedily and the number is compared. All traces of a method run as one
batch; the peak KV length of each request is the engine's `RequestMetrics.peak_kv_slots`
(slots held at any time, counting the token being written, before any eviction).
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from thinfer.bench.report import write_result  # noqa: E402
from thinfer.compression.config import needs_predictor, scoring_field  # noqa: E402
from thinfer.dynts.proxy import ANSWER_TOKENS, ProxyProblem, is_correct, make_problems  # noqa: E402
from thinfer.dynts.traces import think_end_ids  # noqa: E402
from thinfer.llm import LLM  # noqa: E402
from thinfer.sampling_params import SamplingParams  # noqa: E402


def method_config(args: argparse.Namespace, method: str, marker: list[int]) -> dict | None:
    """The kv_compression dict of `method` at the shared budget (None for the full cache)."""
    if method == "full":
        return None
    config: dict[str, Any] = {"method": method, "budget": args.budget, "trigger": args.trigger}
    if args.trigger == "uniform" or needs_predictor(method):
        config.update(window=args.window, ratio=args.ratio)
    if needs_predictor(method):
        config.update(predictor=args.predictor, think_end_token_ids=tuple(marker))
    config.update(scoring_field(method, getattr(args, "scoring", "per_head")))
    return config


def check_predictor(methods: list[str], predictor: str | None) -> None:
    """ValueError when a method of `methods` scores with a DynTS head and none is given."""
    wanting = [m for m in methods if needs_predictor(m)]
    if wanting and not predictor:
        raise ValueError(
            f"--methods includes {', '.join(wanting)}: give the trained head with --predictor"
        )


def result_name(prefix: str, args: argparse.Namespace) -> str:
    """`{prefix}_{trigger}_b{budget}`, with `_shared` under shared scoring."""
    shared = "_shared" if getattr(args, "scoring", "per_head") == "shared" else ""
    return f"{prefix}_{args.trigger}_b{args.budget}{shared}"


def replay_params(problem: ProxyProblem, config: dict | None) -> SamplingParams:
    """The request that grades `problem` under `config`: its completion forced up to the
    answer prefix, then ANSWER_TOKENS greedy tokens (EOS ignored)."""
    forced = problem.trace.completion_token_ids[: problem.answer_prefix_end]
    return SamplingParams(
        max_tokens=len(forced) + ANSWER_TOKENS,
        temperature=0.0,
        ignore_eos=True,
        forced_tokens=forced,
        kv_compression=config,
    )


def run_method(llm: LLM, problems: list[ProxyProblem], config: dict | None) -> dict[str, Any]:
    """Replay every problem under `config`; accuracy, peak KV lengths and time."""
    engine = llm.engine
    ids = {}
    for i, p in enumerate(problems):
        params = replay_params(p, config)
        ids[engine.add_request(p.trace.prompt_token_ids, params, request_id=f"p{i}")] = i
    texts: dict[int, str] = {}
    peak: dict[int, int] = {}
    started = time.perf_counter()
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                index = ids[out.request_id]
                answer = out.outputs[0].token_ids[problems[index].answer_prefix_end :]
                texts[index] = llm.tokenizer.decode(answer)
                peak[index] = out.metrics.peak_kv_slots
    seconds = time.perf_counter() - started
    correct = [is_correct(p, texts[i]) for i, p in enumerate(problems)]
    return {
        "kv_compression": config,
        "accuracy": sum(correct) / len(correct),
        "correct": correct,
        "answers": [texts[i].strip() for i in range(len(problems))],
        "mean_peak_kv": sum(peak.values()) / len(peak),
        "max_peak_kv": max(peak.values()),
        "seconds": round(seconds, 1),
    }


def run_proxy_eval(args: argparse.Namespace) -> dict[str, Any]:
    """Evaluate `args.methods` on `args.count` held-out problems; write JSON + PNG."""
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    check_predictor(methods, args.predictor)
    llm = LLM(model=args.model, max_num_seqs=args.count, num_kv_blocks=args.num_kv_blocks)
    assert llm.tokenizer is not None
    marker = think_end_ids(llm.tokenizer)
    problems = make_problems(
        llm.tokenizer, args.count, args.seed, num_facts=args.facts, num_steps=args.steps
    )
    results = {}
    for method in methods:
        results[method] = run_method(llm, problems, method_config(args, method, marker))
        r = results[method]
        print(f"{method:>13}: accuracy {r['accuracy']:.3f}, mean peak KV {r['mean_peak_kv']:.0f}")
    lengths = [len(p.trace.token_ids) for p in problems]
    record = {
        "benchmark": "dynts_proxy_accuracy",
        "model": llm.source,
        "split": {"count": args.count, "seed": args.seed, "facts": args.facts, "steps": args.steps},
        "mean_trace_tokens": sum(lengths) / len(lengths),
        "budget": args.budget,
        "window": args.window,
        "ratio": args.ratio,
        "trigger": args.trigger,
        "scoring": getattr(args, "scoring", "per_head"),
        "predictor": args.predictor,
        "methods": results,
    }
    name = result_name("dynts_proxy_accuracy", args)
    write_result(name, record, _plot(record), args.output_dir)
    return record


def _plot(record: dict[str, Any]) -> plt.Figure:
    names = list(record["methods"])
    accuracy = [record["methods"][m]["accuracy"] for m in names]
    peak = [record["methods"][m]["mean_peak_kv"] for m in names]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.bar(names, accuracy, color="tab:blue", alpha=0.8)
    ax.set_ylabel("accuracy (held-out proxy traces)")
    ax.set_ylim(0, 1)
    twin = ax.twinx()
    twin.plot(names, peak, color="tab:red", marker="o")
    twin.set_ylabel("mean peak KV length (slots)", color="tab:red")
    twin.set_ylim(0, max(peak) * 1.15)
    ax.set_title(
        f"proxy task, {record['split']['count']} traces of ~{record['mean_trace_tokens']:.0f} "
        f"tokens, budget {record['budget']}"
    )
    fig.tight_layout()
    return fig
