"""`thinfer bench decode-curve`'s record: the per-step series of a run, the checkpoints of
the summary, and the smoothing and significant-digit rules they use."""

from __future__ import annotations

from typing import Any

from thinfer.bench.model_cost import linear_flops
from thinfer.config import ModelConfig
from thinfer.engine.telemetry import StepStats

SMOOTH_STEPS = 64
CHECKPOINT_FRACTIONS = (0.25, 0.5, 0.75, 1.0)
SERIES = (
    "tokens_per_s",
    "kv_gb",
    "mean_kv_len",
    "max_kv_len",
    "attention_gflops",
    "gflops",
    "compression_ms",
)


def checkpoint_steps(steps: int) -> list[int]:
    """Decoding steps at 25/50/75/100% of `steps` (the last step included), ascending."""
    return sorted({max(1, round(steps * f)) for f in CHECKPOINT_FRACTIONS} | {steps})


def smoothed_throughput(stats: list[StepStats], step: int, span: int = SMOOTH_STEPS) -> float:
    """Tokens/s over the `span` decoding steps ending at `step` (1-based; fewer at the start)."""
    window = stats[max(0, step - span) : step]
    return sum(s.num_sampled for s in window) / sum(s.seconds for s in window)


def sig(value: float, digits: int = 5) -> float:
    return float(f"{value:.{digits}g}")


def run_record(
    label: str,
    cfg: ModelConfig,
    stats: list[StepStats],
    other: float,
    config: dict | None,
    peak_kv_len: int,
) -> dict[str, Any]:
    """One run's record: totals, peaks and the per-step `SERIES` (5 significant digits)."""
    series: dict[str, list[float]] = {name: [] for name in SERIES}
    for s in stats:
        lens = list(s.kv_lens.values())
        attention = s.attention_flops / 1e9
        series["tokens_per_s"].append(sig(s.tokens_per_second))
        series["kv_gb"].append(sig(s.kv_bytes_in_use / 1e9))
        series["mean_kv_len"].append(sig(sum(lens) / len(lens)))
        series["max_kv_len"].append(max(lens))
        series["attention_gflops"].append(sig(attention))
        series["gflops"].append(
            sig(attention + linear_flops(cfg, s.num_tokens, s.num_sampled) / 1e9)
        )
        series["compression_ms"].append(sig(1e3 * s.compression_seconds))
    seconds = sum(s.seconds for s in stats)
    return {
        "label": label,
        "kv_compression": config,
        "decode_seconds": round(seconds, 4),
        "other_seconds": round(other, 4),
        "tokens_per_s": sig(sum(s.num_sampled for s in stats) / seconds),
        "peak_kv_gb": max(series["kv_gb"]),
        "peak_max_kv_len": peak_kv_len,
        "compression_ms_mean": sig(1e3 * sum(s.compression_seconds for s in stats) / len(stats)),
        "per_step": series,
    }


def summarize_runs(
    runs: dict[str, dict[str, Any]], raw: dict[str, list[StepStats]]
) -> dict[str, Any]:
    steps = len(raw["full"])
    points = []
    for step in checkpoint_steps(steps):
        point: dict[str, Any] = {"step": step}
        for key in ("full", "method"):
            series = runs[key]["per_step"]
            point[key] = {
                "tokens_per_s_smoothed": sig(smoothed_throughput(raw[key], step)),
                "kv_gb": series["kv_gb"][step - 1],
                "gflops": series["gflops"][step - 1],
            }
        point["ratio"] = {
            name: sig(point["method"][name] / point["full"][name], 4) for name in point["full"]
        }
        points.append(point)
    return {
        "checkpoints": points,
        "peak_kv_gb": {key: runs[key]["peak_kv_gb"] for key in runs},
        "tokens_per_s": {key: runs[key]["tokens_per_s"] for key in runs},
        "tokens_per_s_ratio": sig(runs["method"]["tokens_per_s"] / runs["full"]["tokens_per_s"], 4),
    }
