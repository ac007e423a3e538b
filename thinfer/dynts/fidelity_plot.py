"""The chart of `thinfer dynts fidelity`: NLL increase per method, and by position."""

from __future__ import annotations

from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_fidelity(record: dict[str, Any]) -> plt.Figure:
    """Left: NLL increase after the budget per method (bars) and mean peak KV (line).
    Right: NLL increase per position bucket, one line per method."""
    methods = {m: s for m, s in record["methods"].items() if m != "full"}
    names = list(methods)
    fig, (bars, curves) = plt.subplots(1, 2, figsize=(13, 4.8))
    drawn = bars.bar(
        names, [methods[m]["nll_increase_after_budget"] for m in names], color="tab:blue"
    )
    bars.bar_label(drawn, fmt="%.3f", fontsize=8)
    bars.set_ylabel("NLL increase vs full cache (nats/token, after the budget)")
    bars.tick_params(axis="x", rotation=30)
    bars.axhline(0, color="black", linewidth=0.8)
    twin = bars.twinx()
    twin.plot(names, [methods[m]["mean_peak_kv"] for m in names], color="tab:red", marker="o")
    twin.set_ylabel("mean peak KV length (slots)", color="tab:red")
    twin.set_ylim(0, max([methods[m]["mean_peak_kv"] for m in names] + [1]) * 1.15)
    for name in names:
        by_position = methods[name]["nll_increase_by_position"]
        curves.plot([int(p) for p in by_position], list(by_position.values()), label=name)
    curves.axvline(record["budget"], color="gray", linestyle="--", linewidth=0.8)
    curves.axhline(0, color="black", linewidth=0.8)
    curves.set_xlabel("token position (bucket start)")
    curves.set_ylabel("NLL increase vs full cache (nats/token)")
    curves.legend(fontsize=8)
    fig.suptitle(
        f"{len(record['texts']['windows'])} windows of {record['length']} tokens, budget "
        f"{record['budget']}, {record['trigger']} trigger; full-cache NLL "
        f"{record['methods']['full']['mean_nll']:.3f}"
    )
    fig.tight_layout()
    return fig
