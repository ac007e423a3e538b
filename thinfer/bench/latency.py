"""`thinfer bench latency`: time to first token (TTFT) and time per output token (TPOT).

(a) Single requests: each prompt alone through thinfer (its request metrics) and through HF
transformers (TTFT = a `generate` of 1 new token; TPOT = (time of `--max-tokens` new tokens -
TTFT) / (max_tokens - 1)). (b) thinfer under load: all prompts submitted at once, at most
`--max-num-seqs` running together; TTFT then includes the time spent queued.
"""

from __future__ import annotations

import argparse
import time
from typing import TYPE_CHECKING, Any

import numpy as np
from matplotlib.figure import Figure

from thinfer.bench.hf_peer import hf_generate_tokens, llm_device, llm_dtype, load_hf_peer
from thinfer.bench.prompts import bench_prompt_token_ids
from thinfer.bench.report import model_short_name, write_result
from thinfer.sampling_params import SamplingParams

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from thinfer.llm import LLM

PERCENTILES = (50, 90, 99)
WARMUP_TOKENS = 4


def percentiles(values: list[float | None]) -> dict[str, float] | None:
    """p50/p90/p99 and mean of the non-None values (None when there are none)."""
    clean = [v for v in values if v is not None]
    if not clean:
        return None
    stats = {f"p{p}": float(np.percentile(clean, p)) for p in PERCENTILES}
    stats["mean"] = float(np.mean(clean))
    stats["count"] = len(clean)
    return stats


def thinfer_single(llm: LLM, ids: list[list[int]], max_tokens: int) -> dict[str, list]:
    """Each prompt alone through thinfer; per-request TTFT and TPOT in seconds."""
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    ttft, tpot = [], []
    for prompt in ids:
        out = llm.generate([prompt], params)[0]
        ttft.append(out.metrics.time_to_first_token)
        tpot.append(out.metrics.time_per_output_token)
    return {"ttft": ttft, "tpot": tpot}


def hf_single(model: PreTrainedModel, ids: list[list[int]], max_tokens: int) -> dict[str, list]:
    """Each prompt alone through HF `generate`; TTFT and TPOT in seconds."""
    ttft, tpot = [], []
    for prompt in ids:
        first, _ = hf_generate_tokens(model, [prompt], 1, 1)
        ttft.append(first)
        if max_tokens > 1:
            full, _ = hf_generate_tokens(model, [prompt], 1, max_tokens)
            tpot.append(max(full - first, 0.0) / (max_tokens - 1))
        else:
            tpot.append(None)
    return {"ttft": ttft, "tpot": tpot}


def thinfer_loaded(llm: LLM, ids: list[list[int]], max_tokens: int) -> dict[str, Any]:
    """All prompts submitted at once; per-request TTFT/TPOT and overall tokens/s."""
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    start = time.perf_counter()
    outs = llm.generate(ids, params)
    seconds = time.perf_counter() - start
    tokens = sum(len(out.outputs[0].token_ids) for out in outs)
    return {
        "ttft": [out.metrics.time_to_first_token for out in outs],
        "tpot": [out.metrics.time_per_output_token for out in outs],
        "seconds": seconds,
        "tokens": tokens,
        "tokens_per_s": tokens / seconds,
    }


def _ratio(a: dict[str, float] | None, b: dict[str, float] | None) -> float | None:
    if a is None or b is None or not b["p50"]:
        return None
    return a["p50"] / b["p50"]


def run_latency(args: argparse.Namespace) -> dict[str, Any]:
    """Run the latency benchmark, print a summary, write JSON + PNG; return the results."""
    from thinfer.cli_args import llm_kwargs
    from thinfer.llm import LLM

    if args.num_prompts < 1 or args.max_tokens < 1:
        raise ValueError("--num-prompts and --max-tokens must be >= 1")
    llm = LLM(**llm_kwargs(args))  # type: ignore[arg-type]
    ids = bench_prompt_token_ids(llm, args.num_prompts)
    peer = load_hf_peer(llm, args.load_format) if args.peer == "hf" else None

    thinfer_single(llm, ids[:1], WARMUP_TOKENS)
    if peer is not None:
        hf_single(peer, ids[:1], WARMUP_TOKENS)

    single: dict[str, Any] = {}
    raw = thinfer_single(llm, ids, args.max_tokens)
    single["thinfer"] = {k: percentiles(v) for k, v in raw.items()} | {"raw": raw}
    if peer is not None:
        raw = hf_single(peer, ids, args.max_tokens)
        single["hf"] = {k: percentiles(v) for k, v in raw.items()} | {"raw": raw}
        single["ratio_thinfer_over_hf_p50"] = {
            k: _ratio(single["thinfer"][k], single["hf"][k]) for k in ("ttft", "tpot")
        }
    loaded_raw = thinfer_loaded(llm, ids, args.max_tokens)
    loaded = {
        "max_num_seqs": llm.engine.config.max_num_seqs,
        "ttft": percentiles(loaded_raw["ttft"]),
        "tpot": percentiles(loaded_raw["tpot"]),
        "seconds": loaded_raw["seconds"],
        "tokens": loaded_raw["tokens"],
        "tokens_per_s": loaded_raw["tokens_per_s"],
        "raw": {"ttft": loaded_raw["ttft"], "tpot": loaded_raw["tpot"]},
    }
    device = llm_device(llm)
    data: dict[str, Any] = {
        "benchmark": "latency",
        "model": llm.source,
        "load_format": args.load_format,
        "device": str(device),
        "dtype": str(llm_dtype(llm)).removeprefix("torch."),
        "peer": args.peer,
        "num_prompts": args.num_prompts,
        "max_tokens": args.max_tokens,
        "prompt_tokens": [len(p) for p in ids],
        "units": "seconds",
        "single": single,
        "loaded": loaded,
    }
    _print_summary(data)
    name = f"latency_{model_short_name(llm)}_{device.type}"
    json_path, png_path = write_result(name, data, _plot(data), args.output_dir)
    print(f"wrote {json_path} and {png_path}")
    return data


def _fmt(stats: dict[str, float] | None) -> str:
    if stats is None:
        return "n/a"
    return "  ".join(f"p{p} {1000 * stats[f'p{p}']:8.1f} ms" for p in PERCENTILES)


def _series(data: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    series = [("thinfer, single request", data["single"]["thinfer"])]
    if "hf" in data["single"]:
        series.append(("HF transformers, single request", data["single"]["hf"]))
    loaded = data["loaded"]
    series.append(
        (f"thinfer, {data['num_prompts']} at once (max {loaded['max_num_seqs']})", loaded)
    )
    return series


def _print_summary(data: dict[str, Any]) -> None:
    print(f"{data['model']}: {data['num_prompts']} prompts x {data['max_tokens']} tokens")
    for label, stats in _series(data):
        print(f"{label}\n  TTFT {_fmt(stats['ttft'])}\n  TPOT {_fmt(stats['tpot'])}")
    ratios = data["single"].get("ratio_thinfer_over_hf_p50")
    if ratios:
        text = ", ".join(f"{k.upper()} {v:.2f}x" for k, v in ratios.items() if v is not None)
        print(f"thinfer/HF median (lower is better for thinfer): {text}")
    print(f"thinfer under load: {data['loaded']['tokens_per_s']:.1f} tok/s", flush=True)


def _plot(data: dict[str, Any]) -> Figure:
    series = _series(data)
    fig = Figure(figsize=(11, 4.4))
    colors = ["#1f77b4", "#ff7f0e", "#2ca02c"]
    ratios = data["single"].get("ratio_thinfer_over_hf_p50") or {}
    width = 0.8 / len(series)
    for panel, (key, title) in enumerate(
        (("ttft", "Time to first token"), ("tpot", "Time per output token"))
    ):
        ax = fig.add_subplot(1, 2, panel + 1)
        for i, (label, stats) in enumerate(series):
            values = [1000 * stats[key][f"p{p}"] if stats[key] else 0.0 for p in PERCENTILES]
            xs = [x + (i - (len(series) - 1) / 2) * width for x in range(len(PERCENTILES))]
            ax.bar(xs, values, width, label=label, color=colors[i % len(colors)])
        ax.set_xticks(range(len(PERCENTILES)), [f"p{p}" for p in PERCENTILES])
        ax.set_ylabel("milliseconds")
        ratio = ratios.get(key)
        suffix = f"\nthinfer/HF median: {ratio:.2f}x" if ratio is not None else ""
        ax.set_title(title + suffix, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
        if panel == 0:
            handles, labels = ax.get_legend_handles_labels()
    model = data["model"].rstrip("/").split("/")[-1]
    fig.suptitle(
        f"Latency: {model} on {data['device']}, {data['num_prompts']} prompts x "
        f"{data['max_tokens']} tokens",
        fontsize=11,
    )
    fig.legend(handles, labels, loc="lower center", ncol=len(series), fontsize=9)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    return fig
