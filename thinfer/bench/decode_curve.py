"""`thinfer bench decode-curve`: speed, KV memory and FLOPs per decoding step, full cache
versus one compression method (the form of the DynTS paper's speed figure).

One batch of `--batch-size` copies of the same prompt is decoded greedily, EOS ignored, twice
in one process on one engine: with the full KV cache, then with `--method`. The prefill step
samples each sequence's first token; then `--steps` decoding steps, each sampling one more
token per sequence, are recorded from `LLMEngine.last_stats` (one more step ends the run; it is
not recorded, as its sequences finish and free their KV blocks within it): tokens/s, KV
memory in use, mean and max KV length per sequence after the step, and GFLOPs. The peak KV
length of the run (`peak_max_kv_len`) is the engine's `RequestMetrics.peak_kv_slots` (counting the
token being written, before eviction), the most over its requests. GFLOPs of a step = attention
(QK^T and PV over the cached keys) + the linear layers (q/k/v/o, gate/up/down of every layer
and `lm_head` on the sampled rows), 2 FLOPs per multiply-add; norms, RoPE, softmax, the
sampler, KV compaction and the DynTS predictor head (~3 d^2 per token) are not counted.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from typing import TYPE_CHECKING, Any

import torch

from thinfer.bench.decode_curve_record import (
    SMOOTH_STEPS,
    run_record,
    sig,
    summarize_runs,
)
from thinfer.bench.model_cost import linear_flops, weight_bytes
from thinfer.bench.prompts import tokenize_bench_prompts
from thinfer.bench.report import model_short_name, safe_name, write_result
from thinfer.compression.config import needs_predictor
from thinfer.config import ModelConfig, resolve_dtype
from thinfer.engine.telemetry import StepStats
from thinfer.sampling_params import SamplingParams

if TYPE_CHECKING:
    from thinfer.engine.llm_engine import LLMEngine

BLOCK_SIZE = 16
WARMUP_TOKENS = 4
MEMORY_HEADROOM = 0.9  # of the free memory, for weights + KV; the rest for activations
RANDOM_HEAD = "random head (seed 0): speed and memory do not depend on its quality"


def _compression(args: argparse.Namespace, predictor: str | None) -> dict[str, Any]:
    names = ("method", "budget", "window", "ratio", "trigger")
    config: dict[str, Any] = {name: getattr(args, name) for name in names}
    if needs_predictor(args.method):
        config["predictor"] = predictor
    return config


def _validate(args: argparse.Namespace) -> None:
    from thinfer.compression import CompressionConfig

    for name in ("steps", "batch_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.predictor is not None:
        if not needs_predictor(args.method):
            raise ValueError(f"--predictor is not used by --method {args.method}")
        if not os.path.isfile(args.predictor):
            raise ValueError(f"--predictor: no such file {args.predictor}")
    CompressionConfig.coerce(_compression(args, args.predictor or "(random head)"))


def _sizing(args: argparse.Namespace, cfg: ModelConfig, prompt_len: int) -> dict[str, int]:
    """max_model_len, num_kv_blocks and prefill token budget for the full-cache run."""
    from thinfer.engine.kv_cache import available_memory_bytes

    if args.budget <= prompt_len or (
        needs_predictor(args.method) and args.budget <= prompt_len + args.window
    ):
        what = "prompt + window" if needs_predictor(args.method) else "prompt"
        raise ValueError(f"--budget {args.budget} must exceed the {what} ({prompt_len} tokens)")
    tokens = prompt_len + args.steps + 2  # prefill token, `steps` recorded, 1 final step
    context = cfg.max_position_embeddings
    if tokens > context:
        raise ValueError(
            f"prompt ({prompt_len} tokens) + {args.steps + 2} generated tokens exceed the model's "
            f"context of {context}; lower --steps or use a longer-context model "
            "(e.g. --model llama-3.1-8b --load-format dummy)"
        )
    max_model_len = args.max_model_len or tokens
    if max_model_len < tokens:
        raise ValueError(f"--max-model-len {max_model_len} < the {tokens} tokens a sequence needs")
    blocks = args.batch_size * -(-tokens // BLOCK_SIZE) + 1  # + CUDA graphs' scratch block
    num_kv_blocks = args.num_kv_blocks or blocks
    if num_kv_blocks < blocks:
        raise ValueError(f"--num-kv-blocks {num_kv_blocks} < the {blocks} the full cache needs")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = resolve_dtype(args.dtype, device)
    kv = num_kv_blocks * BLOCK_SIZE * cfg.kv_elements_per_token * dtype.itemsize
    need, free = kv + weight_bytes(cfg, dtype), available_memory_bytes(device)
    if need > MEMORY_HEADROOM * free:
        raise ValueError(
            f"the full-cache run needs {kv / 1e9:.1f} GB of KV cache ({args.batch_size} sequences "
            f"x {tokens} tokens) + {(need - kv) / 1e9:.1f} GB of weights, but {device} has "
            f"{free / 1e9:.1f} GB free; lower --batch-size or --steps"
        )
    return {
        "max_model_len": max_model_len,
        "num_kv_blocks": num_kv_blocks,
        "max_num_batched_tokens": max(args.max_num_batched_tokens, args.batch_size * prompt_len),
    }


def _generate(
    engine: LLMEngine,
    prompt: list[int],
    batch: int,
    max_tokens: int,
    compression: dict | None,
    tag: str,
) -> tuple[list[StepStats], float, int]:
    """Run one batch to completion; (stats of the all-decode steps, seconds of the others,
    the most KV slots a request held)."""
    params = SamplingParams(
        max_tokens=max_tokens, temperature=0.0, ignore_eos=True, kv_compression=compression
    )
    ids: list[str] = []
    decode: list[StepStats] = []
    other = 0.0
    peak = 0
    try:
        for i in range(batch):
            ids.append(engine.add_request(list(prompt), params, f"decode-curve-{tag}-{i}"))
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    peak = max(peak, out.metrics.peak_kv_slots)
            stats = engine.last_stats
            assert stats is not None
            if stats.num_tokens == batch == stats.num_sampled == len(stats.kv_lens):
                decode.append(stats)
            else:
                other += stats.seconds
    except BaseException:
        for request_id in ids:
            engine.abort_request(request_id)
        raise
    return decode, other, peak


def run_decode_curve(args: argparse.Namespace) -> dict[str, Any]:
    """Run the decode-curve benchmark, print a summary, write JSON + PNG; return the data."""
    from thinfer.bench.decode_curve_plot import plot_decode_curve, print_summary
    from thinfer.cli_args import llm_kwargs
    from thinfer.compression.predictor import ImportancePredictor, save_predictor
    from thinfer.llm import LLM
    from thinfer.loading import load_checkpoint

    _validate(args)
    checkpoint = load_checkpoint(args.model, args.load_format)
    cfg = checkpoint.config
    prompt = tokenize_bench_prompts(checkpoint.tokenizer, cfg.vocab_size, 1)[0]
    sizing = _sizing(args, cfg, len(prompt))
    kwargs = llm_kwargs(args)
    kwargs.update(sizing, max_num_seqs=args.batch_size, block_size=BLOCK_SIZE)
    try:
        llm = LLM(**kwargs)  # type: ignore[arg-type]
    except torch.OutOfMemoryError as e:
        raise ValueError(f"out of memory building the engine ({sizing}): lower --batch-size") from e
    device = next(llm.engine.model.parameters()).device
    dtype = next(llm.engine.model.parameters()).dtype
    with tempfile.TemporaryDirectory() as tmp:
        predictor, note = args.predictor, args.predictor
        if needs_predictor(args.method) and predictor is None:
            predictor, note = os.path.join(tmp, "random_head.safetensors"), RANDOM_HEAD
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                save_predictor(ImportancePredictor(cfg.hidden_size), predictor)
        compression = _compression(args, predictor)
        configs = {"full": None, "method": compression}
        for key, config in configs.items():
            _generate(llm.engine, prompt, 1, WARMUP_TOKENS, config, f"warmup-{key}")
        print(
            f"{llm.source}: batch {args.batch_size} x {args.steps} decoding steps, "
            f"prompt {len(prompt)} tokens, full cache vs {args.method}",
            flush=True,
        )
        raw: dict[str, list[StepStats]] = {}
        runs: dict[str, dict[str, Any]] = {}
        for key, config in configs.items():
            stats, other, peak = _generate(
                llm.engine, prompt, args.batch_size, args.steps + 2, config, key
            )
            if len(stats) != args.steps + 1:
                raise RuntimeError(f"{key}: {len(stats)} all-decode steps, not {args.steps + 1}")
            other += stats[-1].seconds
            stats = raw[key] = stats[: args.steps]
            label = "full cache" if config is None else args.method
            runs[key] = run_record(label, cfg, stats, other, config, peak)
    if note is not None:
        runs["method"]["kv_compression"]["predictor"] = note
    data: dict[str, Any] = {
        "benchmark": "decode_curve",
        "model": llm.source,
        "load_format": args.load_format,
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "batch_size": args.batch_size,
        "steps": args.steps,
        "prompt_tokens": len(prompt),
        "method": args.method,
        "kv_compression": runs["method"]["kv_compression"],
        "predictor": note,
        "max_model_len": sizing["max_model_len"],
        "num_kv_blocks": sizing["num_kv_blocks"],
        "kv_bytes_per_token": cfg.kv_elements_per_token * dtype.itemsize,
        "smoothing_steps": SMOOTH_STEPS,
        "linear_gflops_per_step": sig(linear_flops(cfg, args.batch_size, args.batch_size) / 1e9),
        "notes": {
            "step": "per_step[i] is decoding step i+1; the prefill step (first token) and "
            "the final step (sequences finish, KV freed) are timed in other_seconds",
            "tokens_per_s": "tokens sampled / step seconds (compaction and predictor included)",
            "kv_gb": "bytes of the KV blocks in use by the batch after the step / 1e9",
            "gflops": "attention (QK^T, PV) + linear layers (q/k/v/o, gate/up/down, lm_head on "
            "sampled rows), 2 FLOPs per multiply-add; not norms, RoPE, softmax, predictor head",
            "tokens_per_s_smoothed": f"tokens / seconds over the last {SMOOTH_STEPS} steps",
            "compression_ms": "milliseconds of the step inside compression (select + compact)",
        },
        "runs": runs,
        "summary": summarize_runs(runs, raw),
    }
    name = f"decode_curve_{safe_name(args.method)}_{model_short_name(llm)}_{device.type}"
    print_summary(data)
    json_path, png_path = write_result(name, data, plot_decode_curve(data), args.output_dir)
    print(f"wrote {json_path} and {png_path}")
    return data
