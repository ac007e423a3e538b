"""`thinfer dynts generalization`: leave-one-family-out evaluation of DynTS on a corpus.

The steps are in `thinfer.dynts.generalization`; this module checks the options, runs them
family by family and writes the record (JSON + PNG under --output-dir, a markdown table on
stdout). See docs/dynts.md.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from collections.abc import Sequence
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from thinfer.dynts.corpus.problem import CorpusProblem

from thinfer.dynts.generalization_options import (
    by_family,
    check_methods,
    file_sha256,
    parse_fractions,
    parse_names,
    previous_families,
    select_families,
)

DEFAULT_METHODS = "full,window,streamingllm,sepllm,h2o,snapkv,rkv,dynts"
DEFAULT_WORK_DIR = "tmp/dynts_generalization"


def run_generalization(args: argparse.Namespace, llm: Any = None) -> dict[str, Any]:
    """Run `thinfer dynts generalization`; returns the record (also written with its PNG).
    Every option is checked before the model is loaded or a trace labelled."""
    from thinfer.bench.report import model_short_name, write_result
    from thinfer.compression.config import needs_predictor
    from thinfer.dynts import generalization as g
    from thinfer.dynts.corpus.problem import read_problems
    from thinfer.dynts.generalization_plot import markdown_table, plot_generalization
    from thinfer.dynts.traces import think_end_ids
    from thinfer.dynts.train_options import training_config
    from thinfer.llm import LLM

    problems = read_problems(args.corpus)
    families = select_families(problems, parse_names(args.families) if args.families else None)
    methods = check_methods(parse_names(args.methods))
    fractions = parse_fractions(args.budgets)
    if args.count is not None and args.count < 1:
        raise ValueError(f"--count must be >= 1, got {args.count}")
    groups = by_family(problems)
    held_out = {f: groups[f][: args.count] for f in families}
    plan = g.plan_budgets(held_out, fractions, args.window)
    g.check_cells(methods, plan, args)
    config = training_config(args)
    dynts = args.heads_only or any(needs_predictor(m) for m in methods)

    if llm is None:
        llm = LLM(
            model=args.model, max_num_seqs=args.max_num_seqs, num_kv_blocks=args.num_kv_blocks
        )
    if llm.tokenizer is None:
        raise ValueError("this model has no tokenizer, so the think-end marker has no ids")
    marker = think_end_ids(llm.tokenizer, args.think_end)
    features = g.label_corpus(llm, problems, marker, args.features) if dynts else None
    if features is not None:
        for reason, count in sorted(features["skipped"].items()):
            print(f"thinfer: warning: skipped {count} trace(s): {reason}", file=sys.stderr)
        for family in families:  # every head has data, before the first one is trained
            if not g.features_of(features, lambda f, family=family: f != family)["traces"]:
                raise ValueError(f"no labelled trace outside family {family!r} to train DynTS on")
    recipe = None
    if features is not None:  # heads of another recipe are another record, side by side
        from thinfer.dynts.generalization_heads import recipe_name
        from thinfer.dynts.train_data import resolve_transform

        recipe = recipe_name(config, resolve_transform(config.label_transform, features))
    if args.heads_only:
        from thinfer.dynts.generalization_heads import run_heads_only

        budgets = {f: {str(x): b for x, b in zip(fractions, plan[f])} for f in families}
        return run_heads_only(args, llm, features, config, recipe, held_out, budgets)

    run = {"config": config, "methods": methods, "fractions": fractions, "marker": marker}
    record: dict[str, Any] = {
        "benchmark": "dynts_generalization",
        "model": llm.source,
        "corpus": {"path": args.corpus, "traces": len(problems), "families": list(groups)},
        "corpus_sha256": file_sha256(args.corpus),
        "count": args.count,
        "budget_fractions": fractions,
        "window": args.window,
        "ratio": args.ratio,
        "trigger": "uniform",
        "scoring": args.scoring,
        "methods": methods,
        "nll_tokens": "completion tokens up to the answer prefix, at positions past the budget",
        "think_end": args.think_end,
        "features": args.features,
        "label_skipped": None if features is None else features["skipped"],
        "training": asdict(config),
        "work_dir": args.work_dir,
        "held_out_families": families,
        "families": {},
        "complete": False,
    }
    name = f"dynts_generalization_{model_short_name(llm)}_{args.scoring}"
    if recipe is not None:
        record["recipe"] = recipe
        name += f"_{recipe}"
    if args.resume:
        done, held_before = previous_families(str(Path(args.output_dir) / f"{name}.json"), record)
        record["families"].update(done)
        record["held_out_families"] = held_before + [f for f in families if f not in held_before]
        print(f"resumed: {', '.join(done) or 'no family'} already measured")
    pending = [f for f in families if f not in record["families"]]
    every = record["held_out_families"]  # this run's families and those an earlier one held out
    for family in pending or [None]:  # with nothing pending, the record is rewritten once
        if family is not None:
            entry = hold_out_family(
                llm, family, held_out[family], plan[family], features, args, run
            )
            entry.update(
                measured_utc=datetime.now(UTC).isoformat(timespec="seconds"),
                command_line=shlex.join(sys.argv),
            )
            record["families"][family] = entry
        measured = record["families"]
        record["families"] = {f: measured[f] for f in every if f in measured}
        record["complete"] = len(record["families"]) == len(every)
        json_path, png_path = write_result(  # after every family: a long run keeps its part
            name, record, plot_generalization(record), args.output_dir
        )
    print(markdown_table(record))
    print(f"wrote {json_path} and {png_path}")
    return record


def hold_out_family(
    llm: Any,
    family: str,
    problems: list[CorpusProblem],
    budgets: Sequence[int],
    features: dict[str, Any] | None,
    args: argparse.Namespace,
    run: dict[str, Any],
) -> dict[str, Any]:
    """One family held out: its head trained without it (when a method needs one; the report
    saved beside the head), its problems replayed under every method at every budget; the
    family's entry of the record. `run` holds config, methods, fractions and marker."""
    from thinfer.dynts import generalization as g
    from thinfer.dynts.generalization_heads import head_summary

    head = g.make_head(features, family, run["config"], args.work_dir) if features else None
    if head is not None:
        with open(head["path"] + ".json", "w", encoding="utf-8") as f:
            json.dump(head["train_report"], f, indent=2)
            f.write("\n")
        print(
            f"{family}: head without it trained on {head['train_report']['num_traces']} "
            f"traces; top-20% overlap on {family} {_fmt(head['overlap_held_out'])}, "
            f"on its validation split {_fmt(head['overlap_validation'])}"
        )
    path = head and head["path"]
    cells = g.evaluate_family(llm, problems, run["methods"], budgets, args, path, run["marker"])
    for fraction, row in zip(run["fractions"], cells):
        summary = ", ".join(f"{m} {c['accuracy']:.2f}" for m, c in row.items())
        print(f"{family} at {fraction}: accuracy {summary}", flush=True)
    lengths = [len(p.trace.token_ids) for p in problems]
    return {
        "traces": len(problems),
        "mean_length": sum(lengths) / len(lengths),
        "head": None if head is None else head_summary(head),
        "budgets": {
            str(fraction): {"fraction": fraction, "budget": budget, "methods": row}
            for fraction, budget, row in zip(run["fractions"], budgets, cells)
        },
    }


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _generalization(args: argparse.Namespace) -> int:
    run_generalization(args)
    return 0


def add_generalization_command(commands: Any) -> None:
    """`thinfer dynts generalization`: each family held out in turn, DynTS against baselines."""
    from thinfer.dynts.traces import DEFAULT_THINK_END
    from thinfer.dynts.train_options import add_training_options

    p = commands.add_parser(
        "generalization",
        help="leave-one-family-out: DynTS heads trained without a family, judged on it",
        description="Label every corpus trace once; for each held-out family train a DynTS "
        "head on the other families only, measure its top-20% overlap on the unseen family, "
        "then replay the family's problems at each budget (a fraction of its mean trace "
        "length) under every method with the uniform trigger: accuracy, NLL of the "
        "completion tokens (up to the answer prefix) past the budget, mean peak KV "
        "(JSON + PNG, markdown on stdout).",
    )
    p.add_argument("--corpus", required=True, help="JSONL written by `thinfer dynts corpus`")
    p.add_argument("--families", default=None, help="families to hold out (default: all)")
    p.add_argument(
        "--budgets",
        default="0.2,0.4",
        help="budget fractions in (0, 1] of the held-out family's mean trace length "
        "(default 0.2,0.4; the budget is rounded to slots)",
    )
    p.add_argument("--window", type=int, default=64, help="W: recent slots kept (default 64)")
    p.add_argument("--ratio", type=float, default=0.3, help="r: share of older slots kept")
    p.add_argument("--methods", default=DEFAULT_METHODS, help="comma-separated; full is added")
    p.add_argument(
        "--scoring",
        default="per_head",
        choices=["per_head", "shared"],
        help="H2O/SnapKV/R-KV: keep slots per head (default) or one shared score per token",
    )
    p.add_argument(
        "--features",
        default=None,
        help="label cache: written when missing, reused when made from the same corpus",
    )
    p.add_argument(
        "--work-dir",
        default=DEFAULT_WORK_DIR,
        help=f"where the heads head_without_<family>.safetensors go (default {DEFAULT_WORK_DIR})",
    )
    p.add_argument("--count", type=int, default=None, help="max held-out problems per family")
    p.add_argument(
        "--think-end",
        default=DEFAULT_THINK_END,
        help=f"text of the think-end marker (default {DEFAULT_THINK_END!r})",
    )
    p.add_argument("--model", default=None, help="HF dir, GGUF file (default: SmolLM2)")
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--num-kv-blocks", type=int, default=4096)
    p.add_argument("--output-dir", default="bench/results")
    p.add_argument(
        "--heads-only",
        action="store_true",
        help="train and judge the heads by top-20%% overlap only, no replays (minutes: to "
        "compare training recipes); writes dynts_head_overlap_<model>_<recipe>",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="keep the families already in this run's JSON under --output-dir (measured with "
        "the same settings, else an error) and measure only the others",
    )
    add_training_options(p.add_argument_group("training (as `thinfer dynts train`)"))
    p.set_defaults(func=_generalization)
