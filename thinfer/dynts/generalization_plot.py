"""The chart and table of `thinfer dynts generalization`: accuracy (and NLL after the budget)
per held-out family and method, one row per budget fraction."""

from __future__ import annotations

from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def fmt_optional(value: float | None, digits: int) -> str:
    """`value` with `digits` decimals, or "-" for a cell with no value."""
    return "-" if value is None else f"{value:.{digits}f}"


def markdown_table(record: dict[str, Any]) -> str:
    """Per budget fraction, a family x method table of "accuracy / NLL after the budget"."""
    methods = record["methods"]
    families = record["families"]
    lines = []
    for fraction in record["budget_fractions"]:
        lines += [
            "",
            f"budget {fraction} x the family's mean trace length "
            "(accuracy / NLL after the budget, nats/token):",
            "",
            "| held-out family (budget) | head overlap | " + " | ".join(methods) + " |",
            "|---" * (len(methods) + 2) + "|",
        ]
        for family, entry in families.items():
            cell = entry["budgets"][str(fraction)]
            head = entry["head"]
            overlap = fmt_optional(head and head["overlap_held_out"], 3)
            values = [
                f"{c['accuracy']:.3f} / {fmt_optional(c['nll_after_budget'], 3)}"
                for c in (cell["methods"][m] for m in methods)
            ]
            lines.append(
                f"| {family} ({cell['budget']}) | {overlap} | " + " | ".join(values) + " |"
            )
    return "\n".join(lines)


def plot_generalization(record: dict[str, Any]) -> plt.Figure:
    """One row per budget fraction: grouped bars of accuracy per held-out family, one bar per
    compressed method; the full cache's accuracy is a black line over each group."""
    fractions = record["budget_fractions"]
    families = list(record["families"])
    methods = [m for m in record["methods"] if m != "full"]
    width = 0.8 / max(1, len(methods))
    size = (max(8.0, 0.35 * len(families) * (len(methods) + 1) + 2), 3.4 * len(fractions))
    fig, axes = plt.subplots(len(fractions), 1, figsize=size, squeeze=False)
    colours = plt.get_cmap("tab10")
    for row, fraction in enumerate(fractions):
        ax = axes[row][0]
        cells = [record["families"][f]["budgets"][str(fraction)] for f in families]
        for j, method in enumerate(methods):
            xs = [i - 0.4 + width * (j + 0.5) for i in range(len(families))]
            ys = [c["methods"][method]["accuracy"] for c in cells]
            ax.bar(xs, ys, width, label=method, color=colours(j % 10))
        for i, cell in enumerate(cells):
            full = cell["methods"]["full"]["accuracy"]
            label = "full cache" if i == 0 else None
            ax.hlines(full, i - 0.45, i + 0.45, colors="black", linewidth=2, label=label)
        ax.set_xticks(range(len(families)))
        ax.set_xticklabels([f"{f}\nB={c['budget']}" for f, c in zip(families, cells)])
        ax.set_ylim(0, 1.05)
        ax.set_ylabel("accuracy")
        ax.set_title(f"budget {fraction} x the held-out family's mean trace length")
        if row == 0:
            ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.suptitle(
        f"leave-one-family-out, {record['trigger']} trigger, W={record['window']}, "
        f"r={record['ratio']}, {record['scoring']} scoring"
    )
    fig.tight_layout()
    return fig
