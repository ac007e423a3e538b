"""The evaluation chart, in the form of the DynTS paper's accuracy figure: Pass@1 per method
as bars, mean peak KV length per method as a line on a second y-axis."""

from __future__ import annotations

from typing import Any

from matplotlib.figure import Figure

BAR_COLOR = "#4c72b0"
FULL_COLOR = "#7f7f7f"
LINE_COLOR = "#d62728"


def plot_eval(data: dict[str, Any]) -> Figure:
    """Bars: Pass@1 (%) per method; line (right axis): mean peak KV length per method."""
    summary = data["summary"]
    protocol = data["protocol"]
    names = [row["method"] for row in summary]
    pass1 = [100.0 * row["pass_at_1"] for row in summary]
    peaks = [row["mean_peak_kv"] for row in summary]
    xs = list(range(len(names)))
    fig = Figure(figsize=(max(5.0, 1.1 * len(names) + 2.5), 4.5))
    ax = fig.subplots()
    colors = [FULL_COLOR if name == "full" else BAR_COLOR for name in names]
    bars = ax.bar(xs, pass1, color=colors, width=0.6, label="Pass@1")
    for bar, value in zip(bars, pass1, strict=True):
        ax.annotate(
            f"{value:.1f}",
            (bar.get_x() + bar.get_width() / 2, value),
            xytext=(0, 3),
            textcoords="offset points",
            ha="center",
            va="bottom",
            fontsize=9,
        )
    ax.set_xticks(xs, names)
    ax.set_ylabel(f"Pass@1 (%), mean over {protocol['samples']} samples")
    ax.set_ylim(0, max(100.0, max(pass1, default=0.0) * 1.15))
    right = ax.twinx()
    right.plot(xs, peaks, "o-", color=LINE_COLOR, label="mean peak KV length")
    right.set_ylabel("mean peak KV length (tokens)", color=LINE_COLOR)
    right.tick_params(axis="y", colors=LINE_COLOR)
    budget = protocol["budget"]
    right.axhline(budget, color=LINE_COLOR, linestyle=":", linewidth=1, label=f"budget {budget}")
    right.set_ylim(0, max([*peaks, budget]) * 1.2)
    budget_note = f"budget {protocol['budget']}"
    if protocol.get("window") is not None:
        budget_note += f", window {protocol['window']}"
    budget_note += f", {protocol['trigger']} trigger"
    ax.set_title(
        f"{data['dataset']['name']} ({data['dataset']['num_problems']} problems), "
        f"{data['model_name']}\n{budget_note}, up to {protocol['max_tokens']} new tokens",
        fontsize=10,
    )
    handles = [bars, *right.get_lines()]
    ax.legend(handles, [h.get_label() for h in handles], loc="upper right", fontsize=8)
    fig.tight_layout()
    return fig
