"""`thinfer bench gpu-check`: everything a short GPU loan should measure, in one command.

The stages (`thinfer.bench.gpu_stages`) run one after another, each in its own process under
a time cap, in order of value, until `--budget-s` is spent; a stage that fails, hangs or runs
out of memory costs itself alone. After every stage the summary is rewritten, so a check cut
short still leaves what it had. `--out DIR` receives at most 8 files: `gpu_check.json` (the
summary: environment, test counts, correctness, every benchmark's JSON, the targets met or
missed), `gpu_check.log` (every stage's output) and the benchmarks' PNGs.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

from thinfer.bench.gpu_stages import STAGE_NAMES, Stage, build_stages, judge_targets
from thinfer.bench.machine import machine_info

MAX_PNGS = 6  # with the JSON and the log: 8 files, what one GPU call can bring back
LOG_TAIL_CHARS = 3000
_TEST_LINE = re.compile(r"^(tests/.+?::.+?) (PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)\b")


def count_test_outcomes(log: str) -> dict[str, Any]:
    """Outcome counts (and the failing test ids) from `pytest -v` output, complete or cut."""
    counts = {"passed": 0, "failed": 0, "skipped": 0, "error": 0, "xfail": 0, "xpass": 0}
    failing: list[str] = []
    for line in log.splitlines():
        match = _TEST_LINE.match(line)
        if match is None:
            continue
        outcome = match.group(2).lower()
        counts["error" if outcome == "error" else outcome] += 1
        if outcome in ("failed", "error"):
            failing.append(match.group(1))
    return counts | {"failing": failing}


def _stop(process: subprocess.Popen[bytes]) -> None:
    """End `process` and everything it started (it leads its own session)."""
    for sig, wait_s in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


def run_stage(stage: Stage, timeout_s: float, env: dict[str, str], log: IO[str]) -> dict[str, Any]:
    """Run one stage under `timeout_s`; its status, time, exit code and output tail."""
    log.write(f"\n===== {stage.name}: {shlex.join(stage.argv)}\n")
    log.flush()
    with tempfile.TemporaryFile("w+") as output:
        start = time.monotonic()
        process = subprocess.Popen(
            stage.argv, stdout=output, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        try:
            returncode: int | None = process.wait(timeout=timeout_s)
            status = "ok" if returncode == 0 else "failed"
        except subprocess.TimeoutExpired:
            _stop(process)
            returncode, status = None, "timeout"
        seconds = time.monotonic() - start
        output.seek(0)
        text = output.read()
    log.write(text)
    log.write(f"\n===== {stage.name}: {status} after {seconds:.1f} s\n")
    log.flush()
    print(f"[gpu-check] {stage.name}: {status} after {seconds:.1f} s", flush=True)
    return {
        "name": stage.name,
        "status": status,
        "seconds": round(seconds, 2),
        "timeout_s": round(timeout_s, 1),
        "returncode": returncode,
        "command": shlex.join(stage.argv),
        "log_tail": text[-LOG_TAIL_CHARS:],
        "_log": text,
    }


def _stage_result(stage: Stage, raw: str, record: dict[str, Any]) -> dict[str, Any] | None:
    """The JSON the stage wrote, or for the tests their outcome counts."""
    if stage.name == "tests":
        return count_test_outcomes(record["_log"])
    if stage.result_glob is None:
        return None
    paths = sorted(glob.glob(os.path.join(raw, stage.result_glob)), key=os.path.getmtime)
    if not paths:
        return None
    with open(paths[-1], encoding="utf-8") as f:
        return json.load(f)


def _no_tests_ran(counts: dict[str, Any] | None) -> bool:
    return not counts or not sum(v for k, v in counts.items() if k != "failing")


def _write_summary(out: Path, summary: dict[str, Any], raw: str) -> None:
    for png in sorted(glob.glob(os.path.join(raw, "*.png")))[:MAX_PNGS]:
        shutil.copy(png, out / os.path.basename(png))
    (out / "gpu_check.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")


def _stage_env(dry_run: bool) -> dict[str, str]:
    env = dict(os.environ) | {"THINFER_GPU_CHECK": "1", "PYTHONUNBUFFERED": "1"}
    if dry_run:
        env["TRITON_INTERPRET"] = "1"
    root = str(Path(__file__).resolve().parents[2])  # the checkout, when not installed
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env


def run_gpu_check(args: argparse.Namespace) -> dict[str, Any]:
    """Run the stages within `args.budget_s`; write and return the summary."""
    if args.budget_s <= 0:
        raise ValueError(f"--budget-s must be > 0, got {args.budget_s}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    summary: dict[str, Any] = {
        "benchmark": "gpu_check",
        "dry_run": args.dry_run,
        "budget_s": args.budget_s,
        "started_utc": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "stages": [],
        "results": {},
        "targets": {},
    }
    env = _stage_env(args.dry_run)
    with tempfile.TemporaryDirectory() as raw, open(out / "gpu_check.log", "w") as log:
        for stage in build_stages(raw, args.dry_run):
            if args.only and stage.name not in args.only:
                continue
            remaining = args.budget_s - (time.monotonic() - start)
            if remaining < stage.min_s:
                print(f"[gpu-check] {stage.name}: skipped, {remaining:.0f} s left", flush=True)
                summary["stages"].append({"name": stage.name, "status": "skipped"})
            else:
                record = run_stage(stage, min(stage.cap_s, remaining), env, log)
                result = _stage_result(stage, raw, record)
                if stage.name == "tests" and record["status"] == "ok" and _no_tests_ran(result):
                    record["status"] = "failed"  # the selection is broken
                del record["_log"]
                summary["stages"].append(record)
                summary["results"][stage.name] = result
            summary["targets"] = judge_targets(summary["results"])
            summary["elapsed_s"] = round(time.monotonic() - start, 1)
            _write_summary(out, summary, raw)
    print(json.dumps(summary["targets"], indent=1), flush=True)
    return summary


def add_parser(kinds: Any) -> None:
    """Register `thinfer bench gpu-check`."""
    gc = kinds.add_parser(
        "gpu-check",
        help="one-call GPU check: environment, GPU tests, correctness, speed benchmarks",
        description="Runs, in order of value and within --budget-s: the environment and its "
        "ceilings (copy GB/s, bf16 matmul TFLOP/s), correctness of the Triton backend against "
        "the torch backend on dummy Llama-2-7B (and CUDA graphs on vs off), batch-1 bandwidth, "
        "paged decode attention vs SDPA, the GPU tests, a decode curve at Llama-3-8B shape "
        "(full vs DynTS), and a reduced speedup grid vs HF transformers. Writes gpu_check.json, "
        "gpu_check.log and the PNGs into --out. --dry-run: tiny CPU shapes, same stages.",
    )
    gc.add_argument("--out", required=True, help="folder for the summary, log and PNGs")
    gc.add_argument("--budget-s", type=float, default=480.0, help="time budget (default 480)")
    gc.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU")
    gc.add_argument(
        "--only", nargs="+", default=None, choices=STAGE_NAMES, help="run only these stages"
    )
    gc.set_defaults(func=lambda a: 0 if run_gpu_check(a) is not None else 1)
