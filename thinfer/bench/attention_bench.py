"""`thinfer bench decode-attention`: paged decode attention alone against torch SDPA on
contiguous KV, in TB/s.

For each context length: `--batch-size` sequences of one query each, `--heads` query heads
over `--kv-heads` KV heads of `--head-dim`. The paged side reads a cache
[num_blocks, block_size, kv_heads, head_dim] through a shuffled block table into a pool
twice the size needed (a realistic, non-contiguous layout); SDPA reads the same keys and
values laid out contiguously [batch, kv_heads, context, head_dim]. Bandwidth = bytes of
K + V read plus q read and out written (block tables and lengths are not counted) / median
time of `--iters` calls. On CUDA each side is captured in a CUDA graph and each replay is
timed with CUDA events after a 256 MB write that evicts the L2 cache, so short contexts are
neither served from L2 nor measured as host launch latency. Both outputs are
compared, so a wrong kernel does not go unnoticed in the numbers.

Backends: "triton" is `thinfer.kernels.decode_attention.paged_decode_attention`; "torch" is
the CPU reference `thinfer.attention.torch_paged.decode_attention` (gather, then SDPA).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from matplotlib.figure import Figure

from thinfer.bench.bandwidth import device_timings, graphed
from thinfer.bench.decode_timing import free_device_memory, parse_positive_ints
from thinfer.bench.report import write_result
from thinfer.config import resolve_dtype

L2_FLUSH_BYTES = 256 * 2**20
ACCEPTANCE_FROM = 8192  # contexts where paged should reach 85% of SDPA's bandwidth
# Largest |paged - SDPA| allowed, relative to the largest |output| (averages of random values
# shrink as the context grows, so an absolute bound would let a wrong kernel pass).
RELATIVE_TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 2e-2}

PagedAttention = Callable[..., torch.Tensor]


def paged_backend(backend: str, device: torch.device) -> PagedAttention:
    """`fn(q, k_cache, v_cache, block_tables, context_lens, max_context_len, scale)` of a
    backend; ValueError when the Triton kernel cannot run here."""
    if backend == "torch":
        from thinfer.attention.torch_paged import decode_attention

        return decode_attention
    from thinfer.attention.backend import select_backend

    try:
        select_backend("triton", device)  # triton importable, CUDA or interpreted kernels
    except ValueError as exc:
        raise ValueError(f"--backend triton: {exc}") from exc
    from thinfer.kernels.decode_attention import paged_decode_attention

    def triton_paged(
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        block_tables: torch.Tensor,
        context_lens: torch.Tensor,
        max_context_len: int,
        scale: float,
    ) -> torch.Tensor:
        return paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale)

    return triton_paged


def decode_inputs(
    batch: int,
    context_len: int,
    heads: int,
    kv_heads: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype,
    device: torch.device,
) -> dict[str, torch.Tensor]:
    """Random q, a paged cache with a shuffled block table, and the same K/V contiguous.

    Keys: q [B, Hq, D], k_cache/v_cache [2 x blocks in use, block_size, Hkv, D], block_tables
    [B, blocks per sequence] int64, context_lens [B] int64, k/v [B, Hkv, context_len, D].
    """
    gen = torch.Generator(device=device).manual_seed(context_len)
    per_seq = -(-context_len // block_size)
    # Twice the blocks needed, half of them in use (as if by other sequences), in random
    # order: a kernel that ignores or misreads the block table reads the wrong blocks.
    shape = (2 * batch * per_seq, block_size, kv_heads, head_dim)
    k_cache = torch.randn(shape, generator=gen, dtype=dtype, device=device)
    v_cache = torch.randn(shape, generator=gen, dtype=dtype, device=device)
    order = torch.randperm(shape[0], generator=gen, device=device)[: batch * per_seq]
    tables = order.view(batch, per_seq).to(torch.int64)

    def contiguous(cache: torch.Tensor) -> torch.Tensor:
        slots = cache[tables].view(batch, per_seq * block_size, kv_heads, head_dim)
        return slots[:, :context_len].transpose(1, 2).contiguous()

    return {
        "q": torch.randn((batch, heads, head_dim), generator=gen, dtype=dtype, device=device),
        "k_cache": k_cache,
        "v_cache": v_cache,
        "block_tables": tables,
        "context_lens": torch.full((batch,), context_len, dtype=torch.int64, device=device),
        "k": contiguous(k_cache),
        "v": contiguous(v_cache),
    }


def moved_bytes(
    batch: int, context_len: int, heads: int, kv_heads: int, head_dim: int, itemsize: int
) -> int:
    """Bytes of K and V read plus q read and out written by one decode attention call."""
    return itemsize * (2 * batch * context_len * kv_heads * head_dim + 2 * batch * heads * head_dim)


def _validate(args: argparse.Namespace) -> list[int]:
    lens = parse_positive_ints(args.context_lens, "--context-lens")
    for name in ("batch_size", "heads", "kv_heads", "head_dim", "block_size", "iters"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.warmup < 0:
        raise ValueError(f"--warmup must be >= 0, got {args.warmup}")
    if args.heads % args.kv_heads:
        raise ValueError(f"--heads {args.heads} must be a multiple of --kv-heads {args.kv_heads}")
    return lens


def _measure(
    args: argparse.Namespace,
    paged: PagedAttention,
    context_len: int,
    dtype: torch.dtype,
    device: torch.device,
) -> dict[str, Any]:
    shape = (args.batch_size, context_len, args.heads, args.kv_heads, args.head_dim)
    x = decode_inputs(*shape, args.block_size, dtype, device)
    scale = args.head_dim**-0.5
    gqa = args.heads != args.kv_heads
    cache_args = (x["q"], x["k_cache"], x["v_cache"], x["block_tables"], x["context_lens"])

    def run_paged() -> torch.Tensor:
        return paged(*cache_args, context_len, scale)

    def run_sdpa() -> torch.Tensor:
        q = x["q"][:, :, None, :]
        return F.scaled_dot_product_attention(q, x["k"], x["v"], scale=scale, enable_gqa=gqa)

    expected = run_sdpa()[:, :, 0].float()
    error = (run_paged().float() - expected).abs().max().item()
    largest = expected.abs().max().item()
    flush = None
    if device.type == "cuda":
        scratch = torch.empty(L2_FLUSH_BYTES, dtype=torch.uint8, device=device)
        flush = scratch.zero_
    num_bytes = moved_bytes(*shape, dtype.itemsize)
    result: dict[str, Any] = {"context_len": context_len, "bytes": num_bytes}
    for name, fn in (("paged", run_paged), ("sdpa", run_sdpa)):
        seconds = sorted(
            device_timings(graphed(fn, device), device, args.iters, args.warmup, flush)
        )
        median = seconds[len(seconds) // 2]
        result[name] = {"median_seconds": median, "tb_per_s": num_bytes / median / 1e12}
    result["ratio"] = result["paged"]["tb_per_s"] / result["sdpa"]["tb_per_s"]
    if args.sweep_split_tokens:
        from thinfer.bench.split_sweep import best_setting, sweep_launch_settings

        splits = parse_positive_ints(args.sweep_split_tokens, "--sweep-split-tokens")
        warps = parse_positive_ints(args.sweep_num_warps, "--sweep-num-warps")
        timing = (args.iters, args.warmup, flush)
        result["sweep"] = sweep_launch_settings(x, scale, splits, warps, num_bytes, timing)
        result["sweep_best"] = best_setting(result["sweep"])
    result["max_abs_error"] = error
    result["max_abs_output"] = largest
    result["matches_sdpa"] = error <= RELATIVE_TOLERANCE.get(dtype, 2e-2) * largest
    return result


def run_decode_attention(args: argparse.Namespace) -> dict[str, Any]:
    """Time the paged backend and SDPA per context length; print, write JSON + PNG."""
    lens = _validate(args)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = resolve_dtype(args.dtype, device)
    backend = args.backend if args.backend != "auto" else "triton"
    if args.backend == "auto" and device.type != "cuda":
        backend = "torch"
    paged = paged_backend(backend, device)
    if args.sweep_split_tokens and backend != "triton":
        raise ValueError("--sweep-split-tokens sweeps the Triton kernel: use --backend triton")
    dtype_name = str(dtype).removeprefix("torch.")
    print(
        f"decode attention, {backend} paged vs SDPA contiguous: batch {args.batch_size}, "
        f"{args.heads}/{args.kv_heads} heads x {args.head_dim}, {dtype_name}, {device}",
        flush=True,
    )
    results = []
    for context_len in lens:
        with torch.inference_mode():
            results.append(_measure(args, paged, context_len, dtype, device))
        free_device_memory(device)
        r = results[-1]
        print(
            f"context {context_len:>7}  paged {r['paged']['tb_per_s']:8.4g} TB/s  "
            f"SDPA {r['sdpa']['tb_per_s']:8.4g} TB/s  ratio {r['ratio']:.2f}  "
            f"max |diff| {r['max_abs_error']:.2e}" + ("" if r["matches_sdpa"] else "  MISMATCH"),
            flush=True,
        )
    long = [r["ratio"] for r in results if r["context_len"] >= ACCEPTANCE_FROM]
    data: dict[str, Any] = {
        "benchmark": "decode_attention",
        "backend": backend,
        "device": str(device),
        "dtype": dtype_name,
        "batch_size": args.batch_size,
        "heads": args.heads,
        "kv_heads": args.kv_heads,
        "head_dim": args.head_dim,
        "block_size": args.block_size,
        "iters": args.iters,
        "warmup": args.warmup,
        "notes": {
            "tb_per_s": "bytes (K + V read, q read, out written) / median seconds / 1e12",
            "timing": "on GPU each call is a CUDA graph replay (kernels only, no launch "
            "overhead) timed by CUDA events after an L2-evicting write; perf_counter on CPU",
            "paged": "shuffled block table; sdpa: contiguous [B, Hkv, L, D] K/V, same values",
        },
        "results": results,
        f"min_ratio_from_{ACCEPTANCE_FROM}": min(long, default=None),
        "all_match_sdpa": all(r["matches_sdpa"] for r in results),
    }
    name = f"decode_attention_{backend}_{device.type}"
    json_path, png_path = write_result(name, data, _plot(data), args.output_dir)
    print(f"wrote {json_path} and {png_path}")
    return data


def _plot(data: dict[str, Any]) -> Figure:
    results = data["results"]
    lens = [r["context_len"] for r in results]
    fig = Figure(figsize=(7.5, 4.4))
    ax = fig.add_subplot(1, 1, 1)
    for key, label, color in (
        ("paged", f"paged ({data['backend']}), shuffled blocks", "#1f77b4"),
        ("sdpa", "torch SDPA, contiguous KV", "#7f7f7f"),
    ):
        ax.plot(lens, [r[key]["tb_per_s"] for r in results], "o-", color=color, label=label)
    for r in results:
        ax.annotate(
            f"{r['ratio']:.2f}x",
            (r["context_len"], r["paged"]["tb_per_s"]),
            xytext=(0, 7),
            textcoords="offset points",
            ha="center",
            fontsize=9,
        )
    ax.set_xscale("log", base=2)
    ax.set_xticks(lens, [f"{n // 1024}K" if n % 1024 == 0 else str(n) for n in lens])
    ax.set_ylim(0, ax.get_ylim()[1] * 1.15)
    ax.set_xlabel("context length (tokens per sequence)")
    ax.set_ylabel("TB/s (K + V + q + out bytes / time)")
    ax.set_title(
        f"Decode attention on {data['device']} ({data['dtype']}): batch {data['batch_size']}, "
        f"{data['heads']}/{data['kv_heads']} heads x {data['head_dim']}; label: paged / SDPA",
        fontsize=10,
    )
    ax.legend(loc="lower right")
    ax.grid(alpha=0.3)
    return fig
