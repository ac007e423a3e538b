"""The stages of `thinfer bench gpu-check`, in order of value, and the targets they are judged
against.

A stage is a command run in its own process with a time cap; its result is the JSON file it
writes (`result_glob` in the stage's output folder). `--dry-run` gives every stage tiny CPU
shapes (Triton through its interpreter) and the same result keys, so the test suite runs the
whole check between the rare GPU runs.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Any

# Test files whose tests run on the GPU when there is one (kernels against their torch
# references, CUDA graphs, the fused model, the GPU benchmarks at real shapes).
GPU_TEST_FILES = (
    "tests/test_invariant_matmul.py",
    "tests/test_invariant_tiles.py",
    "tests/test_kernels_attention.py",
    "tests/test_kernels_fused.py",
    "tests/test_fused_model.py",
    "tests/test_fused_ops_switch.py",
    "tests/test_decode_graphs.py",
    "tests/test_attention_plans.py",
    "tests/test_bench_gpu_path.py",
    "tests/test_flat_gemm.py",
)


STAGE_NAMES = (
    "env",
    "correctness",
    "bandwidth",
    "profile",
    "decode_attention",
    "speedup",
    "decode_curve",
    "gemm_dataflow",
    "bandwidth_with_table",
    "matmul",
    "determinism",
    "tests",
)


@dataclasses.dataclass(frozen=True)
class Stage:
    """One step of the check: `argv` runs it, `cap_s` bounds it, `result_glob` (in the output
    folder) names the JSON it writes; `min_s` is the least time worth starting it with."""

    name: str
    argv: list[str]
    cap_s: float
    min_s: float
    result_glob: str | None


def _bench(kind: str, out: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "thinfer", "bench", kind, "--output-dir", out, *args]


def build_stages(out: str, dry_run: bool) -> list[Stage]:
    """The check's stages writing into folder `out`: GPU shapes, or tiny CPU ones."""
    py = sys.executable
    probe = [py, "-m", "thinfer.bench.gpu_probe"]
    probe_flags = ["--dry-run", "--steps", "8"] if dry_run else []
    if dry_run:
        model = ["--model", "tiny", "--load-format", "dummy", "--device", "cpu"]
        model += ["--dtype", "float32", "--threads", "2"]
        curve_model = model
        bandwidth = ["--input-len", "16", "--output-len", "8", "--copy-mib", "16", "--repeats", "3"]
        attention = ["--context-lens", "64,256", "--heads", "4", "--kv-heads", "2"]
        attention += ["--head-dim", "32", "--iters", "2", "--warmup", "1", "--backend", "triton"]
        attention += ["--sweep-split-tokens", "32,64", "--sweep-num-warps", "4"]
        speedup = ["--input-lens", "16,64", "--batch-sizes", "1,2", "--output-len", "4"]
        curve = ["--batch-size", "2", "--steps", "48", "--budget", "40", "--window", "8"]
        tests = ["-k", "test_gpu_"]  # they skip on the CPU: the outcome parse still runs
        matmul = ["--device", "cpu", "--shapes", "48x80", "--max-m", "4", "--repeats", "1"]
        determinism = ["--batch-sizes", "1,2", "--output-len", "4", "--runs", "2"]
        determinism += ["--completion-len", "4", "--max-mates", "2", "--num-kv-blocks", "64"]
        gemm = ["--model", "tiny", "--device", "cpu", "--m", "1,8", "--quick", "--iters", "1"]
    else:
        model = ["--model", "llama-2-7b", "--load-format", "dummy", "--dtype", "bfloat16"]
        curve_model = ["--model", "llama-3-8b", "--load-format", "dummy", "--dtype", "bfloat16"]
        bandwidth = ["--input-len", "128", "--output-len", "256"]
        attention = ["--backend", "triton", "--sweep-split-tokens", "256,512,1024,2048"]
        attention += ["--sweep-num-warps", "2,4,8"]
        speedup = ["--input-lens", "128,1024,8192,32768", "--batch-sizes", "1,8"]
        speedup += ["--output-len", "32"]
        curve = ["--batch-size", "8", "--steps", "1536", "--budget", "512", "--window", "128"]
        gemm = ["--model", "llama-2-7b", "--m", "1,2,4,8,16,32,64"]
        matmul = []
        determinism = ["--batch-sizes", "1,16,64", "--runs", "1000", "--runs-budget-s", "90"]
        determinism += ["--completion-len", "32"]
        tests = []
    pytest = [py, "-m", "pytest", "-v", "-rfE", "-p", "no:cacheprovider", *tests]
    return [
        Stage(
            "env",
            [*probe, "env", "--out", f"{out}/env.json"] + probe_flags,
            60,
            10,
            "env.json",
        ),
        Stage(
            "correctness",
            [*probe, "correctness", "--out", f"{out}/correctness.json"] + probe_flags,
            120,
            30,
            "correctness.json",
        ),
        Stage(
            "bandwidth", _bench("bandwidth", out, *model, *bandwidth), 120, 40, "bandwidth_*.json"
        ),
        Stage(
            "profile",
            [*probe, "profile", "--out", f"{out}/profile.json"] + probe_flags,
            180,  # 90 s ran out on an H200: the deterministic engine compiles 19 tile shapes
            20,
            "profile.json",
        ),
        Stage(
            "decode_attention",
            _bench("decode-attention", out, *attention),
            90,
            15,
            "decode_attention_*.json",
        ),
        Stage("speedup", _bench("speedup", out, *model, *speedup), 150, 60, "speedup_*.json"),
        Stage(
            "decode_curve",
            _bench("decode-curve", out, *curve_model, *curve),
            120,
            40,
            "decode_curve_*.json",
        ),
        Stage(
            "gemm_dataflow",
            _bench("gemm-dataflow", out, *gemm, "--table", f"{out}/gemm_table.json"),
            150,
            30,
            "gemm_dataflow_*.json",
        ),
        Stage(
            "bandwidth_with_table",
            _bench("bandwidth", f"{out}/with_table", *model, *bandwidth, "--peer", "none")
            + ["--gemm-dataflow", f"{out}/gemm_table.json"],
            90,
            30,
            "with_table/bandwidth_*.json",
        ),
        Stage("matmul", _bench("matmul", out, *matmul), 150, 30, "matmul_*.json"),
        Stage(
            "determinism",
            _bench("determinism", out, *model, *determinism),
            200,
            60,
            "determinism_*.json",
        ),
        Stage("tests", [*pytest, *GPU_TEST_FILES], 150, 30, None),
    ]


def _target(value: float | None, goal: float, what: str, at_most: bool = False) -> dict[str, Any]:
    met = None if value is None else (value <= goal if at_most else value >= goal)
    return {"what": what, "value": value, "goal": goal, "at_most": at_most, "met": met}


def _least_triton_fraction(results: dict[str, Any]) -> float | None:
    """The least, over Llama-2-7B's linear shapes and M <= 16, of the best Triton kernel's
    bandwidth as a fraction of the copy bandwidth."""
    copy = (results.get("env") or {}).get("copy_gb_per_s")
    shapes = (results.get("gemm_dataflow") or {}).get("shapes") or {}
    fractions = [
        row["best_triton"]["tb_per_s"] * 1e3 / copy
        for entry in shapes.values()
        for row in entry["rows"]
        if row["m"] <= 16 and row.get("best_triton") and copy
    ]
    return min(fractions, default=None)


def judge_targets(results: dict[str, Any]) -> dict[str, Any]:
    """Issue 14's targets from the stages' results (value None where a stage gave none)."""
    bandwidth = results.get("bandwidth") or {}
    mbu = (bandwidth.get("thinfer") or {}).get("mbu")
    attention = (results.get("decode_attention") or {}).get("results") or []
    long = [r["ratio"] for r in attention if r["context_len"] >= 8192]
    speedup = (results.get("speedup") or {}).get("min_speedup")
    correctness = results.get("correctness") or {}
    graphs = (correctness.get("cuda_graphs_vs_eager") or {}).get("bitwise_equal")
    triton_error = (correctness.get("triton_vs_reference") or {}).get("max_abs_diff")
    torch_error = (correctness.get("torch_vs_reference") or {}).get("max_abs_diff")
    error_ratio = None
    if triton_error is not None and torch_error is not None:
        error_ratio = triton_error / max(torch_error, 1e-6)
    with_table = ((results.get("bandwidth_with_table") or {}).get("thinfer") or {}).get("mbu")
    return {
        "batch1_mbu": _target(mbu, 0.85, "batch-1 decode MBU of Llama-2-7B bf16"),
        "batch1_mbu_with_table": _target(
            with_table, 0.85, "the same with the measured gemm dataflow table"
        ),
        "flat_gemm_bandwidth": _target(
            _least_triton_fraction(results), 0.8, "best Triton GEMM at M <= 16 / copy bandwidth"
        ),
        "speedup_vs_hf": _target(speedup, 5.0, "least decode speedup over HF in the grid"),
        "paged_vs_sdpa_8k": _target(
            min(long) if long else None, 0.9, "paged decode attention / SDPA bandwidth, >= 8k"
        ),
        "cuda_graphs_bitwise": _target(
            None if graphs is None else float(graphs), 1.0, "CUDA graphs on == off, bitwise"
        ),
        "triton_logprob_error": _target(
            error_ratio,
            2.0,
            "Triton's teacher-forced logprob error vs fp32, over the torch backend's",
            at_most=True,
        ),
    }
