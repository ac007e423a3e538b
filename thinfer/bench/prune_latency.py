"""`thinfer bench prune-latency`: throughput against latency over batch sizes for a dense
model and its pruned variants, thinfer and HF transformers `generate` in the same run (the
seed figure of Shortened LLaMA, arXiv 2402.02834).

One point: the same prompt of exactly `in` token ids repeated M times, exactly `out` new
tokens each (greedy, EOS ignored); latency = wall time of the whole batch, throughput =
M x out / latency. Per variant, thinfer runs all its points on one engine (KV cache for
max(M) x (max in + max out) tokens, the whole prefill in one step), is freed, then the HF
peer runs its points, so each engine has the device to itself. A sweep over M stops at the
first out-of-memory (that M and larger are "oom") and after the first point slower than
--max-seconds (larger M are "skipped: time"). Warm-up: a tiny generate per engine; on CUDA
also 2 tokens at each M before it is timed (thinfer captures a CUDA graph per batch size).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter

from thinfer.bench.decode_timing import free_device_memory, parse_positive_ints, synthetic_prompts
from thinfer.bench.hf_peer import hf_generate_tokens
from thinfer.bench.prompts import bench_prompts
from thinfer.bench.prune_variants import builders, param_count, shape
from thinfer.bench.report import DEFAULT_OUTPUT_DIR, safe_name, write_result
from thinfer.config import resolve_dtype
from thinfer.sampling_params import SamplingParams

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from thinfer.engine.factory import LoadedModel
    from thinfer.llm import LLM

Timer = Callable[[list[list[int]], int], float]  # (prompts, new tokens) -> seconds


def is_oom(exc: BaseException) -> bool:
    """True for `torch.OutOfMemoryError` and RuntimeErrors that say "out of memory"."""
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def make_prompt(loaded: LoadedModel, length: int) -> list[int]:
    """Exactly `length` token ids: a real sentence repeated and cut (random ids without a
    tokenizer)."""
    if loaded.tokenizer is None:
        return synthetic_prompts(loaded.config.vocab_size, 1, length)[0]
    ids = loaded.tokenizer.encode(bench_prompts(1)[0] + " ", add_special_tokens=False)
    return (ids * (length // len(ids) + 1))[:length]


@dataclass(frozen=True)
class Grid:
    """The points to measure: a prompt per input length, the (input, output) length pairs,
    the batch sizes M (ascending), and the --max-seconds stopping time."""

    prompts: dict[int, list[int]]
    pairs: list[tuple[int, int]]
    sizes: list[int]
    max_seconds: float


def sweep(timer: Timer, grid: Grid, fits: int, label: str) -> dict[str, dict[str, Any]]:
    """Time every (pair, M) of `grid` with `timer`; key "in_out_M". M above `fits` (no KV
    cache for it) is "oom"; see the module doc for the stopping rules."""
    results: dict[str, dict[str, Any]] = {}
    for n, out in grid.pairs:
        stop: str | None = None
        for m in grid.sizes:
            key = f"{n}_{out}_{m}"
            if m > fits:
                results[key] = {"status": "oom", "error": f"no KV cache for {m} sequences"}
                continue
            if stop is not None:
                results[key] = {"status": stop}
                continue
            try:
                seconds = timer([list(grid.prompts[n]) for _ in range(m)], out)
            except RuntimeError as exc:
                if not is_oom(exc):
                    raise
                stop = "oom"
                results[key] = {"status": "oom", "error": str(exc).strip().split("\n")[0][:300]}
                print(f"{label}: in {n} out {out} M {m}: out of memory", flush=True)
                continue
            rate = m * out / seconds
            results[key] = {"status": "ok", "latency_s": seconds, "throughput_tokens_per_s": rate}
            print(f"{label}: in {n} out {out} M {m}: {seconds:.2f} s, {rate:.1f} tok/s", flush=True)
            if seconds > grid.max_seconds:
                stop = "skipped: time"
    return results


def _greedy(tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)


def _thinfer_timer(llm: LLM | None, per_point: bool) -> Timer:
    def timer(batch: list[list[int]], out: int) -> float:
        assert llm is not None, "no engine: sweep() times no M above fits = 0"
        if per_point:
            llm.generate(batch, _greedy(2))
        started = time.perf_counter()
        outs = llm.generate(batch, _greedy(out))
        seconds = time.perf_counter() - started
        if any(len(o.outputs[0].token_ids) != out for o in outs):
            raise RuntimeError("thinfer stopped before max_tokens")
        return seconds

    return timer


def _engine(model: LoadedModel, grid: Grid) -> tuple[LLM | None, int]:
    """An engine for the largest M of `grid` whose KV cache (M x (longest prompt + longest
    output)) fits, and that M; (None, 0) if none fits."""
    from thinfer.llm import LLM

    longest = max(grid.prompts)
    per_seq = -(-(longest + max(out for _, out in grid.pairs)) // 16)  # KV blocks of 16
    for cap in sorted(grid.sizes, reverse=True):
        try:
            llm = LLM(
                model,
                max_num_seqs=cap,
                num_kv_blocks=cap * per_seq + 2,  # 2 spare
                block_size=16,
                max_num_batched_tokens=max(cap * longest, 2048),  # one prefill step
            )
            return llm, cap
        except RuntimeError as exc:
            if not is_oom(exc):
                raise
            free_device_memory(model.device)
    return None, 0


def thinfer_points(loaded: LoadedModel, grid: Grid, label: str) -> dict[str, Any]:
    """thinfer's sweep on one engine sized for the largest M whose KV cache fits."""
    llm, fits = _engine(loaded, grid)
    if llm is not None:
        llm.generate([grid.prompts[min(grid.prompts)]], _greedy(2))  # warm-up
    timer = _thinfer_timer(llm, loaded.device.type == "cuda")
    try:
        return sweep(timer, grid, fits, f"{label} thinfer")
    finally:
        del llm, timer
        free_device_memory(loaded.device)


def hf_points(model: PreTrainedModel, grid: Grid, label: str) -> dict[str, Any]:
    """The HF peer's sweep: `generate` of the whole batch at once (`hf_generate_tokens`)."""
    per_point = model.device.type == "cuda"

    def timer(batch: list[list[int]], out: int) -> float:
        if per_point:
            hf_generate_tokens(model, batch, len(batch), 2)
        return hf_generate_tokens(model, batch, len(batch), out)[0]

    hf_generate_tokens(model, [grid.prompts[min(grid.prompts)]], 1, 2)  # warm-up
    return sweep(timer, grid, max(grid.sizes), f"{label} HF")


def run_prune_latency(args: argparse.Namespace) -> dict[str, Any]:
    """Sweep every variant with both engines, print each point, write JSON + PNG after each
    variant ("complete" once all are done); return the data."""
    sizes = sorted(set(parse_positive_ints(args.batch_sizes, "--batch-sizes")))
    lens = parse_positive_ints(args.input_lens, "--input-lens")
    outs = parse_positive_ints(args.output_lens, "--output-lens")
    if args.max_seconds <= 0:
        raise ValueError(f"--max-seconds must be positive, got {args.max_seconds}")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = resolve_dtype(args.dtype, device)
    pairs = [(n, out) for n in lens for out in outs]
    variants = builders(args.preset, args.remove_blocks, args.models, dtype, device, args.seed)
    kind = "gpu" if device.type == "cuda" else "cpu"
    name = f"prune_latency_{kind}_{safe_name(args.preset or '-'.join(v[0] for v in variants))}"
    data: dict[str, Any] = {
        "benchmark": "prune_latency",
        "preset": args.preset,
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "batch_sizes": sizes,
        "input_lens": lens,
        "output_lens": outs,
        "max_seconds": args.max_seconds,
        "notes": "latency_s: wall time of the M-prompt batch; ratio: thinfer / HF throughput",
        "variants": {},
    }
    for label, build, build_hf in variants:
        loaded = build()
        cfg, source = loaded.config, loaded.source
        grid = Grid({n: make_prompt(loaded, n) for n in lens}, pairs, sizes, args.max_seconds)
        ours = thinfer_points(loaded, grid, label)
        del loaded
        free_device_memory(device)
        peer = build_hf()
        theirs = hf_points(peer, grid, label)
        del peer
        free_device_memory(device)
        dense = next(iter(data["variants"].values()), {"parameters": param_count(cfg)})
        data["variants"][label] = {
            "source": source,
            "parameters": param_count(cfg),
            "parameters_vs_first": param_count(cfg) / dense["parameters"],
            "shape": shape(cfg),
            "points": _merge(ours, theirs, grid),
        }
        data["complete"] = len(data["variants"]) == len(variants)
        json_path, png_path = write_result(name, data, plot_prune_latency(data), args.output_dir)
    print(f"wrote {json_path} and {png_path}")
    return data


def _merge(ours: dict[str, Any], theirs: dict[str, Any], grid: Grid) -> list[dict[str, Any]]:
    """One point per (pair, M): both engines' results and the throughput ratio."""
    points = []
    for n, out in grid.pairs:
        for m in grid.sizes:
            a, b = ours[f"{n}_{out}_{m}"], theirs[f"{n}_{out}_{m}"]
            both = a["status"] == b["status"] == "ok"
            ratio = a["throughput_tokens_per_s"] / b["throughput_tokens_per_s"] if both else None
            point = dict(input_len=n, output_len=out, batch_size=m, thinfer=a, hf=b, ratio=ratio)
            points.append(point)
    return points


def plot_prune_latency(data: dict[str, Any]) -> Figure:
    """One panel per (input, output) length: throughput against latency, log-log; a colour
    per variant, thinfer solid, HF dashed, each point labelled with its batch size M."""
    lens, outs = data["input_lens"], data["output_lens"]
    fig = Figure(figsize=(5.4 * len(outs), 4.4 * len(lens)), layout="constrained")
    plain = FuncFormatter(lambda v, _: f"{v:g}" if f"{v:.0e}"[0] in "125" else "")
    note: dict[str, Any] = dict(textcoords="offset points", xytext=(3, 3), fontsize=7)
    for row, n in enumerate(lens):
        for col, out in enumerate(outs):
            ax = fig.add_subplot(len(lens), len(outs), row * len(outs) + col + 1)
            for i, (label, variant) in enumerate(data["variants"].items()):
                pts = [
                    p for p in variant["points"] if p["input_len"] == n and p["output_len"] == out
                ]
                for engine, style in (("thinfer", "o-"), ("hf", "s--")):
                    ok = [p for p in pts if p[engine]["status"] == "ok"]
                    xs = [p[engine]["latency_s"] for p in ok]
                    ys = [p[engine]["throughput_tokens_per_s"] for p in ok]
                    name = "thinfer" if engine == "thinfer" else "HF"
                    ax.plot(xs, ys, style, color=f"C{i}", label=f"{label} ({name})", markersize=4)
                    for p, x, y in zip(ok, xs, ys):
                        ax.annotate(str(p["batch_size"]), (x, y), **note, color=f"C{i}")
            for axis, scale in ((ax.xaxis, ax.set_xscale), (ax.yaxis, ax.set_yscale)):
                scale("log")
                axis.set_major_formatter(plain), axis.set_minor_formatter(plain)
            ax.set_xlabel("latency (s)")
            ax.set_ylabel("throughput (tokens/s)")
            ax.set_title(f"input {n}, output {out} tokens", fontsize=10)
            ax.grid(True, which="both", alpha=0.3)
            if row == col == 0:
                ax.legend(fontsize=7)
    model = data["preset"] or ", ".join(data["variants"])
    fig.suptitle(
        f"Throughput vs latency over batch size M: {model} ({data['dtype']}, "
        f"{data['device']})\nsolid: thinfer, dashed: HF generate; labels: M"
    )
    return fig


def add_parser(kinds: Any) -> None:
    """Register `thinfer bench prune-latency`."""
    pl = kinds.add_parser(
        "prune-latency",
        help="throughput vs latency over batch sizes: dense vs pruned, thinfer vs HF",
        description="The Shortened LLaMA figure: the same prompt M times, exactly --output-lens "
        "new tokens (greedy, EOS ignored), latency of the whole batch and M x out / latency, "
        "for each variant with thinfer and HF generate. --models: checkpoints (NAME=PATH, an "
        "empty PATH is the embedded model); --preset: dense, depth and width shapes of a "
        "preset with dummy weights.",
    )
    which = pl.add_mutually_exclusive_group(required=True)
    which.add_argument("--models", nargs="+", metavar="NAME=PATH", help="checkpoints to compare")
    which.add_argument("--preset", help="dummy preset (e.g. llama-2-7b): dense, depth, width")
    blocks = "--preset: blocks that depth removes (default 9/32, 11/40, else 28%%)"
    pl.add_argument("--remove-blocks", type=int, default=None, help=blocks)
    pl.add_argument("--batch-sizes", default="1,8,16,32,64,128,256,384")
    pl.add_argument("--input-lens", default="12,82", help="prompt tokens, comma-separated")
    pl.add_argument("--output-lens", default="128,512", help="new tokens, comma-separated")
    pl.add_argument("--max-seconds", type=float, default=120.0, help="stop after a slower point")
    pl.add_argument("--dtype", default="auto", help="auto: bf16 on cuda, fp32 on cpu")
    pl.add_argument("--device", default=None, help="default: cuda if available")
    pl.add_argument("--seed", type=int, default=0, help="dummy weights' seed")
    pl.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    pl.add_argument("--output-dir", default=str(DEFAULT_OUTPUT_DIR))
    pl.set_defaults(func=lambda args: 0 if run_prune_latency(args) else 1)
