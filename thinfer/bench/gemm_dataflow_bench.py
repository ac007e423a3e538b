"""`thinfer bench gemm-dataflow`: measure cuBLAS, the flat GEMM and the GEMV on a model's
linear-layer shapes at decode batch sizes, and write the dataflow table the engine loads.

For every weight shape [N, K] of the model (qkv, o, gate/up, down, lm_head) and every M of
`--m`: cuBLAS (`F.linear`) and each Triton candidate (`candidates`) are timed on the same
random x and W (W allocated once per shape), each call a CUDA graph replay after an
L2-evicting write (on CPU, interpreted Triton, meaningless times: the dry run). A candidate
whose output is off the fp32 reference is excluded. The fastest per (shape, M) goes into the
table (cuBLAS when it wins), written to `--table`; the JSON beside it holds every timing,
and the PNG the achieved TB/s of cuBLAS and of the best Triton kernel against M per shape.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
from typing import Any

import torch
from matplotlib.figure import Figure

from thinfer.bench.attention_bench import L2_FLUSH_BYTES, RELATIVE_TOLERANCE
from thinfer.bench.bandwidth import device_timings, graphed
from thinfer.bench.decode_timing import parse_positive_ints
from thinfer.bench.report import DEFAULT_OUTPUT_DIR, safe_name, write_result
from thinfer.config import ModelConfig, resolve_dtype
from thinfer.kernels.gemm_dataflow import CUBLAS, DataflowTable, GemmChoice, device_name


def linear_shapes(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    """Weight shapes [N, K] of the model's linear layers (qkv and gate/up packed as loaded)."""
    head_dim = cfg.head_dim
    q, kv = cfg.num_attention_heads * head_dim, cfg.num_key_value_heads * head_dim
    return {
        "qkv_proj": (q + 2 * kv, cfg.hidden_size),
        "o_proj": (cfg.hidden_size, q),
        "gate_up_proj": (2 * cfg.intermediate_size, cfg.hidden_size),
        "down_proj": (cfg.hidden_size, cfg.intermediate_size),
        "lm_head": (cfg.vocab_size, cfg.hidden_size),
    }


def candidates(m: int, quick: bool) -> list[GemmChoice]:
    """Triton kernels worth timing at M rows (the GEMV only for a few rows)."""
    flat_tiles = [(64, 128)] if quick else [(32, 128), (64, 128), (64, 256), (128, 128)]
    gemv_tiles = [(32, 128)] if quick else [(16, 256), (32, 256), (64, 128)]
    splits = [1, 2] if quick else [1, 2, 4]
    out = [
        GemmChoice("flat", block_n=bn, block_k=bk, split_k=s)
        for bn, bk in flat_tiles
        for s in splits
    ]
    if m <= 4:
        out += [
            GemmChoice("gemv", block_n=bn, block_k=bk, split_k=s)
            for bn, bk in gemv_tiles
            for s in splits
        ]
    return out


def _time(fn: Any, device: torch.device, iters: int, warmup: int, flush: Any) -> float:
    seconds = sorted(device_timings(graphed(fn, device), device, iters, warmup, flush))
    return seconds[len(seconds) // 2]


def measure_shape(
    n: int,
    k: int,
    ms: list[int],
    dtype: torch.dtype,
    device: torch.device,
    args: argparse.Namespace,
) -> list[dict[str, Any]]:
    """Per M: cuBLAS and every candidate's median seconds and TB/s, and the fastest."""
    from thinfer.kernels.flat_gemm import linear_reference

    gen = torch.Generator(device=device).manual_seed(n * 7 + k)
    weight = (torch.randn(n, k, generator=gen, device=device) * 0.02).to(dtype)
    scratch = torch.empty(
        L2_FLUSH_BYTES if device.type == "cuda" else 0, dtype=torch.uint8, device=device
    )
    flush = scratch.zero_ if device.type == "cuda" else None
    rows = []
    for m in ms:
        x = torch.randn(m, k, generator=gen, device=device).to(dtype)
        expected = linear_reference(x, weight, None).float()
        scale = expected.abs().max().item() or 1.0
        moved = (n * k + m * k + m * n) * dtype.itemsize
        timings = []
        for choice in [CUBLAS, *candidates(m, args.quick)]:
            run = functools.partial(choice.run, x, weight, None)
            error = (run().float() - expected).abs().max().item() / scale
            entry: dict[str, Any] = dataclasses.asdict(choice) | {"rel_error": error}
            if error > RELATIVE_TOLERANCE.get(dtype, 2e-2) and choice.impl != "cublas":
                entry["status"] = "mismatch"
            else:
                seconds = _time(run, device, args.iters, args.warmup, flush)
                entry |= {"status": "ok", "seconds": seconds, "tb_per_s": moved / seconds / 1e12}
            timings.append(entry)
        ok = [t for t in timings if t["status"] == "ok"]
        best = min(ok, key=lambda t: t["seconds"])
        triton = [t for t in ok if t["impl"] != "cublas"]
        best_triton = min(triton, key=lambda t: t["seconds"], default=None)
        rows.append(
            {"m": m, "bytes": moved, "timings": timings, "best": best, "best_triton": best_triton}
        )
    return rows


def build_table(device: str, dtype: str, shapes: dict[str, Any]) -> DataflowTable:
    """The fastest kernel per (N, K) and M bucket."""
    table: dict[tuple[int, int], tuple[tuple[int, GemmChoice], ...]] = {}
    for entry in shapes.values():
        choices = []
        for row in entry["rows"]:
            fields = {f.name: row["best"][f.name] for f in dataclasses.fields(GemmChoice)}
            choices.append((row["m"], GemmChoice(**fields)))
        table[(entry["n"], entry["k"])] = tuple(choices)
    return DataflowTable(device, dtype, table)


def run_gemm_dataflow(args: argparse.Namespace) -> dict[str, Any]:
    """Measure, print, write the table, the JSON and the PNG; return the results."""
    from thinfer.loading import load_checkpoint

    ms = parse_positive_ints(args.m, "--m")
    if args.iters < 1 or args.warmup < 0:
        raise ValueError(f"--iters must be >= 1 and --warmup >= 0, got {args.iters}, {args.warmup}")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type != "cuda":
        from thinfer.attention.triton_paged import kernels_interpreted

        if not kernels_interpreted():
            raise ValueError("the Triton kernels need CUDA (on CPU: TRITON_INTERPRET=1)")
    dtype = resolve_dtype(args.dtype, device)
    cfg = load_checkpoint(args.model, args.load_format).config
    shapes: dict[str, Any] = {}
    for name, (n, k) in linear_shapes(cfg).items():
        rows = measure_shape(n, k, ms, dtype, device, args)
        shapes[name] = {"n": n, "k": k, "rows": rows}
        for row in rows:
            best, cublas = row["best"], row["timings"][0]
            print(
                f"{name:>13} [{n}x{k}] M={row['m']:<3} cuBLAS {cublas['tb_per_s']:7.3f} TB/s  "
                f"best {best['impl']:>6} {best['tb_per_s']:7.3f} TB/s",
                flush=True,
            )
    here, dtype_name = device_name(device), str(dtype).removeprefix("torch.")
    table = build_table(here, dtype_name, shapes)
    table_path = args.table or f"{args.output_dir}/gemm_dataflow_{safe_name(here)}.json"
    data: dict[str, Any] = {
        "benchmark": "gemm_dataflow",
        "model": args.model,
        "device": here,
        "dtype": dtype_name,
        "m": ms,
        "iters": args.iters,
        "quick": args.quick,
        "notes": {
            "tb_per_s": "(N*K + M*K + M*N) * itemsize / median seconds / 1e12",
            "timing": "CUDA graph replay after an L2-evicting write (GPU); perf_counter (CPU)",
            "table": "the fastest kernel per shape and M; cuBLAS where it won",
        },
        "shapes": shapes,
        "table_path": str(table_path),
        "table": table.to_json(),
    }
    model = safe_name(str(args.model or "default"))
    json_path, png_path = write_result(
        f"gemm_dataflow_{model}_{device.type}", data, plot_gemm(data), args.output_dir
    )
    table.save(table_path)
    print(f"wrote {json_path}, {png_path} and the table {table_path}")
    return data


def plot_gemm(data: dict[str, Any]) -> Figure:
    """Per shape: TB/s of cuBLAS and of the best Triton kernel against M."""
    shapes = data["shapes"]
    fig = Figure(figsize=(4.2 * len(shapes), 3.8))
    for i, (name, entry) in enumerate(shapes.items()):
        ax = fig.add_subplot(1, len(shapes), i + 1)
        ms = [row["m"] for row in entry["rows"]]
        ax.plot(ms, [row["timings"][0]["tb_per_s"] for row in entry["rows"]], "o-", label="cuBLAS")
        best = [(row["m"], row["best_triton"]) for row in entry["rows"] if row["best_triton"]]
        ax.plot(
            [m for m, _ in best],
            [t["tb_per_s"] for _, t in best],
            "s-",
            label="best Triton (flat / GEMV)",
        )
        ax.set_xscale("log", base=2)
        ax.set_title(f"{name} [{entry['n']}x{entry['k']}]", fontsize=9)
        ax.set_xlabel("M (rows)")
        ax.grid(alpha=0.3)
        if i == 0:
            ax.set_ylabel("TB/s (W + x + y bytes / time)")
            ax.legend(fontsize=8)
    fig.suptitle(f"Decode-time linear layers on {data['device']} ({data['dtype']})", fontsize=10)
    return fig


def add_parser(kinds: Any) -> None:
    """Register `thinfer bench gemm-dataflow`."""
    gd = kinds.add_parser(
        "gemm-dataflow",
        help="cuBLAS vs flat GEMM vs GEMV per linear shape and M; writes the dataflow table",
        description="Times cuBLAS and the Triton flat GEMM / GEMV candidates on every linear "
        "shape of --model at each M of --m, and writes the fastest per (shape, M) as the "
        "table `--gemm-dataflow` loads (JSON + PNG of all timings beside it).",
    )
    gd.add_argument("--model", default="llama-2-7b", help="preset or checkpoint (shapes only)")
    gd.add_argument("--load-format", default="dummy", help="default dummy: the shapes alone")
    gd.add_argument("--dtype", default="auto", help="auto: bf16 on GPU, fp32 on CPU")
    gd.add_argument("--device", default=None)
    gd.add_argument("--m", default="1,2,4,8,16,32,64", help="rows (batch sizes), comma-separated")
    gd.add_argument("--iters", type=int, default=20, help="timed calls per kernel (default 20)")
    gd.add_argument("--warmup", type=int, default=3, help="untimed calls first (default 3)")
    gd.add_argument("--quick", action="store_true", help="a few candidates only (dry runs)")
    gd.add_argument("--table", default=None, help="where the table goes (default: in --output-dir)")
    gd.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    gd.add_argument("--output-dir", default=str(DEFAULT_OUTPUT_DIR))
    gd.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    run_gemm_dataflow(args)
    return 0
