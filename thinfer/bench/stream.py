"""`thinfer bench stream`: the per-step cost of streamed outputs over one long stream.

One request of `--tokens` greedy tokens (EOS ignored, `logprobs=1`) is streamed through
`LLM.stream` twice in one process: with delta outputs (`RequestOutputKind.DELTA`, the
default: each output carries what is new) and with cumulative outputs (`CUMULATIVE`: every
output copies the full token ids and logprobs, the engine's former behaviour) as the peer.
Per step it records the time outside the model forward: building the step's outputs
(`StepStats.output_seconds`) plus delivering them (the wall time of the stream's `next`
minus the engine step). Delta outputs cost the same at every position; cumulative ones grow
with the position (quadratic over the stream).

The default model is the "tiny" dummy preset, so the forward is cheap and the run takes a
few minutes on 2 CPU cores; a dummy model's context is extended to prompt + tokens when
needed (16384 tokens exceed the default SmolLM2's 8192). A dummy model has no tokenizer, so
the copied lists are token ids and logprobs (no text).
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import TYPE_CHECKING, Any

from matplotlib.figure import Figure

from thinfer.bench.report import model_short_name, write_result
from thinfer.outputs import RequestOutputKind
from thinfer.sampling_params import SamplingParams

if TYPE_CHECKING:
    from thinfer.llm import LLM

MODES = {"delta": RequestOutputKind.DELTA, "cumulative": RequestOutputKind.CUMULATIVE}
COLORS = {"delta": "#1f77b4", "cumulative": "#d62728"}
NUM_BINS = 64


def stream_costs(llm: LLM, prompt: list[int], tokens: int, kind: RequestOutputKind) -> list[float]:
    """Stream one request; seconds outside the model forward of each step (index i = the
    output carrying token i+1)."""
    params = SamplingParams(
        max_tokens=tokens, temperature=0.0, ignore_eos=True, logprobs=1, output_kind=kind
    )
    engine, costs = llm.engine, []
    stream = llm.stream(prompt, params)
    final = None
    while True:
        start = time.perf_counter()
        out = next(stream, None)
        waited = time.perf_counter() - start
        if out is None:
            break
        stats = engine.last_stats
        assert stats is not None
        costs.append(stats.output_seconds + max(0.0, waited - stats.seconds))
        final = out
    if final is None or len(final.outputs[0].token_ids) != tokens or len(costs) != tokens:
        raise RuntimeError(f"the stream did not deliver {tokens} tokens in {tokens} outputs")
    return costs


def bin_costs(costs: list[float], num_bins: int) -> dict[str, list[float]]:
    """Median and mean cost (microseconds) over `num_bins` equal ranges of positions."""
    size = max(1, len(costs) // num_bins)
    positions, medians, means = [], [], []
    for start in range(0, len(costs), size):
        chunk = costs[start : start + size]
        positions.append(start + len(chunk) / 2)
        medians.append(round(statistics.median(chunk) * 1e6, 2))
        means.append(round(statistics.fmean(chunk) * 1e6, 2))
    return {"position": positions, "median_us": medians, "mean_us": means}


def _edge_median(costs: list[float], last: bool) -> float:
    """Median cost (microseconds) of the first or last tenth of the positions."""
    tenth = max(1, len(costs) // 10)
    part = costs[-tenth:] if last else costs[:tenth]
    return round(statistics.median(part) * 1e6, 2)


def run_stream(args: argparse.Namespace) -> dict[str, Any]:
    """Run the stream benchmark, print a summary, write JSON + PNG; return the results."""
    from thinfer.bench.decode_timing import build_bench_llm
    from thinfer.bench.hf_peer import llm_device
    from thinfer.llm import LLM

    if args.tokens < 2 or args.prompt_len < 1:
        raise ValueError("--tokens must be >= 2 and --prompt-len >= 1")
    need = args.prompt_len + args.tokens
    base, original_context = build_bench_llm(args, need)
    blocks = -(-need // 16) + 1
    llm = LLM(
        base.loaded,
        num_kv_blocks=blocks,
        max_num_seqs=1,
        max_model_len=need,
        seed=args.seed,
        attention_backend=args.attention_backend,
        cuda_graphs=args.cuda_graphs,
    )
    del base
    vocab = llm.model_config.vocab_size
    prompt = [(7 * i + 3) % vocab for i in range(args.prompt_len)]
    stream_costs(llm, prompt, min(args.tokens, 32), RequestOutputKind.DELTA)  # warm-up
    print(f"{llm.source}: one stream of {args.tokens} tokens, delta vs cumulative", flush=True)
    runs: dict[str, Any] = {}
    for name, kind in MODES.items():
        costs = stream_costs(llm, prompt, args.tokens, kind)
        runs[name] = {
            "first_tenth_median_us": _edge_median(costs, last=False),
            "last_tenth_median_us": _edge_median(costs, last=True),
            "total_seconds": round(sum(costs), 4),
            "binned": bin_costs(costs, NUM_BINS),
        }
        r = runs[name]
        print(
            f"{name:>10}: {r['first_tenth_median_us']:8.1f} us/step in the first tenth, "
            f"{r['last_tenth_median_us']:8.1f} us/step in the last, {r['total_seconds']:.3f} s",
            flush=True,
        )
    delta, cumulative = runs["delta"], runs["cumulative"]
    summary = {
        "delta_growth": round(delta["last_tenth_median_us"] / delta["first_tenth_median_us"], 3),
        "cumulative_growth": round(
            cumulative["last_tenth_median_us"] / cumulative["first_tenth_median_us"], 3
        ),
        "cumulative_over_delta_last_tenth": round(
            cumulative["last_tenth_median_us"] / delta["last_tenth_median_us"], 3
        ),
        "cumulative_over_delta_total": round(
            cumulative["total_seconds"] / delta["total_seconds"], 3
        ),
    }
    print(
        f"last tenth: cumulative / delta = {summary['cumulative_over_delta_last_tenth']:.2f}x; "
        f"growth first -> last tenth: delta {summary['delta_growth']:.2f}x, "
        f"cumulative {summary['cumulative_growth']:.2f}x"
    )
    device = llm_device(llm)
    data: dict[str, Any] = {
        "benchmark": "stream",
        "model": llm.source,
        "load_format": args.load_format,
        "context_extended_from": original_context,
        "device": str(device),
        "tokens": args.tokens,
        "prompt_tokens": args.prompt_len,
        "logprobs": 1,
        "num_bins": NUM_BINS,
        "notes": {
            "cost": "per step: building the step's outputs (StepStats.output_seconds) + "
            "delivering them through LLM.stream (wall time of next() minus the engine step)",
            "delta": "RequestOutputKind.DELTA: outputs carry what is new; the final one the "
            "full lists",
            "cumulative": "RequestOutputKind.CUMULATIVE: every output copies the full token "
            "ids and logprobs (the former behaviour)",
            "edges": "median over the first / last tenth of the positions",
        },
        "runs": runs,
        "summary": summary,
    }
    name = f"stream_{model_short_name(llm)}_{device.type}"
    json_path, png_path = write_result(name, data, _plot(data), args.output_dir)
    print(f"wrote {json_path} and {png_path}")
    return data


def _plot(data: dict[str, Any]) -> Figure:
    fig = Figure(figsize=(7.5, 4.5))
    ax = fig.add_subplot(1, 1, 1)
    for name, run in data["runs"].items():
        binned = run["binned"]
        ax.plot(binned["position"], binned["median_us"], color=COLORS[name], label=name)
    ax.set_ylim(0, None)
    ax.set_xlabel("position in the stream (generated tokens)")
    ax.set_ylabel("output build + delivery per step (us, median per bin)")
    s = data["summary"]
    model = data["model"].rstrip("/").split("/")[-1]
    ax.set_title(
        f"Streaming {data['tokens']} tokens ({model}, {data['device']}): last tenth "
        f"cumulative / delta = {s['cumulative_over_delta_last_tenth']:.1f}x",
        fontsize=10,
    )
    ax.legend(loc="upper left")
    ax.grid(alpha=0.3)
    return fig
