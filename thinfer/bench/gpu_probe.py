"""The two in-house stages of `thinfer bench gpu-check`: the machine's ceilings (`env`) and
the GPU fast path's correctness against the torch backend (`correctness`).

Each runs in its own process (`python -m thinfer.bench.gpu_probe env|correctness --out F`),
so that a crash, a hang or an out-of-memory error costs that stage alone; each writes one
JSON object to `--out`. `--dry-run` uses tiny shapes on the CPU (Triton through its
interpreter) with the same keys, so the test suite exercises them between GPU runs.
"""

from __future__ import annotations

import argparse
import functools
import json
import shutil
import subprocess
import sys
from typing import Any

import torch

from thinfer.bench.bandwidth import copy_bandwidth, device_timings
from thinfer.bench.hf_peer import prefix_agreement
from thinfer.bench.machine import machine_info


def _nvidia_smi() -> dict[str, str] | None:
    """GPU name, driver, memory and clocks as nvidia-smi reports them (None without it)."""
    if shutil.which("nvidia-smi") is None:
        return None
    fields = "name,driver_version,memory.total,clocks.max.sm,clocks.max.memory,power.limit"
    try:
        out = subprocess.run(
            ["nvidia-smi", f"--query-gpu={fields}", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    values = [v.strip() for v in out.splitlines()[0].split(",")] if out.strip() else []
    return dict(zip(fields.split(","), values, strict=False))


def matmul_tflops(device: torch.device, dtype: torch.dtype, size: int, repeats: int) -> float:
    """Best TFLOP/s of a `size`-cubed matrix product on random data."""
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(size, size, generator=gen, device=device).to(dtype)
    b = torch.randn(size, size, generator=gen, device=device).to(dtype)
    seconds = device_timings(functools.partial(torch.matmul, a, b), device, repeats, warmup=3)
    return 2 * size**3 / min(seconds) / 1e12


def probe_env(dry_run: bool) -> dict[str, Any]:
    """The machine, library versions and the two ceilings: copy GB/s and matmul TFLOP/s."""
    import triton

    device = torch.device("cpu" if dry_run else "cuda")
    dtype = torch.float32 if dry_run else torch.bfloat16
    copy = copy_bandwidth(device, (64 if dry_run else 2048) * 2**20, 5 if dry_run else 20)
    size = 256 if dry_run else 8192
    result: dict[str, Any] = {
        "device": str(device),
        "machine": machine_info(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "nvidia_smi": _nvidia_smi(),
        "copy_gb_per_s": copy["gb_per_s"],
        "copy_median_gb_per_s": copy["median_gb_per_s"],
        "matmul_dtype": str(dtype).removeprefix("torch."),
        "matmul_size": size,
        "matmul_tflops": matmul_tflops(device, dtype, size, 3 if dry_run else 10),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        result["gpu"] = {
            "name": props.name,
            "capability": f"{props.major}.{props.minor}",
            "multiprocessors": props.multi_processor_count,
            "memory_gib": round(props.total_memory / 2**30, 1),
        }
    return result


def _greedy(llm: Any, prompts: list[list[int]], steps: int) -> list[tuple[list[int], list[float]]]:
    """Each prompt's greedy tokens and the log-probability of each chosen token."""
    from thinfer import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=steps, ignore_eos=True, logprobs=0)
    runs = []
    for out in llm.generate(prompts, params):
        completion = out.outputs[0]
        chosen = [entry[token] for entry, token in zip(completion.logprobs, completion.token_ids)]
        runs.append((list(completion.token_ids), [float(v) for v in chosen]))
    return runs


def _forced(llm: Any, prompts: list[list[int]], tokens: list[list[int]]) -> list[list[float]]:
    """The log-probability `llm` gives each of `tokens` (teacher-forced continuations)."""
    from thinfer import SamplingParams

    outs = llm.generate(
        prompts,
        [
            SamplingParams(temperature=0.0, max_tokens=len(t), ignore_eos=True, forced_tokens=t)
            for t in tokens
        ],
    )
    return [[float(v) for v in out.outputs[0].forced_logprobs] for out in outs]


def compare_runs(
    expected: list[tuple[list[int], list[float]]], actual: list[tuple[list[int], list[float]]]
) -> dict[str, Any]:
    """Greedy runs compared: the share of tokens before each sequence's first divergence,
    and whether both are bitwise equal (tokens and log-probabilities)."""
    return {
        "tokens_agreeing_before_divergence": prefix_agreement(
            [tokens for tokens, _ in expected], [tokens for tokens, _ in actual]
        ),
        "bitwise_equal": expected == actual,
    }


def logprob_error(reference: list[list[float]], forced: list[list[float]]) -> dict[str, float]:
    """Max and mean |difference| of teacher-forced log-probabilities against the reference's."""
    diffs = [
        abs(a - b) for ref, got in zip(reference, forced, strict=True) for a, b in zip(ref, got)
    ]
    return {
        "max_abs_diff": max(diffs, default=0.0),
        "mean_abs_diff": sum(diffs) / max(len(diffs), 1),
    }


def _reference_model(model: str, dtype: torch.dtype, device: str) -> Any:
    """`model`'s dummy weights in fp32, rounded to `dtype`: the same weights as the `dtype`
    model, computed in fp32 (the reference both backends are measured against)."""
    from thinfer.engine.factory import load_model

    loaded = load_model(model, dtype=torch.float32, device=device, load_format="dummy")
    with torch.no_grad():
        for param in loaded.net.parameters():
            param.copy_(param.to(dtype).float())
    return loaded


def probe_correctness(dry_run: bool, model: str, steps: int) -> dict[str, Any]:
    """The Triton backend (fused ops) and the torch backend, both in the test dtype, against
    the same weights computed in fp32 by the torch backend: greedy agreement, and the
    teacher-forced log-probabilities of the fp32 tokens. Then CUDA graphs on against off,
    which must agree bitwise."""
    from thinfer import LLM
    from thinfer.bench.decode_timing import synthetic_prompts
    from thinfer.engine.factory import load_model

    device = "cpu" if dry_run else "cuda"
    dtype = torch.float16 if dry_run else torch.bfloat16
    common = {"num_kv_blocks": 256, "max_num_seqs": 4}
    reference = _reference_model(model, dtype, device)
    prompts = synthetic_prompts(reference.config.vocab_size, 4, 16 if dry_run else 200)
    ref_llm = LLM(reference, attention_backend="torch", cuda_graphs=False, **common)
    ref_runs = _greedy(ref_llm, prompts, steps)
    del ref_llm, reference
    ref_tokens = [tokens for tokens, _ in ref_runs]
    ref_logprobs = [logprobs for _, logprobs in ref_runs]
    loaded = load_model(model, dtype=dtype, device=device, load_format="dummy")
    runs, forced = {}, {}
    for name, backend, graphs in (
        ("torch", "torch", False),
        ("triton", "triton", False),
        ("triton_cuda_graphs", "triton", True),
    ):
        llm = LLM(loaded, attention_backend=backend, cuda_graphs=graphs, **common)
        runs[name] = _greedy(llm, prompts, steps)
        if name != "triton_cuda_graphs":
            forced[name] = logprob_error(ref_logprobs, _forced(llm, prompts, ref_tokens))
        del llm
    dtype_name = str(dtype).removeprefix("torch.")
    return {
        "model": model,
        "device": device,
        "dtype": dtype_name,
        "reference": f"torch backend in float32 on the {dtype_name} weights",
        "prompts": len(prompts),
        "prompt_len": len(prompts[0]),
        "steps": steps,
        "torch_vs_reference": compare_runs(ref_runs, runs["torch"]) | forced["torch"],
        "triton_vs_reference": compare_runs(ref_runs, runs["triton"]) | forced["triton"],
        "triton_vs_torch": compare_runs(runs["torch"], runs["triton"]),
        "cuda_graphs_apply": not dry_run,
        "cuda_graphs_vs_eager": compare_runs(runs["triton"], runs["triton_cuda_graphs"]),
    }


def probe_profile(dry_run: bool, model: str, steps: int) -> dict[str, Any]:
    """Batch-1 decode of `model`'s dummy weights profiled with CUDA graphs on and off, and in
    the deterministic mode (its own kernels, no graphs)."""
    from thinfer import LLM
    from thinfer.bench.decode_timing import synthetic_prompts
    from thinfer.bench.step_profile import profile_decode
    from thinfer.engine.factory import load_model

    device = "cpu" if dry_run else "cuda"
    loaded = load_model(
        model, dtype="float32" if dry_run else "bfloat16", device=device, load_format="dummy"
    )
    prompt = synthetic_prompts(loaded.config.vocab_size, 1, 128)[0]
    backend = "torch" if dry_run else "triton"
    result: dict[str, Any] = {"model": model, "device": device, "backend": backend}
    for name, graphs in (("cuda_graphs", True), ("eager", False)):
        llm = LLM(
            loaded, attention_backend=backend, cuda_graphs=graphs, num_kv_blocks=64, max_num_seqs=1
        )
        result[name] = profile_decode(llm, prompt, steps)
        del llm
    llm = LLM(loaded, deterministic=True, num_kv_blocks=64, max_num_seqs=1)
    result["deterministic"] = profile_decode(llm, prompt, steps)
    return result


def main(argv: list[str] | None = None) -> int:
    """`python -m thinfer.bench.gpu_probe env|correctness --out FILE [--dry-run]`."""
    parser = argparse.ArgumentParser(prog="python -m thinfer.bench.gpu_probe")
    parser.add_argument("stage", choices=["env", "correctness", "profile"])
    parser.add_argument("--out", required=True, help="JSON file to write")
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU")
    parser.add_argument("--model", default="llama-2-7b", help="dummy preset (correctness)")
    parser.add_argument("--steps", type=int, default=32, help="greedy tokens (correctness)")
    args = parser.parse_args(argv)
    if args.stage == "env":
        result = probe_env(args.dry_run)
    elif args.stage == "profile":
        model = "tiny" if args.dry_run else args.model
        result = probe_profile(args.dry_run, model, args.steps)
    else:
        model = "tiny" if args.dry_run else args.model
        result = probe_correctness(args.dry_run, model, args.steps)
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result, indent=2)[:4000], flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
