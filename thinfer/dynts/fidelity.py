"""Fidelity of compression methods on real long text: per-token NLL increase vs full cache.

Each sample is a window of a text file: its first `prompt_tokens` tokens are the prompt, the
rest is forced through the decode path (`SamplingParams.forced_tokens`) with the method's
compression active, and the log-probability of every forced token is read back. The NLL
increase of a method is its mean NLL minus the full cache's on the same tokens. Tokens whose
context still fits the budget cannot differ (nothing is evicted yet), so the increase is also
reported over the tokens after the budget, where it is not diluted.

Every (window, method) request runs in one engine, batched together; the peak KV length of
each request is the engine's `RequestMetrics.peak_kv_slots` (slots held at any time, counting
the token being written, before any eviction).
"""

from __future__ import annotations

import argparse
import glob
import os
import random
from dataclasses import dataclass
from typing import Any

from thinfer.llm import LLM
from thinfer.sampling_params import SamplingParams

POSITION_BUCKET = 128  # tokens per bucket of the NLL-increase-by-position curve


@dataclass
class TextWindow:
    """One sample: where it comes from, its prompt and its forced continuation."""

    name: str
    offset: int  # token offset of the window in its text
    prompt: list[int]
    continuation: list[int]


def text_files(paths: list[str]) -> list[str]:
    """The files named by `paths` (files, directories of *.txt, or glob patterns), sorted."""
    found: list[str] = []
    for path in paths:
        if os.path.isdir(path):
            found += glob.glob(os.path.join(path, "*.txt"))
        elif os.path.isfile(path):
            found.append(path)
        else:
            matches = glob.glob(path)
            if not matches:
                raise ValueError(f"--texts: {path} is not a file, a directory or a pattern")
            found += [m for m in matches if os.path.isfile(m)]
    files = sorted(set(found))
    if not files:
        raise ValueError(f"--texts: no text files in {', '.join(paths)}")
    return files


def make_windows(
    tokenizer: Any, files: list[str], count: int, length: int, prompt_tokens: int, seed: int
) -> list[TextWindow]:
    """`count` windows of `length` tokens, each from a different file (chosen with `seed`) at
    a random offset; files shorter than `length` tokens are passed over."""
    if not 0 < prompt_tokens < length:
        raise ValueError(f"--prompt-tokens must be in [1, {length - 1}], got {prompt_tokens}")
    rng = random.Random(seed)
    order = list(files)
    rng.shuffle(order)
    windows = []
    for path in order:
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                ids = tokenizer.encode(f.read(), add_special_tokens=False)
        except OSError as e:
            raise ValueError(f"--texts: cannot read {path}: {e.strerror}") from e
        if len(ids) < length:
            continue
        offset = rng.randrange(len(ids) - length + 1)
        chunk = ids[offset : offset + length]
        name = os.path.basename(path)
        windows.append(TextWindow(name, offset, chunk[:prompt_tokens], chunk[prompt_tokens:]))
        if len(windows) == count:
            return windows
    raise ValueError(
        f"--texts: only {len(windows)} of the {len(files)} files have {length} tokens; "
        f"--count {count} needs more files or a shorter --length"
    )


def replay_all(
    llm: LLM, windows: list[TextWindow], configs: dict[str, dict | None]
) -> dict[str, dict[str, Any]]:
    """Force every window's continuation under every method; per method, the log-probs of
    each window and each request's peak KV length."""
    engine = llm.engine
    owner: dict[str, tuple[str, int]] = {}
    for method, config in configs.items():
        for i, window in enumerate(windows):
            params = SamplingParams(
                max_tokens=len(window.continuation),
                temperature=0.0,
                ignore_eos=True,
                forced_tokens=window.continuation,
                kv_compression=config if config is not None else {"method": "full"},
            )
            owner[engine.add_request(window.prompt, params, f"{method}-{i}")] = (method, i)
    logprobs: dict[str, list[list[float]]] = {m: [[] for _ in windows] for m in configs}
    peaks: dict[str, list[int]] = {m: [0] * len(windows) for m in configs}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                method, i = owner[out.request_id]
                logprobs[method][i] = list(out.outputs[0].forced_logprobs or [])
                peaks[method][i] = out.metrics.peak_kv_slots
    return {m: {"logprobs": logprobs[m], "peak_kv": peaks[m]} for m in configs}


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def summarize(
    runs: dict[str, dict[str, Any]], windows: list[TextWindow], budget: int
) -> dict[str, dict[str, Any]]:
    """Per method: mean NLL, NLL increase vs `full` (all tokens, after the budget, and by
    position bucket), and peak KV. Token t of a window sits at absolute position
    len(prompt) + t; it is "after the budget" when its context (position) exceeds `budget`."""
    full = runs["full"]["logprobs"]
    summary: dict[str, dict[str, Any]] = {}
    for method, run in runs.items():
        deltas_all: list[float] = []
        deltas_after: list[float] = []
        buckets: dict[int, list[float]] = {}
        for i, window in enumerate(windows):
            for t, (lp, lp_full) in enumerate(zip(run["logprobs"][i], full[i], strict=True)):
                delta = lp_full - lp  # NLL(method) - NLL(full)
                position = len(window.prompt) + t
                deltas_all.append(delta)
                if position > budget:
                    deltas_after.append(delta)
                buckets.setdefault(position // POSITION_BUCKET, []).append(delta)
        nll = [-lp for lps in run["logprobs"] for lp in lps]
        summary[method] = {
            "mean_nll": _mean(nll),
            "nll_increase": _mean(deltas_all),
            "nll_increase_after_budget": _mean(deltas_after),
            "nll_increase_by_position": {
                str(b * POSITION_BUCKET): _mean(v) for b, v in sorted(buckets.items())
            },
            "mean_peak_kv": _mean([float(p) for p in run["peak_kv"]]),
            "max_peak_kv": max(run["peak_kv"]),
        }
    return summary


def run_fidelity(args: argparse.Namespace, llm: LLM | None = None) -> dict[str, Any]:
    """Run `thinfer dynts fidelity`; returns the JSON record (also written with its PNG)."""
    from thinfer.bench.report import write_result
    from thinfer.dynts.fidelity_plot import plot_fidelity
    from thinfer.dynts.proxy_eval import check_predictor, method_config, result_name
    from thinfer.dynts.traces import think_end_ids

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if "full" not in methods:
        methods.insert(0, "full")  # the reference every increase is measured against
    check_predictor(methods, args.predictor)
    files = text_files(args.texts)
    if llm is None:
        llm = LLM(
            model=args.model, max_num_seqs=args.max_num_seqs, num_kv_blocks=args.num_kv_blocks
        )
    if llm.tokenizer is None:
        raise ValueError("this model has no tokenizer")
    windows = make_windows(
        llm.tokenizer, files, args.count, args.length, args.prompt_tokens, args.seed
    )
    marker = think_end_ids(llm.tokenizer)
    configs = {m: method_config(args, m, marker) for m in methods}
    for config in configs.values():
        params = SamplingParams(max_tokens=args.length - args.prompt_tokens, kv_compression=config)
        llm.engine.validate(args.prompt_tokens, params)
    summary = summarize(replay_all(llm, windows, configs), windows, args.budget)
    for method, s in summary.items():
        print(
            f"{method:>13}: NLL {s['mean_nll']:.4f}, increase {s['nll_increase']:+.4f} "
            f"(after budget {s['nll_increase_after_budget']:+.4f}), "
            f"mean peak KV {s['mean_peak_kv']:.0f}"
        )
    record = {
        "benchmark": "kv_compression_fidelity",
        "model": llm.source,
        "texts": {
            "files": len(files),
            "windows": [{"file": w.name, "offset": w.offset} for w in windows],
        },
        "length": args.length,
        "prompt_tokens": args.prompt_tokens,
        "budget": args.budget,
        "window": args.window,
        "ratio": args.ratio,
        "trigger": args.trigger,
        "scoring": getattr(args, "scoring", "per_head"),
        "predictor": args.predictor,
        "methods": summary,
    }
    name = result_name("fidelity_nll", args)
    json_path, png_path = write_result(name, record, plot_fidelity(record), args.output_dir)
    print(f"wrote {json_path} and {png_path}")
    return record
