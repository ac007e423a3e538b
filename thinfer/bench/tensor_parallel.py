"""`thinfer bench tensor-parallel`: what tensor parallelism saves per rank and what it costs.

For each size N in `--sizes` (N = 1 is the plain single-process engine and the peer), one
`LLM(..., tensor_parallel_size=N)` is built (on CPU: N processes over gloo), then:

- saves: the weight and KV-cache bytes of every rank (`rank_memory_bytes`), and the largest
  rank's share of the N = 1 total (ideal 1/N; above it where a rank holds more KV heads or
  query heads than others, and for what every rank replicates: norms);
- costs: tokens/s of greedy batch generation (EOS ignored) after a short warm-up, and its
  ratio to N = 1; and whether every prompt's token ids equal N = 1's.

On one CPU the ranks share the cores (each gets `cpu_count // N` threads), so tokens/s falls
with N: the figure shows the all-reduce and coordination overhead, not multi-GPU scaling.
"""

from __future__ import annotations

import argparse
import time
from typing import TYPE_CHECKING, Any

import torch
from matplotlib.figure import Figure

from thinfer.bench.prompts import tokenize_bench_prompts
from thinfer.bench.report import DEFAULT_OUTPUT_DIR, model_short_name, write_result
from thinfer.sampling_params import SamplingParams

if TYPE_CHECKING:
    from thinfer.llm import LLM


def rank_memory(llm: LLM) -> list[dict[str, int]]:
    """Weight and KV-cache bytes of each rank of `llm`'s engine (one entry when N = 1)."""
    from thinfer.distributed.driver import DriverEngine

    if isinstance(llm.engine, DriverEngine):
        return llm.engine.rank_memory_bytes()
    return [llm.engine.memory_bytes()]


def measure_size(
    args: argparse.Namespace, size: int
) -> tuple[dict[str, Any], list[list[int]], tuple[str, str]]:
    """Memory per rank and timed generation at tensor-parallel size `size`; returns the row,
    the generated token ids of each prompt and (model source, short name). The LLM (and its
    ranks) is closed after."""
    from thinfer.llm import LLM

    threads = torch.get_num_threads()  # a TP driver takes its share of the cores: restore it
    try:
        with LLM(
            args.model,
            load_format=args.load_format,
            dtype=args.dtype,
            device=args.device,
            max_num_seqs=args.batch,
            num_kv_blocks=args.num_kv_blocks,
            tensor_parallel_size=size,
        ) as llm:
            ranks = rank_memory(llm)
            rank_threads = torch.get_num_threads()
            prompts = tokenize_bench_prompts(llm.tokenizer, llm.model_config.vocab_size, args.batch)
            params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
            llm.generate(prompts[:1], SamplingParams(max_tokens=2))  # warm-up
            started = time.perf_counter()
            outputs = llm.generate(prompts, params)
            seconds = time.perf_counter() - started
            model = (llm.source, model_short_name(llm))
    finally:
        torch.set_num_threads(threads)
    row: dict[str, Any] = {
        "ranks": ranks,
        "threads_per_rank": rank_threads,
        "seconds": seconds,
        "tokens_per_s": args.batch * args.max_tokens / seconds,
    }
    return row, [list(out.outputs[0].token_ids) for out in outputs], model


def run_tensor_parallel(args: argparse.Namespace) -> dict[str, Any]:
    """Measure every size, print the table, write JSON + PNG; return the data."""
    try:
        sizes = sorted({int(s) for s in args.sizes.split(",")})
    except ValueError:
        raise ValueError(f"--sizes must be comma-separated integers, got {args.sizes!r}") from None
    if 1 not in sizes or sizes[0] < 1:
        raise ValueError(f"--sizes must hold 1 (the peer) and sizes >= 1, got {args.sizes!r}")
    if args.batch < 1 or args.max_tokens < 1 or args.num_kv_blocks < 1:
        raise ValueError("--batch, --max-tokens and --num-kv-blocks must be >= 1")
    rows: dict[str, dict[str, Any]] = {}
    reference: list[list[int]] = []
    model = ("", "")
    for size in sizes:  # 1 first: the peer of every other size
        row, tokens, found = measure_size(args, size)
        if size == 1:
            reference, model = tokens, found
        base = rows.get("1", row)
        single = base["ranks"][0]
        for key in ("weights", "kv_cache"):
            row[f"{key}_max_rank_share"] = max(r[key] for r in row["ranks"]) / single[key]
            row[f"{key}_total_share"] = sum(r[key] for r in row["ranks"]) / single[key]
        row["throughput_ratio"] = row["tokens_per_s"] / base["tokens_per_s"]
        row["tokens_equal"] = tokens == reference
        row["prompts_equal"] = sum(a == b for a, b in zip(tokens, reference))
        rows[str(size)] = row
        print(
            f"N={size}: largest rank weights {row['weights_max_rank_share']:.3f}, KV "
            f"{row['kv_cache_max_rank_share']:.3f} of N=1 (ideal {1 / size:.3f}); "
            f"{row['tokens_per_s']:.1f} tok/s ({row['throughput_ratio']:.2f}x of N=1); "
            f"tokens equal: {row['tokens_equal']}"
        )
    data: dict[str, Any] = {
        "benchmark": "tensor_parallel",
        "model": model[0],
        "device": args.device,
        "dtype": args.dtype,
        "batch": args.batch,
        "max_tokens": args.max_tokens,
        "num_kv_blocks": args.num_kv_blocks,
        "sizes": rows,
    }
    name = f"tensor_parallel_{model[1]}_{args.device.split(':')[0]}"
    json_path, png_path = write_result(name, data, _plot(data), args.output_dir)
    print(f"wrote {json_path} and {png_path}")
    return data


def _plot(data: dict[str, Any]) -> Figure:
    fig = Figure(figsize=(10, 3.8))
    sizes = [int(n) for n in data["sizes"]]
    rows = list(data["sizes"].values())
    ax = fig.add_subplot(1, 2, 1)
    ax.plot(sizes, [1 / n for n in sizes], "k--", label="ideal 1/N")
    for key, label, dy in (("weights", "weights", -12), ("kv_cache", "KV cache", 4)):
        shares = [row[f"{key}_max_rank_share"] for row in rows]
        ax.plot(sizes, shares, "o-", label=f"{label}, largest rank")
        for n, share in zip(sizes, shares):
            ax.annotate(f"{share:.2f}", (n, share), textcoords="offset points", xytext=(6, dy))
    ax.set_xticks(sizes)
    ax.set_xlim(sizes[0] - 0.3, sizes[-1] + 0.5)
    ax.set_xlabel("tensor-parallel size N")
    ax.set_ylabel("bytes / N=1 total")
    ax.set_ylim(0, 1.1)
    ax.legend(fontsize=8)
    ax = fig.add_subplot(1, 2, 2)
    ratios = [row["throughput_ratio"] for row in rows]
    ax.bar(sizes, ratios, width=0.5)
    for n, row in zip(sizes, rows):
        text = f"{row['throughput_ratio']:.2f}x\n{row['tokens_per_s']:.0f} tok/s"
        ax.annotate(text, (n, row["throughput_ratio"]), ha="center", va="bottom", fontsize=8)
    ax.axhline(1.0, color="k", linewidth=0.8)
    ax.set_xticks(sizes)
    ax.set_xlabel("tensor-parallel size N")
    ax.set_ylabel("tokens/s / N=1")
    ax.set_ylim(0, max(1.0, *ratios) * 1.3)
    fig.suptitle(
        f"Tensor parallelism: {data['model'].split('/')[-1]} ({data['device']}, batch "
        f"{data['batch']} x {data['max_tokens']} tokens)"
    )
    return fig


def add_parser(kinds: Any) -> None:
    """Register `thinfer bench tensor-parallel`."""
    tp = kinds.add_parser(
        "tensor-parallel",
        help="per-rank weight/KV bytes and tokens/s at each tensor-parallel size",
        description="For each --sizes N: an engine of N ranks (CPU: gloo processes); the "
        "largest rank's weight and KV bytes as a share of N=1's, greedy batch tokens/s and "
        "its ratio to N=1, and whether the token ids equal N=1's. On one CPU the ranks share "
        "the cores: tokens/s shows overhead, not GPU scaling.",
    )
    tp.add_argument("--model", default=None, help="default: the embedded SmolLM2")
    tp.add_argument("--load-format", default="auto")
    tp.add_argument("--dtype", default="auto")
    tp.add_argument("--device", default="cpu", help="cpu (gloo ranks) or cuda (a GPU per rank)")
    tp.add_argument("--sizes", default="1,2,3", help="tensor-parallel sizes; must hold 1")
    tp.add_argument("--batch", type=int, default=8, help="prompts generated together")
    tp.add_argument("--max-tokens", type=int, default=64, help="new tokens per prompt")
    tp.add_argument("--num-kv-blocks", type=int, default=256, help="KV blocks of each rank")
    tp.add_argument("--output-dir", default=str(DEFAULT_OUTPUT_DIR))
    tp.set_defaults(func=lambda args: 0 if run_tensor_parallel(args) else 1)
