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

from thinfer.dynts.corpus.problem import CorpusProblem  # noqa: E402
from thinfer.dynts.generalization_plot import fmt_optional  # noqa: E402
from thinfer.dynts.survival import RANKINGS  # noqa: E402
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
    features: dict[str, Any],
    held_out: dict[str, Sequence[CorpusProblem]],
    budgets: dict[str, dict[str, int]],
    config: TrainConfig,
    args: argparse.Namespace,
) -> dict[str, Any]:
    """Per held-out family: the head trained without it (`make_head`), its overlaps, and the
    share of critical tokens each ranking keeps to the answer at each budget (`survival`)."""
    from thinfer.dynts import generalization as g
    from thinfer.dynts.survival import family_critical_kept

    out = {}
    for family, problems in held_out.items():
        head = g.make_head(features, family, config, args.work_dir)
        out[family] = head_summary(head)
        unseen = g.features_of(features, lambda f, family=family: f == family)
        kept = family_critical_kept(
            head["module"], unseen, problems, budgets[family], args.window, args.ratio
        )
        out[family]["critical_kept"] = kept
        shares = ", ".join(
            f"{key}: {fmt_optional(c['head'], 2)} (labels {fmt_optional(c['labels'], 2)})"
            for key, c in kept.items()
        )
        print(
            f"{family}: overlap on it {head['overlap_held_out']:.3f}, "
            f"on the validation split {head['overlap_validation']:.3f}; "
            f"critical tokens kept {shares}",
            flush=True,
        )
    return out


def overlap_table(record: dict[str, Any]) -> str:
    """Markdown: one row per held-out family, and the mean; then per budget fraction the
    share of critical tokens kept to the answer by the head, the labels and recency."""
    rows = record["families"]
    fractions = list(next(iter(rows.values()))["critical_kept"])
    kept_heads = "".join(f" critical kept at {x}: head / labels / recent |" for x in fractions)
    lines = [
        f"recipe {record['recipe']}:",
        "",
        "| held-out family | top-20% overlap on it | on the validation split | train traces |"
        + kept_heads,
        "|---|---|---|---|" + "---|" * len(fractions),
    ]
    for family, r in rows.items():
        kept = "".join(
            " " + " / ".join(fmt_optional(c[ranking], 2) for ranking in RANKINGS) + " |"
            for c in r["critical_kept"].values()
        )
        lines.append(
            f"| {family} | {r['overlap_held_out']:.3f} | {r['overlap_validation']:.3f} | "
            f"{r['train_traces']} |{kept}"
        )
    mean = sum(r["overlap_held_out"] for r in rows.values()) / len(rows)
    lines.append(f"| mean | {mean:.3f} | | |" + " |" * len(fractions))
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
    config: TrainConfig,
    recipe: str,
    held_out: dict[str, Sequence[CorpusProblem]],
    budgets: dict[str, dict[str, int]],
) -> dict[str, Any]:
    """Train and judge every held-out family's head (`recipe`: `recipe_name` of `config`;
    `held_out`: the family's first `--count` problems; `budgets`: its slots per budget
    fraction); write JSON + PNG, print the table."""
    from dataclasses import asdict

    from thinfer.bench.report import model_short_name, write_result
    from thinfer.dynts.generalization_options import file_sha256

    record = {
        "benchmark": "dynts_head_overlap",
        "model": llm.source,
        "corpus": {"path": args.corpus, "sha256": file_sha256(args.corpus)},
        "recipe": recipe,
        "training": asdict(config),
        "critical_kept": {
            "what": "mean share of critical-span tokens cached when the graded answer starts, "
            "the uniform rule played offline (thinfer.dynts.survival)",
            "window": args.window,
            "ratio": args.ratio,
            "count": args.count,
            "rankings": {
                "head": "the head trained without the family",
                "labels": "the true labels (the answer's attention): what a perfect head keeps",
                "recent": "position (a recent window with the prompt kept)",
            },
        },
        "families": head_overlaps(features, held_out, budgets, config, args),
    }
    name = f"dynts_head_overlap_{model_short_name(llm)}_{recipe}"
    json_path, png_path = write_result(name, record, plot_overlaps(record), args.output_dir)
    print(overlap_table(record))
    print(f"wrote {json_path} and {png_path}")
    return record
