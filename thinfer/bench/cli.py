"""`thinfer bench throughput|latency|decode-curve|stream|speedup|bandwidth|decode-attention`:
the `thinfer bench` sub-commands."""

from __future__ import annotations

import argparse
from typing import Any

from thinfer.bench.report import DEFAULT_OUTPUT_DIR


def _common(
    parser: argparse.ArgumentParser, peer: bool = True, peers: tuple[str, ...] = ("hf", "none")
) -> None:
    from thinfer.cli_args import add_model_args

    add_model_args(parser)
    if peer:
        parser.add_argument(
            "--peer",
            default="hf",
            choices=list(peers),
            help="compare with HF transformers on the same checkpoint (default)"
            + (", with llama.cpp on the same GGUF file" if "llama.cpp" in peers else "")
            + ", or not",
        )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: torch's choice; recorded in the JSON)",
    )
    parser.add_argument(
        "--output-dir",
        default=str(DEFAULT_OUTPUT_DIR),
        help="where the JSON and PNG go (default: bench/results)",
    )


def _set_threads(args: argparse.Namespace) -> None:
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        import torch

        torch.set_num_threads(args.threads)


def _throughput(args: argparse.Namespace) -> int:
    from thinfer.bench.throughput import run_throughput

    _set_threads(args)
    run_throughput(args)
    return 0


def _latency(args: argparse.Namespace) -> int:
    from thinfer.bench.latency import run_latency

    _set_threads(args)
    run_latency(args)
    return 0


def _decode_curve(args: argparse.Namespace) -> int:
    from thinfer.bench.decode_curve import run_decode_curve

    _set_threads(args)
    run_decode_curve(args)
    return 0


def _stream(args: argparse.Namespace) -> int:
    from thinfer.bench.stream import run_stream

    _set_threads(args)
    run_stream(args)
    return 0


def _speedup(args: argparse.Namespace) -> int:
    from thinfer.bench.speedup import run_speedup

    _set_threads(args)
    run_speedup(args)
    return 0


def _bandwidth(args: argparse.Namespace) -> int:
    from thinfer.bench.bandwidth import run_bandwidth

    _set_threads(args)
    run_bandwidth(args)
    return 0


def _matmul(args: argparse.Namespace) -> int:
    from thinfer.bench.matmul import run_matmul

    _set_threads(args)
    run_matmul(args)
    return 0


def _decode_attention(args: argparse.Namespace) -> int:
    from thinfer.bench.attention_bench import run_decode_attention

    _set_threads(args)
    run_decode_attention(args)
    return 0


_SIZED_PER_RUN = (
    "--max-num-seqs, --max-num-batched-tokens, --max-model-len and --num-kv-blocks are "
    "ignored: each run gets a KV cache of exactly what it needs."
)


def _add_gpu_benches(kinds: Any) -> None:
    sp = kinds.add_parser(
        "speedup",
        help="decode tokens/s over HF transformers per input length x batch size",
        description="The FlashDecoding++ grid: for each input length and batch size, the same "
        "random prompts through thinfer and HF generate (greedy, EOS ignored); decode "
        "tokens/s of both (prefill excluded) and the speedup; cells where an engine runs out "
        "of memory are marked oom. A dummy model's context is extended when a cell needs it. "
        + _SIZED_PER_RUN,
    )
    _common(sp, peer=False)
    sp.add_argument(
        "--input-lens", default="128,1024,8192,32768", help="prompt tokens, comma-separated"
    )
    sp.add_argument("--batch-sizes", default="1,2,4,8", help="comma-separated (default 1,2,4,8)")
    sp.add_argument("--output-len", type=int, default=128, help="new tokens per sequence")
    sp.set_defaults(func=_speedup)

    bw = kinds.add_parser(
        "bandwidth",
        help="batch-1 decode tokens/s and model bandwidth utilization (MBU)",
        description="Device copy bandwidth (read+write bytes / time of a large copy), then "
        "thinfer's batch-1 decode: tokens/s, bytes read per step (weights + KV of the "
        "context), achieved bandwidth, MBU = achieved / copy bandwidth, and the bound "
        "tokens/s = copy bandwidth / bytes per step; HF generate as the peer. " + _SIZED_PER_RUN,
    )
    _common(bw)
    bw.add_argument("--input-len", type=int, default=128, help="prompt tokens (default 128)")
    bw.add_argument("--output-len", type=int, default=256, help="new tokens (default 256)")
    bw.add_argument(
        "--copy-mib", type=int, default=None, help="copied tensor size (default 1024 GPU, 64 CPU)"
    )
    bw.add_argument("--repeats", type=int, default=20, help="timed copies (default 20)")
    bw.set_defaults(func=_bandwidth)

    da = kinds.add_parser(
        "decode-attention",
        help="paged decode attention alone vs SDPA on contiguous KV, in TB/s",
        description="One query per sequence over a paged KV cache (shuffled block table) with "
        "the Triton kernel (or the torch reference), against "
        "torch.nn.functional.scaled_dot_product_attention on contiguous K/V of the same size; "
        "bandwidth = bytes of K, V, q and out / median time.",
    )
    da.add_argument(
        "--context-lens",
        default="1024,2048,4096,8192,16384,32768",
        help="KV tokens per sequence, comma-separated",
    )
    da.add_argument("--batch-size", type=int, default=1)
    da.add_argument("--heads", type=int, default=32, help="query heads")
    da.add_argument("--kv-heads", type=int, default=32)
    da.add_argument("--head-dim", type=int, default=128)
    da.add_argument("--block-size", type=int, default=16, help="KV slots per block")
    da.add_argument("--dtype", default="auto", help="auto: bf16 on GPU, fp32 on CPU")
    da.add_argument("--device", default=None)
    da.add_argument(
        "--backend",
        default="auto",
        choices=["auto", "triton", "torch"],
        help="paged attention: the Triton kernel or the torch reference (auto: triton on "
        "CUDA, torch on CPU; triton on CPU needs TRITON_INTERPRET=1)",
    )
    da.add_argument(
        "--sweep-split-tokens",
        default=None,
        help="also time the Triton kernel at these chunk sizes (comma-separated multiples of 16)",
    )
    da.add_argument(
        "--sweep-num-warps", default="4", help="warps per program in the sweep (default 4)"
    )
    da.add_argument("--iters", type=int, default=50, help="timed calls per measurement")
    da.add_argument("--warmup", type=int, default=5, help="untimed calls first")
    da.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    da.add_argument("--output-dir", default=str(DEFAULT_OUTPUT_DIR))
    da.set_defaults(func=_decode_attention)


def _add_decode_curve(kinds: Any) -> None:
    from thinfer.compression.config import TRIGGERS, all_method_names

    dc = kinds.add_parser(
        "decode-curve",
        help="tokens/s, KV memory and GFLOPs per decoding step: full cache vs a method",
        description="One batch of long greedy generations (EOS ignored), once with the full "
        "KV cache and once with --method, in the same process; per decoding step: tokens/s, "
        "KV GB, GFLOPs (attention + linear layers). --max-num-seqs is ignored; "
        "--max-model-len and --num-kv-blocks default to what the full-cache run needs.",
    )
    _common(dc, peer=False)
    dc.add_argument(
        "--batch-size", type=int, default=4, help="sequences decoded together (default 4)"
    )
    dc.add_argument("--steps", type=int, default=2048, help="decoding steps (default 2048)")
    dc.add_argument(
        "--method",
        default="dynts",
        choices=[m for m in all_method_names() if m != "full"],
        help="compared with the full cache (default dynts)",
    )
    dc.add_argument("--budget", type=int, default=1024, help="KV slots per sequence (default 1024)")
    dc.add_argument(
        "--window", type=int, default=256, help="recent tokens always kept (default 256)"
    )
    dc.add_argument(
        "--ratio", type=float, default=0.3, help="share of older tokens kept (default 0.3)"
    )
    dc.add_argument("--trigger", default="native", choices=list(TRIGGERS), help="default native")
    dc.add_argument(
        "--predictor",
        default=None,
        help="DynTS head (safetensors); default: a seeded random head of the model's size",
    )
    dc.set_defaults(func=_decode_curve)


def _add_stream(kinds: Any) -> None:
    st = kinds.add_parser(
        "stream",
        help="per-step cost of streamed outputs over one long stream: delta vs cumulative",
        description="One request of --tokens greedy tokens streamed through LLM.stream, with "
        "delta outputs and with cumulative outputs (the peer); per step, the time spent "
        "building and delivering the output, against the position. Default model: the "
        '"tiny" dummy preset (cheap forward), its context extended to fit. '
        "--max-num-seqs, --max-model-len and --num-kv-blocks are ignored.",
    )
    _common(st, peer=False)
    st.add_argument("--tokens", type=int, default=16384, help="generated tokens (default 16384)")
    st.add_argument("--prompt-len", type=int, default=16, help="prompt tokens (default 16)")
    st.set_defaults(func=_stream, model="tiny", load_format="dummy")


def add_bench_parser(subparsers: Any) -> None:
    """Add `bench` (throughput, latency, decode-curve, stream, speedup, bandwidth,
    decode-attention) to the `thinfer` sub-commands."""
    bench = subparsers.add_parser(
        "bench", help="benchmarks: throughput, latency, decode curves, GPU decode speed"
    )
    kinds = bench.add_subparsers(dest="bench_command", required=True)

    tp = kinds.add_parser(
        "throughput",
        help="tokens/s of batch generation per batch size",
        description="Offline batch generation (greedy, EOS ignored) per batch size; "
        "--max-num-seqs is ignored: each run uses its batch size.",
    )
    _common(tp, peers=("hf", "llama.cpp", "none"))
    tp.add_argument("--batch-sizes", default="1,16", help="comma-separated (default 1,16)")
    tp.add_argument("--num-prompts", type=int, default=32)
    tp.add_argument("--max-tokens", type=int, default=128)
    tp.set_defaults(func=_throughput)

    lat = kinds.add_parser(
        "latency",
        help="TTFT/TPOT of single requests, and of thinfer under load",
        description="Each prompt alone through both engines, then all prompts at once "
        "through thinfer (--max-num-seqs concurrent, default 16).",
    )
    _common(lat)
    lat.add_argument("--num-prompts", type=int, default=16)
    lat.add_argument("--max-tokens", type=int, default=64)
    lat.set_defaults(func=_latency, max_num_seqs=16)

    _add_decode_curve(kinds)
    _add_stream(kinds)
    _add_gpu_benches(kinds)
    from thinfer.bench.compaction import add_parser as add_compaction
    from thinfer.bench.determinism import add_parser as add_determinism
    from thinfer.bench.gemm_dataflow_bench import add_parser as add_gemm_dataflow
    from thinfer.bench.gpu_check import add_parser as add_gpu_check
    from thinfer.bench.matmul import add_parser as add_matmul
    from thinfer.bench.prune_latency import add_parser as add_prune_latency
    from thinfer.bench.prune_quality_args import add_parser as add_prune_quality
    from thinfer.bench.softmax_offset import add_parser as add_softmax_offset
    from thinfer.bench.tensor_parallel import add_parser as add_tensor_parallel

    add_compaction(kinds)
    add_determinism(kinds)
    add_gemm_dataflow(kinds)
    add_gpu_check(kinds)
    add_matmul(kinds).set_defaults(func=_matmul)
    add_prune_latency(kinds)
    add_prune_quality(kinds)
    add_softmax_offset(kinds)
    add_tensor_parallel(kinds)
