"""Leave-one-family-out evaluation of DynTS on a multi-family corpus (`thinfer dynts corpus`).

Every corpus trace is labelled once (one features file; entries keep the trace id, and the
file maps ids to families). For each held-out family F a head is trained on the features of
every other family only (`train_without` checks that no entry of F reaches training and
raises `FamilyLeakError` otherwise), and its top-20% overlap is measured on F's traces,
which it never saw, and on its own validation split. Then F's problems are replayed at each
budget (a fraction of F's mean trace length, rounded) under every method with the uniform
trigger: accuracy and peak KV graded as `proxy_eval.run_method` does, and the NLL of the
completion tokens (up to the answer prefix) whose position is past the budget, forced through
the decode path with the method's compression active (as `fidelity.replay_all`); all of a
family's requests run in one engine loop. The full cache is the reference in every cell.
The command itself (`run_generalization`) is in `generalization_cli.py`.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Sequence
from typing import Any

import torch

from thinfer.compression.config import CompressionConfig, scoring_field
from thinfer.compression.predictor import load_predictor, save_predictor
from thinfer.dynts.corpus.problem import CorpusProblem
from thinfer.dynts.feature_file import load_features, save_features
from thinfer.dynts.label import label_traces
from thinfer.dynts.proxy import is_correct
from thinfer.dynts.proxy_eval import method_config, replay_params
from thinfer.dynts.train import TrainConfig, predict, top_overlap, train_predictor
from thinfer.dynts.train_data import resolve_transform, transform_labels
from thinfer.llm import LLM

HEAD_NAME = "head_without_{}.safetensors"


class FamilyLeakError(RuntimeError):
    """A trace of the held-out family reached the training set of its head."""


def absolute_budget(fraction: float, lengths: Sequence[int]) -> int:
    """round(fraction x mean length): the budget in slots of one family at one fraction."""
    return round(fraction * sum(lengths) / len(lengths))


def plan_budgets(
    held_out: dict[str, list[CorpusProblem]], fractions: Sequence[float], window: int
) -> dict[str, list[int]]:
    """Per family, the absolute budget of each fraction; ValueError when one leaves no room
    beyond the recent window (the uniform trigger needs window < budget)."""
    plan = {}
    for family, problems in held_out.items():
        lengths = [len(p.trace.token_ids) for p in problems]
        plan[family] = [absolute_budget(f, lengths) for f in fractions]
        for fraction, budget in zip(fractions, plan[family]):
            if budget < 2 or not 0 <= window < budget:
                raise ValueError(
                    f"budget {fraction} x {family}'s mean length = {budget} slots leaves no "
                    f"room beyond --window {window}; raise the fraction or lower --window"
                )
    return plan


def cell_configs(
    methods: Sequence[str],
    budget: int,
    settings: argparse.Namespace,
    head: str | None,
    marker: Sequence[int],
) -> dict[str, dict | None]:
    """The kv_compression of each method at `budget` under the uniform trigger, validated."""
    ns = argparse.Namespace(
        budget=budget,
        trigger="uniform",
        window=settings.window,
        ratio=settings.ratio,
        predictor=head,
        scoring=settings.scoring,
    )
    configs = {m: method_config(ns, m, list(marker)) for m in methods}
    for config in configs.values():
        CompressionConfig.coerce(config)  # ValueError now, not mid-replay
    return configs


def check_cells(
    methods: Sequence[str], plan: dict[str, list[int]], settings: argparse.Namespace
) -> None:
    """Build every cell's kv_compression once (ValueError for a bad window, ratio, scoring)
    before any heavy work; the head path is a placeholder here."""
    for method in methods:
        scoring_field(method, settings.scoring)
    for budgets in plan.values():
        for budget in budgets:
            cell_configs(methods, budget, settings, "head.safetensors", [0])


def entry_family(entry: dict[str, Any], features: dict[str, Any]) -> str:
    """The family of a features entry: the file's id -> family map, else the id prefix."""
    mapping = features.get("trace_families") or {}
    trace_id = str(entry["id"])
    return mapping.get(trace_id) or trace_id.rsplit("-", 1)[0]


def label_corpus(
    llm: LLM, problems: Sequence[CorpusProblem], marker: Sequence[int], path: str | None
) -> dict[str, Any]:
    """The features of every corpus trace: read from `path` when it exists and was made from
    the same corpus ids, model and marker (ValueError when not); else labelled now (and
    written to `path` when given)."""
    ids = [p.trace.id for p in problems]
    if path and os.path.exists(path):
        features = load_features(path)
        if features.get("corpus_ids") != ids:
            raise ValueError(
                f"{path}: the label cache was made from another corpus (its trace ids differ); "
                "remove it or give another --features path"
            )
        if features.get("model") != llm.source or features["think_end_token_ids"] != list(marker):
            raise ValueError(f"{path}: the label cache was made with another model or marker")
        return features
    with torch.no_grad():
        features = label_traces(
            llm.engine.model, [p.trace for p in problems], marker, model_name=llm.source
        )
    features["corpus_ids"] = ids
    features["trace_families"] = {p.trace.id: p.family for p in problems}
    if path:
        save_features(path, features)
    return features


def features_of(features: dict[str, Any], keep: Callable[[str], bool]) -> dict[str, Any]:
    """A copy of `features` holding only the entries whose family passes `keep`."""
    entries = [e for e in features["traces"] if keep(entry_family(e, features))]
    return {**features, "traces": entries}


def check_no_family(features: dict[str, Any], family: str) -> None:
    """The leave-one-family-out invariant: FamilyLeakError when an entry is of `family`."""
    leaked = [str(e["id"]) for e in features["traces"] if entry_family(e, features) == family]
    if leaked:
        raise FamilyLeakError(
            f"{len(leaked)} trace(s) of the held-out family {family!r} in its head's training "
            f"set: {', '.join(leaked[:5])}"
        )


def train_without(
    features: dict[str, Any], family: str, config: TrainConfig
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Train a head on `features` less every entry of `family` (checked); the head and the
    train report plus `held_out_family` and `trained_on_ids`."""
    train = features_of(features, lambda f: f != family)
    if not train["traces"]:
        raise ValueError(f"no labelled trace outside family {family!r} to train DynTS on")
    return train_checked(train, family, config)


def train_checked(
    train: dict[str, Any], family: str, config: TrainConfig
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """`train_predictor` on `train` after `check_no_family(train, family)`."""
    check_no_family(train, family)
    head, report = train_predictor(train, config)
    report["held_out_family"] = family
    report["trained_on_ids"] = [str(e["id"]) for e in train["traces"]]
    return head, report


def family_overlap(head: torch.nn.Module, features: dict[str, Any], transform: str) -> float | None:
    """Mean top-20% overlap of the head's scores with the labels over the thinking tokens of
    each entry of `features` (None when none has thinking tokens)."""
    overlaps = []
    for entry in features["traces"]:
        mask = entry["thinking_mask"]
        if bool(mask.any()):
            labels = transform_labels(entry["labels"][mask].float(), transform)
            overlaps.append(top_overlap(predict(head, entry["hidden"][mask].float()), labels))
    return sum(overlaps) / len(overlaps) if overlaps else None


def make_head(
    features: dict[str, Any], family: str, config: TrainConfig, work_dir: str
) -> dict[str, Any]:
    """Train and save the head without `family`; its path, overlaps and training report."""
    head, report = train_without(features, family, config)
    os.makedirs(work_dir, exist_ok=True)
    path = os.path.join(work_dir, HEAD_NAME.format(family))
    save_predictor(head, path)
    load_predictor.cache_clear()  # a head of an earlier run may be cached under this path
    transform = resolve_transform(config.label_transform, features)
    unseen = features_of(features, lambda f: f == family)
    return {
        "path": path,
        "overlap_held_out": family_overlap(head, unseen, transform),
        "overlap_validation": report["final"]["val_top20_overlap"],
        "held_out_traces": len(unseen["traces"]),
        "train_report": report,
        "module": head,  # for judging it further; not part of any record
    }


def nll_after_budget(
    logprobs: Sequence[Sequence[float]], problems: Sequence[CorpusProblem], budget: int
) -> tuple[float, float | None]:
    """(mean NLL of every scored completion token, mean NLL of those at a position > budget,
    or None). Completion token t of a problem sits at position len(prompt) + t (as in
    fidelity); `logprobs[i]` holds problem i's first completion tokens."""
    every, after = [], []
    for lps, problem in zip(logprobs, problems, strict=True):
        start = len(problem.trace.prompt_token_ids)
        for t, lp in enumerate(lps):
            every.append(-lp)
            if start + t > budget:
                after.append(-lp)
    mean = sum(every) / len(every) if every else 0.0
    return mean, (sum(after) / len(after) if after else None)


def replay_cells(
    llm: LLM, problems: Sequence[CorpusProblem], configs: dict[str, dict | None]
) -> dict[str, dict[str, list]]:
    """Every problem under every config, all requests in one engine loop. One request per
    (config, problem) grades as `proxy_eval.run_method` does (completion forced up to the
    answer prefix, then ANSWER_TOKENS greedy tokens) and yields the log-prob of every forced
    token (as `fidelity.replay_all`): per config key, `correct`, `peak_kv` and `logprobs`.
    The NLL so covers the completion up to the answer prefix; the answer's own few tokens are
    graded by accuracy (a second, fully forced request would double the replay time)."""
    engine = llm.engine
    owner: dict[str, tuple[str, int]] = {}
    for key, config in configs.items():
        for i, p in enumerate(problems):
            params = replay_params(p, config)
            owner[engine.add_request(p.trace.prompt_token_ids, params, f"{key}/{i}")] = (key, i)
    out: dict[str, dict[str, list]] = {
        key: {name: [None] * len(problems) for name in ("correct", "peak_kv", "logprobs")}
        for key in configs
    }
    while engine.has_unfinished_requests():
        for result in engine.step():
            if not result.finished or result.request_id not in owner:
                continue
            key, i = owner[result.request_id]
            completion = result.outputs[0]
            answer = completion.token_ids[problems[i].answer_prefix_end :]
            out[key]["correct"][i] = is_correct(problems[i], llm.tokenizer.decode(answer))
            out[key]["peak_kv"][i] = result.metrics.peak_kv_slots
            out[key]["logprobs"][i] = list(completion.forced_logprobs or [])
    return out


def cell_row(replay: dict[str, list], problems: Sequence[CorpusProblem], budget: int) -> dict:
    """One (budget, method) cell of the record."""
    mean_nll, after = nll_after_budget(replay["logprobs"], problems, budget)
    return {
        "accuracy": sum(replay["correct"]) / len(problems),
        "nll_after_budget": after,
        "mean_nll": mean_nll,
        "mean_peak_kv": sum(replay["peak_kv"]) / len(problems),
        "max_peak_kv": max(replay["peak_kv"]),
        "correct": replay["correct"],
    }


def evaluate_family(
    llm: LLM,
    problems: list[CorpusProblem],
    methods: Sequence[str],
    budgets: Sequence[int],
    settings: argparse.Namespace,
    head: str | None,
    marker: Sequence[int],
) -> list[dict[str, dict[str, Any]]]:
    """Per budget, per method (full first: replayed once, the reference in every cell):
    accuracy, NLL after the budget and its increase over full's on the same tokens, mean
    NLL of every completion token, peak KV."""
    configs: dict[str, dict | None] = {"full": None}
    for b, budget in enumerate(budgets):
        for method, config in cell_configs(methods[1:], budget, settings, head, marker).items():
            configs[f"{b}:{method}"] = config
    replays = replay_cells(llm, problems, configs)
    cells = []
    for b, budget in enumerate(budgets):
        row = {"full": cell_row(replays["full"], problems, budget)}
        for method in methods[1:]:
            row[method] = cell_row(replays[f"{b}:{method}"], problems, budget)
        reference = row["full"]["nll_after_budget"]
        for cell in row.values():
            after = cell["nll_after_budget"]
            cell["nll_increase_after_budget"] = None if after is None else after - reference
        cells.append(row)
    return cells
