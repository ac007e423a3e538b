"""`thinfer bench gpu-check`: the dry run (tiny CPU shapes, Triton interpreted) runs every
stage and writes the same summary a GPU run does, so the check cannot rot between the rare
GPU loans; the budget, the stage timeout, the test-outcome parse and the targets are checked
on their own."""

from __future__ import annotations

import json
import sys

import pytest

from thinfer.bench.gpu_check import count_test_outcomes, run_stage
from thinfer.bench.gpu_probe import compare_runs, logprob_error
from thinfer.bench.gpu_stages import STAGE_NAMES, Stage, build_stages, judge_targets
from thinfer.cli import main


def test_dry_run_writes_every_stage(tmp_path):
    assert main(["bench", "gpu-check", "--dry-run", "--out", str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "gpu_check.json").read_text())
    stages = {stage["name"]: stage for stage in summary["stages"]}
    assert list(stages) == list(STAGE_NAMES)
    assert all(stage["status"] == "ok" for stage in stages.values()), {
        name: stage.get("log_tail") for name, stage in stages.items() if stage["status"] != "ok"
    }
    results = summary["results"]
    assert results["env"]["copy_gb_per_s"] > 0 and results["env"]["matmul_tflops"] > 0
    correctness = results["correctness"]
    assert correctness["cuda_graphs_vs_eager"]["bitwise_equal"]
    assert correctness["triton_vs_reference"]["max_abs_diff"] < 0.05
    assert results["bandwidth"]["thinfer"]["mbu"] > 0
    assert results["profile"]["eager"]["wall_ms_per_token"] > 0
    assert results["profile"]["deterministic"]["host_ops"][0]["calls_per_token"] > 0
    assert all("sweep_best" in r for r in results["decode_attention"]["results"])
    assert results["speedup"]["complete"] and results["decode_curve"]["summary"]
    assert len(results["gemm_dataflow"]["table"]["shapes"]) == 5
    assert results["bandwidth_with_table"]["thinfer"]["mbu"] > 0  # the engine loaded the table
    assert results["matmul"]["shapes"]["48x80"]["invariance"]["invariant"]["row0_invariant"]
    assert results["determinism"]["distinct"]["deterministic"]["distinct_completions"] == 1
    tests = results["tests"]
    assert tests["skipped"] > 0 and tests["failed"] == tests["error"] == 0  # GPU tests skip here
    assert set(summary["targets"]) >= {"batch1_mbu", "speedup_vs_hf", "flat_gemm_bandwidth"}
    files = sorted(p.name for p in tmp_path.iterdir())
    assert len(files) <= 10 and "gpu_check.log" in files
    assert sum(name.endswith(".png") for name in files) == 7


def test_budget_skips_what_does_not_fit(tmp_path, capsys):
    argv = ["bench", "gpu-check", "--dry-run", "--out", str(tmp_path), "--budget-s", "5"]
    assert main(argv) == 0
    summary = json.loads((tmp_path / "gpu_check.json").read_text())
    assert {stage["status"] for stage in summary["stages"]} == {"skipped"}
    assert all(target["met"] is None for target in summary["targets"].values())
    assert "skipped" in capsys.readouterr().out


def test_bad_arguments(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["bench", "gpu-check", "--out", str(tmp_path), "--only", "nonsense"])
    assert "invalid choice: 'nonsense'" in capsys.readouterr().err
    assert main(["bench", "gpu-check", "--out", str(tmp_path), "--budget-s", "0"]) == 2
    assert "--budget-s must be > 0" in capsys.readouterr().err


def test_a_hanging_stage_is_stopped(tmp_path):
    sleeper = Stage("sleeper", [sys.executable, "-c", "import time; time.sleep(60)"], 1, 0, None)
    with open(tmp_path / "log", "w") as log:
        record = run_stage(sleeper, 1.0, {}, log)
    assert record["status"] == "timeout" and record["returncode"] is None
    assert record["seconds"] < 30


def test_test_outcomes_are_counted_from_a_cut_log():
    log = "\n".join(
        [
            "tests/test_a.py::test_x PASSED                                  [ 10%]",
            "tests/test_a.py::test_y[bf16-8] FAILED                          [ 20%]",
            "tests/test_b.py::test_z SKIPPED (needs CUDA)                    [ 30%]",
            "tests/test_b.py::test_w ERROR                                   [ 40%]",
            "FAILED tests/test_a.py::test_y[bf16-8] - AssertionError",  # summary: not counted
        ]
    )
    counts = count_test_outcomes(log)
    assert (counts["passed"], counts["failed"], counts["skipped"], counts["error"]) == (1, 1, 1, 1)
    assert counts["failing"] == ["tests/test_a.py::test_y[bf16-8]", "tests/test_b.py::test_w"]


def test_targets_from_partial_results():
    targets = judge_targets({"bandwidth": {"thinfer": {"mbu": 0.9}}})
    assert targets["batch1_mbu"]["met"] is True
    assert targets["speedup_vs_hf"]["value"] is None and targets["speedup_vs_hf"]["met"] is None
    correctness = {
        "torch_vs_reference": {"max_abs_diff": 0.1},
        "triton_vs_reference": {"max_abs_diff": 0.3},
        "cuda_graphs_vs_eager": {"bitwise_equal": False},
    }
    targets = judge_targets({"correctness": correctness})
    assert targets["triton_logprob_error"]["value"] == pytest.approx(3.0)
    assert targets["triton_logprob_error"]["met"] is False  # at most 2x the torch backend's
    assert targets["cuda_graphs_bitwise"]["met"] is False


def test_run_comparisons():
    a = [([1, 2, 3, 4], [-1.0, -2.0, -3.0, -4.0])]
    b = [([1, 2, 9, 4], [-1.0, -2.0, -3.5, -4.0])]
    assert compare_runs(a, b) == {"tokens_agreeing_before_divergence": 0.5, "bitwise_equal": False}
    assert compare_runs(a, a)["bitwise_equal"]
    error = logprob_error([[-1.0, -2.0]], [[-1.5, -2.0]])
    assert error == {"max_abs_diff": 0.5, "mean_abs_diff": 0.25}


def test_gpu_stages_use_real_shapes():
    stages = {stage.name: stage for stage in build_stages("/out", dry_run=False)}
    assert list(stages) == list(STAGE_NAMES)
    assert "llama-2-7b" in stages["bandwidth"].argv and "llama-3-8b" in stages["decode_curve"].argv
    assert "32768" in " ".join(stages["speedup"].argv)
