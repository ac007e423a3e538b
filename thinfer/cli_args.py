"""Model and engine options shared by every `thinfer` subcommand.

A low-level module: `thinfer.cli` and the subcommand modules (bench, eval, serve, dynts) import
it, and it imports none of them, so the command tree has no import cycle.
"""

from __future__ import annotations

import argparse

from thinfer.config import ATTENTION_BACKENDS

# --fused-ops value -> LLM(fused_ops=...)
FUSED_OPS_FLAG: dict[str, str | bool] = {"auto": "auto", "on": True, "off": False}


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """Options that choose and size the model and engine."""
    parser.add_argument(
        "--model", default=None, help="HF dir, GGUF file or preset (default: SmolLM2)"
    )
    parser.add_argument(
        "--load-format", default="auto", choices=["auto", "gguf", "safetensors", "dummy"]
    )
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--device", default=None)
    parser.add_argument("--max-num-seqs", type=int, default=64)
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048)
    parser.add_argument("--max-model-len", type=int, default=None)
    parser.add_argument("--num-kv-blocks", type=int, default=None)
    parser.add_argument(
        "--kv-cache-memory-fraction",
        type=float,
        default=0.5,
        help="without --num-kv-blocks: share of the memory free after loading that the KV "
        "pool takes (default 0.5; two servers on one machine need less each)",
    )
    parser.add_argument("--seed", type=int, default=0, help="engine seed for unseeded requests")
    parser.add_argument(
        "--attention-backend",
        default="auto",
        choices=ATTENTION_BACKENDS,
        help="paged attention: triton kernels (CUDA) or torch; auto = triton on CUDA",
    )
    parser.add_argument(
        "--cuda-graphs",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="replay decode steps from CUDA graphs (triton backend on CUDA only; default on)",
    )
    parser.add_argument(
        "--fused-ops",
        default="auto",
        choices=list(FUSED_OPS_FLAG),
        help="fused Triton kernels for add+RMSNorm, RoPE, SiLU-mul; auto = with triton attention",
    )
    parser.add_argument(
        "--quantization",
        default="none",
        choices=["none", "int4", "int8"],
        help="weight-only quantization of the linear layers (CPU, fp32): int4 (lm_head in "
        "int8) or int8 (default none)",
    )
    parser.add_argument(
        "--gemm-dataflow",
        default=None,
        metavar="TABLE",
        help="kernel per linear layer and batch size, from `thinfer bench gemm-dataflow` "
        "(default: cuBLAS everywhere)",
    )
    parser.add_argument(
        "--deterministic",
        action="store_true",
        help="batch-invariant kernels: each request's tokens and logprobs bitwise independent "
        "of its batch (slower; see docs/determinism.md)",
    )
    parser.add_argument(
        "--tensor-parallel-size",
        type=int,
        default=1,
        help="split the model and its KV cache over N processes: N GPUs, or N CPU processes "
        "over gloo (spawned here, or the ranks of a torchrun job; see docs/distributed.md)",
    )


def llm_kwargs(args: argparse.Namespace) -> dict[str, object]:
    """LLM(...) keyword arguments from parsed model options."""
    return dict(
        model=args.model,
        load_format=args.load_format,
        dtype=args.dtype,
        device=args.device,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_model_len=args.max_model_len,
        num_kv_blocks=args.num_kv_blocks,
        seed=args.seed,
        attention_backend=args.attention_backend,
        cuda_graphs=args.cuda_graphs,
        fused_ops=FUSED_OPS_FLAG[args.fused_ops],
        kv_cache_memory_fraction=args.kv_cache_memory_fraction,
        gemm_dataflow=args.gemm_dataflow,
        quantization=None if args.quantization == "none" else args.quantization,
        deterministic=args.deterministic,
        tensor_parallel_size=args.tensor_parallel_size,
    )
