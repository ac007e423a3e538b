"""The figure and the markdown table of `thinfer bench prune-quality`: perplexity, proxy
accuracy and speed-up per (method, ratio), before and after healing, against the dense
model."""

from __future__ import annotations

from typing import Any

from matplotlib.figure import Figure

from thinfer.bench.machine import machine_info


def plot_prune_quality(data: dict[str, Any]) -> Figure:
    """Three panels over the rows (method x ratio): held-out perplexity (log) pruned and
    healed, proxy accuracy pruned and healed, decode speed-up of the healed model; the dense
    model is the dashed line in each."""
    rows, dense = data["rows"], data["dense"]
    labels = [f"{r['method']}\n{r['ratio']:g}" for r in rows]
    xs = list(range(len(rows)))
    width = 0.38
    timed = any("speedup_vs_dense" in r for r in rows)  # after the speed phase
    fig = Figure(figsize=(max(9.0, 1.1 * len(rows) + 6), 10 if timed else 7), layout="constrained")
    panels = fig.subplots(3 if timed else 2, 1, sharex=True)
    pairs = (
        (panels[0], "ppl", "held-out perplexity (log)", dense["ppl"]),
        (panels[1], "proxy_accuracy", "proxy-task accuracy", dense["proxy_accuracy"]),
    )
    for ax, key, ylabel, reference in pairs:
        for shift, stage, colour in ((-width / 2, "pruned", "C1"), (width / 2, "healed", "C2")):
            values = [r[f"{key}_{stage}"] for r in rows]
            bars = ax.bar([x + shift for x in xs], values, width, color=colour, label=stage)
            ax.bar_label(bars, fmt="%.3g", fontsize=7)
        ax.axhline(reference, color="k", linestyle="--", linewidth=1, label="dense")
        ax.set_ylabel(ylabel)
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    panels[0].set_yscale("log")
    lowest = min([dense["ppl"]] + [r[f"ppl_{s}"] for r in rows for s in ("pruned", "healed")])
    panels[0].set_ylim(bottom=lowest / 1.5)  # bars on a log axis start at the bottom
    panels[1].set_ylim(0, 1.05)
    if not timed:
        panels[1].set_xticks(xs, labels, fontsize=8)
        panels[1].set_xlim(-0.8, len(rows) - 0.2)
        _title(fig, data)
        return fig
    speed = panels[2]
    timed_xs = [x for x, r in zip(xs, rows) if "speedup_vs_dense" in r]
    speedups = [rows[x]["speedup_vs_dense"] for x in timed_xs]
    bars = speed.bar(timed_xs, speedups, 2 * width, color="C0")
    speed.bar_label(bars, fmt="%.2fx", fontsize=7)
    for x in sorted(set(xs) - set(timed_xs)):  # rows of a run whose speed was not kept
        speed.text(x, 0.05, "not\ntimed", ha="center", va="bottom", fontsize=7, color="grey")
    speed.axhline(1.0, color="k", linestyle="--", linewidth=1)
    dense_speed = dense["tokens_per_s"]
    speed.set_ylabel(
        "decode tokens/s vs dense\n"
        + (f"(dense: {dense_speed:.0f} tok/s)" if dense_speed else "(pending)")
    )
    speed.set_xticks(xs, labels, fontsize=8)
    speed.set_xlim(-0.8, len(rows) - 0.2)  # one row: bars of a normal width
    speed.grid(True, axis="y", alpha=0.3)
    _title(fig, data)
    return fig


def _title(fig: Figure, data: dict[str, Any]) -> None:
    cpu = machine_info()["cpu_model"]
    decode = data["decode"]
    fig.suptitle(
        f"Structured pruning of {data['model'].rstrip('/').split('/')[-1]}: before and after "
        f"{data['heal_steps']} LoRA healing steps\n{data['device']} ({cpu}); decode: batch "
        f"{decode['batch_size']} x {decode['max_tokens']} greedy tokens; proxy: "
        f"{data['proxy']['count']} held-out traces, full KV cache",
        fontsize=10,
    )


def _number(value: float | None, spec: str) -> str:
    """`value` formatted, or "-" for a row that was not timed."""
    return "-" if value is None else format(value, spec)


def markdown_table(data: dict[str, Any]) -> str:
    """The rows as a markdown table, the dense model first."""
    d = data["dense"]
    head = "| method | ratio | removed | parameters | held-out PPL pruned -> healed | "
    head += "proxy acc. pruned -> healed | decode tok/s | vs dense | prune+heal s |"
    lines = [head, "|" + "---|" * 9]
    lines.append(
        f"| dense | 0 | - | {d['parameters'] / 1e6:.1f}M (1.00) | {d['ppl']:.2f} | "
        f"{d['proxy_accuracy']:.2f} | {_number(d['tokens_per_s'], '.1f')} | 1.00 | - |"
    )
    for r in data["rows"]:
        lines.append(
            f"| {r['method']} | {r['ratio']:g} | {r['removed']} | {r['parameters'] / 1e6:.1f}M "
            f"({r['parameters_fraction']:.2f}) | {r['ppl_pruned']:.2f} -> {r['ppl_healed']:.2f} | "
            f"{r['proxy_accuracy_pruned']:.2f} -> {r['proxy_accuracy_healed']:.2f} | "
            f"{_number(r.get('tokens_per_s'), '.1f')} | "
            f"{_number(r.get('speedup_vs_dense'), '.2f')} | "
            f"{r['prune_and_heal_seconds']:.0f} |"
        )
    return "\n".join(lines)
