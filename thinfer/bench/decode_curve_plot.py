"""The decode-curve figure (throughput, KV memory, GFLOPs per decoding step) and summary."""

from __future__ import annotations

from typing import Any

from matplotlib.axes import Axes
from matplotlib.figure import Figure

COLORS = {"full": "#7f7f7f", "method": "#d62728"}


def smooth_throughput(tokens_per_s: list[float], span: int) -> list[float]:
    """Tokens/s over the trailing `span` steps (fewer at the start) of equal-token steps.

    Every recorded step samples the same number of tokens, so the window's tokens / seconds
    is the harmonic mean of the per-step rates.
    """
    out = []
    inverse_sum = 0.0
    inverses = [1.0 / rate for rate in tokens_per_s]
    for i, inverse in enumerate(inverses):
        inverse_sum += inverse
        if i >= span:
            inverse_sum -= inverses[i - span]
        out.append(min(i + 1, span) / inverse_sum)
    return out


def _annotate(ax: Axes, points: list[tuple[int, float, float, float]]) -> None:
    """Marker on the method's curve at each (step, method value, full value, ratio)."""
    for step, ours, full, ratio in points:
        ax.plot([step], [ours], "o", color=COLORS["method"], markersize=5, zorder=5)
        ax.plot([step], [full], "o", color=COLORS["full"], markersize=4, zorder=5)
        above = ours >= full
        ax.annotate(
            f"{ratio:.2f}x",
            (step, ours),
            xytext=(0, 7 if above else -7),
            textcoords="offset points",
            ha="center",
            va="bottom" if above else "top",
            fontsize=9,
            fontweight="bold",
            color=COLORS["method"],
        )


def plot_decode_curve(data: dict[str, Any]) -> Figure:
    """Three panels over the decoding step: smoothed tokens/s, KV GB, GFLOPs per step."""
    runs = data["runs"]
    span = data["smoothing_steps"]
    steps = list(range(1, data["steps"] + 1))
    checkpoints = data["summary"]["checkpoints"]
    fig = Figure(figsize=(8.5, 9.0))
    axes = fig.subplots(3, 1, sharex=True)
    panels = (
        ("tokens_per_s", "tokens_per_s_smoothed", f"tokens / s\n(over the last {span} steps)"),
        ("kv_gb", "kv_gb", "KV cache in use (GB)"),
        ("gflops", "gflops", "GFLOPs / step\n(linear + attention)"),
    )
    for ax, (series, summary_key, ylabel) in zip(axes, panels):
        for key in ("full", "method"):
            values = runs[key]["per_step"][series]
            if series == "tokens_per_s":
                values = smooth_throughput(values, span)
            ax.plot(steps, values, color=COLORS[key], linewidth=1.2, label=runs[key]["label"])
        _annotate(
            ax,
            [
                (
                    point["step"],
                    point["method"][summary_key],
                    point["full"][summary_key],
                    point["ratio"][summary_key],
                )
                for point in checkpoints
            ],
        )
        ax.set_ylabel(ylabel)
        ax.set_ylim(bottom=0, top=ax.get_ylim()[1] * 1.12)
        ax.grid(alpha=0.3)
    budget = data["kv_compression"].get("budget")
    if budget:
        level = budget * data["batch_size"] * data["kv_bytes_per_token"] / 1e9
        axes[1].axhline(level, color=COLORS["method"], linestyle=":", linewidth=1, label="budget")
    axes[0].legend(loc="lower left", fontsize=9)
    axes[1].legend(loc="upper left", fontsize=9)
    axes[2].set_xlabel("decoding step (labels: method / full cache)")
    axes[2].set_xlim(0, data["steps"] * 1.06 + 1)  # room for the last step's label
    model = data["model"].rstrip("/").split("/")[-1]
    cfg = data["kv_compression"]
    fig.suptitle(
        f"{model} on {data['device']} ({data['dtype']}), batch {data['batch_size']}, "
        f"{data['steps']} steps\nfull cache vs {cfg['method']} (budget {cfg['budget']}, "
        f"window {cfg['window']}, ratio {cfg['ratio']}, trigger {cfg['trigger']})",
        fontsize=10,
    )
    fig.tight_layout()
    return fig


def print_summary(data: dict[str, Any]) -> None:
    """Print the checkpoints' smoothed tokens/s, KV GB and GFLOPs of both runs."""
    method = data["method"]
    for point in data["summary"]["checkpoints"]:
        full, ours, ratio = point["full"], point["method"], point["ratio"]
        print(
            f"step {point['step']:>6}  tok/s full {full['tokens_per_s_smoothed']:9.1f} "
            f"{method} {ours['tokens_per_s_smoothed']:9.1f} ({ratio['tokens_per_s_smoothed']:.2f}x)"
            f"  KV GB {full['kv_gb']:.4g} / {ours['kv_gb']:.4g} ({ratio['kv_gb']:.2f}x)"
            f"  GFLOPs {full['gflops']:.4g} / {ours['gflops']:.4g} ({ratio['gflops']:.2f}x)",
            flush=True,
        )
    peak = data["summary"]["peak_kv_gb"]
    print(f"peak KV GB: full {peak['full']:.4g}, {method} {peak['method']:.4g}")
