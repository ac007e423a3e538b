"""`thinfer dynts generalization --heads-only`: the cheap half of leave-one-family-out, for
comparing training recipes.

Each head is trained without one family, exactly as the full run does, and judged by its
top-20% overlap with the labels on the family it never saw (and on its own validation
split); nothing is replayed, so one recipe costs minutes, not hours. The record is named
after the recipe (`dynts_head_overlap_<model>_<recipe>`), so runs with different
`--label-transform`, `--batch-unit`, `--epochs`, `--lr` or `--seed` sit side by side.
Overlap is the paper's own measure of a head; whether a better overlap keeps more of what
the answer needs is what the full run (with replays) then checks for the chosen recipe.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from thinfer.dynts.train import TrainConfig  # noqa: E402


def recipe_name(config: TrainConfig, transform: str) -> str:
    """A file-name-safe name of the training options that differ between recipes
    (`transform`: the label transform "auto" resolved to)."""
    batch = "" if config.batch_size is None else str(config.batch_size)  # "": the default
    unit = f"{config.batch_unit}{batch}"
    return f"{transform}_{unit}_e{config.epochs}_lr{config.lr:g}_seed{config.seed}"


def head_summary(head: dict[str, Any]) -> dict[str, Any]:
    """What the record keeps of a head made by `make_head`: its path, overlaps and the size
    of its training."""
    report = head["train_report"]
    return {
        "path": head["path"],
        "overlap_held_out": head["overlap_held_out"],
        "overlap_validation": head["overlap_validation"],
        "held_out_traces": head["held_out_traces"],
        "train_traces": report["num_train_traces"],
        "val_traces": report["num_val_traces"],
        "train_tokens": report["num_train_tokens"],
        "optimizer_steps": report["optimizer_steps"],
        "label_transform": report["label_transform"],
        "val_trace_ids": report["val_trace_ids"],
    }


def head_overlaps(
    features: dict[str, Any], families: Sequence[str], config: TrainConfig, work_dir: str
) -> dict[str, Any]:
    """Per held-out family: the head trained without it and its overlaps (`make_head`)."""
    from thinfer.dynts import generalization as g

    out = {}
    for family in families:
        head = g.make_head(features, family, config, work_dir)
        out[family] = head_summary(head)
        print(
            f"{family}: overlap on it {head['overlap_held_out']:.3f}, "
            f"on the validation split {head['overlap_validation']:.3f}",
            flush=True,
        )
    return out


def overlap_table(record: dict[str, Any]) -> str:
    """Markdown: one row per held-out family, and the mean."""
    rows = record["families"]
    lines = [
        f"recipe {record['recipe']}:",
        "",
        "| held-out family | top-20% overlap on it | on the validation split | train traces |",
        "|---|---|---|---|",
    ]
    for family, r in rows.items():
        lines.append(
            f"| {family} | {r['overlap_held_out']:.3f} | {r['overlap_validation']:.3f} | "
            f"{r['train_traces']} |"
        )
    mean = sum(r["overlap_held_out"] for r in rows.values()) / len(rows)
    lines.append(f"| mean | {mean:.3f} | | |")
    return "\n".join(lines)


def plot_overlaps(record: dict[str, Any]) -> plt.Figure:
    """Bars per held-out family: overlap on the unseen family and on the validation split."""
    families = list(record["families"])
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(families) + 2), 3.6))
    xs = range(len(families))
    for shift, key, label in (
        (-0.2, "overlap_held_out", "held-out family"),
        (0.2, "overlap_validation", "validation split (seen families)"),
    ):
        values = [record["families"][f][key] for f in families]
        bars = ax.bar([x + shift for x in xs], values, 0.4, label=label)
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
    ax.set_xticks(list(xs), families)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("top-20% overlap with the labels")
    ax.set_title(f"DynTS heads trained without each family: {record['recipe']}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def run_heads_only(
    args: argparse.Namespace,
    llm: Any,
    features: dict[str, Any],
    families: Sequence[str],
    config: TrainConfig,
) -> dict[str, Any]:
    """Train and judge every held-out family's head; write JSON + PNG, print the table."""
    from dataclasses import asdict

    from thinfer.bench.report import model_short_name, write_result
    from thinfer.dynts.generalization_options import file_sha256
    from thinfer.dynts.train_data import resolve_transform

    recipe = recipe_name(config, resolve_transform(config.label_transform, features))
    record = {
        "benchmark": "dynts_head_overlap",
        "model": llm.source,
        "corpus": {"path": args.corpus, "sha256": file_sha256(args.corpus)},
        "recipe": recipe,
        "training": asdict(config),
        "families": head_overlaps(features, families, config, args.work_dir),
    }
    name = f"dynts_head_overlap_{model_short_name(llm)}_{recipe}"
    json_path, png_path = write_result(name, record, plot_overlaps(record), args.output_dir)
    print(overlap_table(record))
    print(f"wrote {json_path} and {png_path}")
    return record
