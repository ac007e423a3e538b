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


def compare_runs(
    expected: list[tuple[list[int], list[float]]], actual: list[tuple[list[int], list[float]]]
) -> dict[str, Any]:
    """Token agreement up to each sequence's first divergence, the largest log-probability
    difference over those agreeing positions, and whether both runs are bitwise equal."""
    same_prefix, total, max_diff = 0, 0, 0.0
    for (tokens_a, logp_a), (tokens_b, logp_b) in zip(expected, actual, strict=True):
        total += len(tokens_a)
        agree = 0
        while agree < min(len(tokens_a), len(tokens_b)) and tokens_a[agree] == tokens_b[agree]:
            agree += 1
        same_prefix += agree
        # the chosen token's log-probability at a position is comparable until one run
        # picked another token there (the position after a divergence sees other inputs)
        compared = min(agree + 1, len(logp_a), len(logp_b))
        for k in range(compared):
            max_diff = max(max_diff, abs(logp_a[k] - logp_b[k]))
    return {
        "tokens_agreeing_before_divergence": same_prefix / total if total else 1.0,
        "logprob_max_abs_diff": max_diff,
        "bitwise_equal": expected == actual,
    }


def probe_correctness(dry_run: bool, model: str, steps: int) -> dict[str, Any]:
    """The Triton backend (fused ops) against the torch backend on the same dummy weights,
    greedy; then CUDA graphs on against off, which must agree bitwise."""
    from thinfer import LLM
    from thinfer.bench.decode_timing import synthetic_prompts
    from thinfer.engine.factory import load_model

    device = "cpu" if dry_run else "cuda"
    dtype = "float32" if dry_run else "bfloat16"
    loaded = load_model(model, dtype=dtype, device=device, load_format="dummy")
    prompts = synthetic_prompts(loaded.config.vocab_size, 4, 16 if dry_run else 200)
    common = {"num_kv_blocks": 256, "max_num_seqs": 4}
    runs = {}
    for name, backend, graphs in (
        ("torch", "torch", False),
        ("triton", "triton", False),
        ("triton_cuda_graphs", "triton", True),
    ):
        llm = LLM(loaded, attention_backend=backend, cuda_graphs=graphs, **common)
        runs[name] = _greedy(llm, prompts, steps)
        del llm
    graphs_apply = not dry_run
    return {
        "model": model,
        "device": device,
        "dtype": dtype,
        "prompts": len(prompts),
        "prompt_len": len(prompts[0]),
        "steps": steps,
        "triton_vs_torch": compare_runs(runs["torch"], runs["triton"]),
        "cuda_graphs_apply": graphs_apply,
        "cuda_graphs_vs_eager": compare_runs(runs["triton"], runs["triton_cuda_graphs"]),
    }


def main(argv: list[str] | None = None) -> int:
    """`python -m thinfer.bench.gpu_probe env|correctness --out FILE [--dry-run]`."""
    parser = argparse.ArgumentParser(prog="python -m thinfer.bench.gpu_probe")
    parser.add_argument("stage", choices=["env", "correctness"])
    parser.add_argument("--out", required=True, help="JSON file to write")
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU")
    parser.add_argument("--model", default="llama-2-7b", help="dummy preset (correctness)")
    parser.add_argument("--steps", type=int, default=32, help="greedy tokens (correctness)")
    args = parser.parse_args(argv)
    if args.stage == "env":
        result = probe_env(args.dry_run)
    else:
        model = "tiny" if args.dry_run else args.model
        result = probe_correctness(args.dry_run, model, args.steps)
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result, indent=2)[:4000], flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
