"""`thinfer bench throughput`: offline batch generation, thinfer versus a peer.

For each batch size, thinfer (continuous batching with `max_num_seqs` = the batch size) and
the peer produce `--max-tokens` greedy tokens, EOS ignored, for the same `--num-prompts`
tokenized prompts. Peers: HF `generate` (static left-padded batches of that size; the
default) or llama.cpp on the same GGUF file (`thinfer.bench.llamacpp_peer`: one sequence at
a time, so the same for every batch size; measured once per batch size all the same).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from matplotlib.figure import Figure

from thinfer.bench.decode_timing import free_device_memory
from thinfer.bench.hf_peer import (
    hf_generate_tokens,
    llm_device,
    load_hf_peer,
    token_agreement,
)
from thinfer.bench.prompts import bench_prompt_token_ids
from thinfer.bench.report import model_short_name, write_result
from thinfer.sampling_params import SamplingParams

if TYPE_CHECKING:
    from thinfer.llm import LLM

WARMUP_PROMPTS = 2
WARMUP_TOKENS = 4
PEER_LABELS = {"hf": "HF transformers", "llama.cpp": "llama.cpp"}


def parse_batch_sizes(text: str) -> list[int]:
    """ "1,16" -> [1, 16]; raises ValueError on anything but positive integers."""
    try:
        sizes = [int(part) for part in text.split(",") if part.strip()]
    except ValueError as exc:
        raise ValueError(f"--batch-sizes: expected comma-separated integers, got {text!r}") from exc
    if not sizes or any(size < 1 for size in sizes):
        raise ValueError(f"--batch-sizes: expected positive integers, got {text!r}")
    return sizes


def thinfer_generate_tokens(
    llm: LLM, prompt_token_ids: list[list[int]], max_tokens: int
) -> tuple[float, list[list[int]]]:
    """Generate with thinfer (at most `llm`'s max_num_seqs at a time); (seconds, ids)."""
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    device = llm_device(llm)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    outputs = llm.generate(prompt_token_ids, params, use_tqdm=False)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    return seconds, [list(out.outputs[0].token_ids) for out in outputs]


def engine_settings(kwargs: dict[str, object]) -> dict[str, object]:
    """`LLM(...)` keyword arguments without those that load the model (model, dtype, device,
    load_format, quantization): what an LLM over an already loaded model takes."""
    loading = ("model", "dtype", "device", "load_format", "quantization")
    return {k: v for k, v in kwargs.items() if k not in loading}


def _entry(tokens: int, seconds: float) -> dict[str, float]:
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds}


def run_throughput(args: argparse.Namespace) -> dict[str, Any]:
    """Run the throughput benchmark, print a table, write JSON + PNG; return the results."""
    from thinfer.cli_args import llm_kwargs
    from thinfer.llm import LLM

    sizes = parse_batch_sizes(args.batch_sizes)
    if args.num_prompts < 1 or args.max_tokens < 1:
        raise ValueError("--num-prompts and --max-tokens must be >= 1")
    kwargs = llm_kwargs(args)
    kwargs["max_num_seqs"] = max(sizes)
    llm = LLM(**kwargs)  # type: ignore[arg-type]
    ids = bench_prompt_token_ids(llm, args.num_prompts)
    peer_run = _peer(llm, args, ids)

    warm = ids[:WARMUP_PROMPTS]
    thinfer_generate_tokens(llm, warm, WARMUP_TOKENS)
    if peer_run is not None:
        peer_run(warm, max(sizes), WARMUP_TOKENS)

    print(f"{llm.source}: {len(ids)} prompts x {args.max_tokens} tokens", flush=True)
    runs = []
    # One engine per batch size, sharing the weights and a KV cache as large as the first's.
    device, loaded = llm_device(llm), llm.loaded
    settings = engine_settings(kwargs) | {"num_kv_blocks": llm.engine.kv_cache.num_blocks}
    for size in sizes:
        del llm  # frees the KV cache before the next engine allocates its own
        free_device_memory(device)
        llm = LLM(loaded, **(settings | {"max_num_seqs": size}))  # type: ignore[arg-type]
        seconds, tokens = thinfer_generate_tokens(llm, ids, args.max_tokens)
        run: dict[str, Any] = {
            "batch_size": size,
            "thinfer": _entry(sum(map(len, tokens)), seconds),
        }
        if peer_run is not None:
            peer_seconds, peer_tokens = peer_run(ids, size, args.max_tokens)
            run[args.peer] = _entry(sum(map(len, peer_tokens)), peer_seconds)
            run["ratio"] = run["thinfer"]["tokens_per_s"] / run[args.peer]["tokens_per_s"]
            run["token_agreement"] = token_agreement(tokens, peer_tokens)
        runs.append(run)
        _print_row(run)

    data: dict[str, Any] = {
        "benchmark": "throughput",
        "model": llm.source,
        "load_format": args.load_format,
        "device": str(device),
        "dtype": str(next(llm.engine.model.parameters()).dtype).removeprefix("torch."),
        "quantization": args.quantization,
        "peer": args.peer,
        "peer_batching": _peer_batching(args.peer),
        "num_prompts": args.num_prompts,
        "max_tokens": args.max_tokens,
        "prompt_tokens": [len(p) for p in ids],
        "runs": runs,
    }
    name = f"throughput_{model_short_name(llm)}_{device.type}"
    json_path, png_path = write_result(name, data, _plot(data), args.output_dir)
    print(f"wrote {json_path} and {png_path}")
    return data


def _peer(
    llm: LLM, args: argparse.Namespace, ids: list[list[int]]
) -> Callable[[list[list[int]], int, int], tuple[float, list[list[int]]]] | None:
    """(prompts, batch size, new tokens) -> (seconds, ids) for `args.peer`, or None."""
    if args.peer == "hf":
        model = load_hf_peer(llm, args.load_format)
        return lambda prompts, size, tokens: hf_generate_tokens(model, prompts, size, tokens)
    if args.peer == "llama.cpp":
        from thinfer.bench.llamacpp_peer import llamacpp_generate_tokens, load_llamacpp_peer

        context = max(map(len, ids)) + args.max_tokens + 8
        threads = args.threads or torch.get_num_threads()
        engine = load_llamacpp_peer(llm.source, threads, context)
        return lambda prompts, size, tokens: llamacpp_generate_tokens(engine, prompts, tokens)
    return None


def _peer_batching(peer: str) -> str | None:
    if peer == "llama.cpp":
        from thinfer.bench.llamacpp_peer import PEER_BATCHING

        return PEER_BATCHING
    return "static left-padded batches of the batch size" if peer == "hf" else None


def _print_row(run: dict[str, Any]) -> None:
    t = run["thinfer"]
    line = f"batch {run['batch_size']:>4}  thinfer {t['tokens_per_s']:9.1f} tok/s"
    line += f" ({t['seconds']:.2f} s)"
    peer = next((name for name in PEER_LABELS if name in run), None)
    if peer is not None:
        h = run[peer]
        line += (
            f"  {peer} {h['tokens_per_s']:9.1f} tok/s ({h['seconds']:.2f} s)"
            f"  ratio {run['ratio']:5.2f}x  same tokens {run['token_agreement']:.1%}"
        )
    print(line, flush=True)


def _plot(data: dict[str, Any]) -> Figure:
    runs = data["runs"]
    fig = Figure(figsize=(max(5.0, 1.6 * len(runs) + 2), 4.2))
    ax = fig.add_subplot(1, 1, 1)
    xs = list(range(len(runs)))
    peer = data["peer"]
    has_peer = all(peer in run for run in runs)
    width = 0.38 if has_peer else 0.6
    ours = [run["thinfer"]["tokens_per_s"] for run in runs]
    offset = -width / 2 if has_peer else 0.0
    ax.bar([x + offset for x in xs], ours, width, label="thinfer", color="#1f77b4")
    tops = list(ours)
    if has_peer:
        theirs = [run[peer]["tokens_per_s"] for run in runs]
        label = PEER_LABELS[peer]
        ax.bar([x + width / 2 for x in xs], theirs, width, label=label, color="#ff7f0e")
        tops = [max(a, b) for a, b in zip(ours, theirs)]
        for x, top, run in zip(xs, tops, runs):
            ax.annotate(
                f"{run['ratio']:.2f}x",
                (x, top),
                xytext=(0, 4),
                textcoords="offset points",
                ha="center",
                fontsize=9,
            )
    ax.set_ylim(0, max(tops) * 1.18)
    ax.set_xticks(xs, [str(run["batch_size"]) for run in runs])
    ax.set_xlabel(f"batch size (max concurrent sequences); label: thinfer / {peer}")
    ax.set_ylabel("generated tokens / s")
    model = data["model"].rstrip("/").split("/")[-1]
    ax.set_title(
        f"Throughput: {model} on {data['device']}, "
        f"{data['num_prompts']} prompts x {data['max_tokens']} tokens",
        fontsize=10,
    )
    ax.legend(loc="upper left")
    ax.grid(axis="y", alpha=0.3)
    return fig
