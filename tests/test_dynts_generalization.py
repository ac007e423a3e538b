"""`thinfer dynts generalization`: the leave-one-family-out split never leaks (checked, and the
guard raises on leaking data), budgets and NLL arithmetic, the label cache, bad input, and one
small end-to-end run of SmolLM2 on a 2-family corpus in which a budget above every request's
peak leaves every method exactly at the full cache."""

from __future__ import annotations

import argparse
import json
import os

import pytest
import torch
from default_model import require_default_model

from thinfer.cli import main
from thinfer.dynts import generalization as g
from thinfer.dynts.corpus import make_corpus, read_problems, write_problems
from thinfer.dynts.corpus.problem import CorpusProblem
from thinfer.dynts.generalization_cli import (
    check_methods,
    parse_fractions,
    run_generalization,
    select_families,
)
from thinfer.dynts.generalization_plot import markdown_table
from thinfer.dynts.traces import Trace, think_end_ids
from thinfer.dynts.train import TrainConfig

FAMILIES = ("codes", "arithmetic")  # answers end in >= 3 tokens after the answer prefix
SMALL = 0.5


def problem(trace_id: str, family: str, prompt: int, completion: int) -> CorpusProblem:
    trace = Trace(trace_id, list(range(prompt)), list(range(completion)), "1")
    return CorpusProblem(trace, completion - 1, "1", family)


def fake_features(ids: list[str], hidden_size: int = 8, mapping: bool = True) -> dict:
    gen = torch.Generator().manual_seed(0)
    entries = []
    for trace_id in ids:
        mask = torch.zeros(12, dtype=torch.bool)
        mask[2:10] = True
        entries.append(
            {
                "id": trace_id,
                "prompt_len": 2,
                "answer_start": 11,
                "hidden": torch.randn(12, hidden_size, generator=gen),
                "labels": torch.rand(12, generator=gen),
                "thinking_mask": mask,
            }
        )
    features = {"hidden_size": hidden_size, "model": "fake", "traces": entries}
    if mapping:
        features["trace_families"] = {i: i.rsplit("-", 1)[0] for i in ids}
    return features


@pytest.fixture(scope="module", autouse=True)
def threads_as_asked():
    """With OMP_NUM_THREADS set, this module runs torch on that many threads (conftest sets 2):
    its replays are hundreds of small decode steps, which two threads on a busy 2-core
    machine run ~10x slower than one (measured). Restored afterwards."""
    before = torch.get_num_threads()
    wanted = os.environ.get("OMP_NUM_THREADS", "")
    if wanted.isdigit() and int(wanted) > 0:
        torch.set_num_threads(int(wanted))
    yield
    torch.set_num_threads(before)


# -- pure logic -----------------------------------------------------------------------------


def test_budget_fractions_and_absolute_budgets():
    assert parse_fractions("0.2, 0.4,1") == [0.2, 0.4, 1.0]
    for bad in ("0", "1.5", "-0.2", "0.2,0.2", "x", ""):
        with pytest.raises(ValueError, match="--budgets"):
            parse_fractions(bad)
    assert g.absolute_budget(0.25, [100, 103]) == 25  # round(0.25 * 101.5 = 25.375)
    held_out = {"a": [problem("a-0", "a", 10, 90), problem("a-1", "a", 10, 190)]}
    assert g.plan_budgets(held_out, [0.2, 1.0], window=16) == {"a": [30, 150]}
    with pytest.raises(ValueError, match="leaves no room beyond --window 30"):
        g.plan_budgets(held_out, [0.2], window=30)


def test_families_and_methods_are_checked():
    problems = [problem("a-0", "a", 2, 9), problem("b-0", "b", 2, 9), problem("a-1", "a", 2, 9)]
    assert select_families(problems, None) == ["a", "b"]
    assert select_families(problems, ["b"]) == ["b"]
    with pytest.raises(ValueError, match="family c not in the corpus"):
        select_families(problems, ["c"])
    with pytest.raises(ValueError, match="needs at least two"):
        select_families(problems[:1], None)
    assert check_methods(["window", "dynts"]) == ["full", "window", "dynts"]
    assert check_methods(["dynts", "full"]) == ["full", "dynts"]
    with pytest.raises(ValueError, match="unknown method"):
        check_methods(["window", "lru"])


def test_nll_after_budget_counts_positions_past_the_budget():
    problems = [problem("a-0", "a", 3, 4), problem("a-1", "a", 5, 2)]
    logprobs = [[-1.0, -2.0, -3.0, -4.0], [-5.0, -6.0]]  # positions 3..6 and 5..6
    mean, after = g.nll_after_budget(logprobs, problems, budget=4)
    assert mean == pytest.approx(21 / 6)
    assert after == pytest.approx((3 + 4 + 5 + 6) / 4)  # positions 5, 6 and 5, 6
    assert g.nll_after_budget(logprobs, problems, budget=6)[1] is None


def test_family_of_an_entry_from_the_map_or_the_id():
    features = fake_features(["recall-0", "my-family-3"], mapping=False)
    assert [g.entry_family(e, features) for e in features["traces"]] == ["recall", "my-family"]
    features["trace_families"] = {"recall-0": "text"}
    assert g.entry_family(features["traces"][0], features) == "text"


def test_leakage_guard_raises_and_training_excludes_the_family(monkeypatch):
    ids = ["a-0", "a-1", "b-0", "b-1", "c-0"]
    features = fake_features(ids)
    config = TrainConfig(epochs=1, seed=0)
    with pytest.raises(g.FamilyLeakError, match="held-out family 'a'.*a-0, a-1"):
        g.train_checked(features, "a", config)
    without_map = fake_features(ids, mapping=False)
    with pytest.raises(g.FamilyLeakError):
        g.check_no_family(g.features_of(without_map, lambda f: f != "b"), "a")
    seen = []
    real = g.train_predictor
    monkeypatch.setattr(g, "train_predictor", lambda f, c: seen.append(f) or real(f, c))
    head, report = g.train_without(features, "a", config)
    assert [e["id"] for e in seen[0]["traces"]] == ["b-0", "b-1", "c-0"]
    assert report["trained_on_ids"] == ["b-0", "b-1", "c-0"]
    assert report["held_out_family"] == "a"
    only_a = g.features_of(features, lambda f: f == "a")
    with pytest.raises(ValueError, match="no labelled trace outside family 'a'"):
        g.train_without(only_a, "a", config)


# -- end to end on SmolLM2 ------------------------------------------------------------------


@pytest.fixture(scope="module")
def corpus(llm, tmp_path_factory):
    require_default_model()
    path = tmp_path_factory.mktemp("corpus") / "corpus.jsonl"
    write_problems(str(path), make_corpus(llm.tokenizer, FAMILIES, 2, seed=0, target_tokens=220))
    return str(path)


def arguments(corpus: str, out, **overrides) -> argparse.Namespace:
    args = argparse.Namespace(
        corpus=corpus, families=None, budgets=f"{SMALL},1.0", window=16, ratio=0.3,
        methods="full,window,dynts", scoring="per_head", features=str(out / "features.pt"),
        work_dir=str(out / "heads"), count=1, think_end="</think>", model=None,
        max_num_seqs=64, num_kv_blocks=2048, output_dir=str(out / "results"), epochs=1,
        lr=5e-4, batch_unit="traces", batch_size=None, val_fraction=0.1,
        label_transform="auto", seed=0, resume=False, heads_only=False,
    )  # fmt: skip
    for key, value in overrides.items():
        setattr(args, key, value)
    return args


@pytest.fixture(scope="module")
def run(llm, corpus, tmp_path_factory):
    """One run: both families held out in turn, 1 problem each, budgets 0.5 and 1.0; every
    features dict handed to training is recorded."""
    out = tmp_path_factory.mktemp("generalization")
    trained = []
    real = g.train_predictor
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(g, "train_predictor", lambda f, c: trained.append(f) or real(f, c))
        record = run_generalization(arguments(corpus, out), llm)
    return record, trained, out


def test_each_head_is_trained_without_its_family(run, corpus):
    record, trained, out = run
    problems = read_problems(corpus)
    assert [f for f in record["families"]] == list(FAMILIES)
    assert len(trained) == len(FAMILIES)
    for family, features in zip(FAMILIES, trained):
        ids = {str(e["id"]) for e in features["traces"]}
        held_out_ids = {p.trace.id for p in problems if p.family == family}
        assert ids and not ids & held_out_ids
        assert ids == {p.trace.id for p in problems if p.family != family}
        head = record["families"][family]["head"]
        assert head["path"] == str(out / "heads" / f"head_without_{family}.safetensors")
        report = json.loads(open(head["path"] + ".json").read())
        assert report["held_out_family"] == family
        assert not set(report["trained_on_ids"]) & held_out_ids
        assert 0.0 <= head["overlap_held_out"] <= 1.0 and head["held_out_traces"] == 2


def test_a_budget_above_every_request_keeps_every_method_at_full(run):
    record, _, _ = run
    for entry in record["families"].values():
        cell = entry["budgets"]["1.0"]
        full = cell["methods"]["full"]
        assert full["max_peak_kv"] < cell["budget"]  # nothing is ever compressed here
        for method in ("window", "dynts"):
            c = cell["methods"][method]
            assert c["correct"] == full["correct"] and c["accuracy"] == full["accuracy"]
            # the same tokens through the same weights; 2 threads may reorder a sum
            assert c["mean_nll"] == pytest.approx(full["mean_nll"], rel=1e-5)
            assert c["nll_after_budget"] is None and full["nll_after_budget"] is None
            assert c["mean_peak_kv"] == full["mean_peak_kv"]
        small = entry["budgets"][str(SMALL)]
        assert small["budget"] == round(SMALL * entry["mean_length"])
        for method in ("window", "dynts"):
            assert small["methods"][method]["max_peak_kv"] <= small["budget"]
            assert small["methods"][method]["nll_after_budget"] is not None


def test_json_png_and_table(run, capsys):
    record, _, out = run
    # a run with DynTS heads is named by their recipe too; without them (resume test) not
    assert record["recipe"] == "qwen_traces_e1_lr0.0005_seed0"
    name = "dynts_generalization_SmolLM2-135M-Instruct.Q4_1_per_head_qwen_traces_e1_lr0.0005_seed0"
    written = json.loads((out / "results" / f"{name}.json").read_text())
    assert (out / "results" / f"{name}.png").stat().st_size > 0
    assert written["methods"] == ["full", "window", "dynts"]
    assert written["budget_fractions"] == [SMALL, 1.0] and written["trigger"] == "uniform"
    assert written["complete"] and written["held_out_families"] == list(FAMILIES)
    for family in FAMILIES:
        entry = written["families"][family]
        assert entry["traces"] == 1 and entry["mean_length"] > 0
        assert set(entry["head"]) >= {"overlap_held_out", "overlap_validation"}
        for key in (str(SMALL), "1.0"):
            cells = entry["budgets"][key]["methods"]
            assert list(cells) == ["full", "window", "dynts"]
            for cell in cells.values():
                assert {"accuracy", "nll_after_budget", "mean_peak_kv"} <= set(cell)
            assert cells["full"]["nll_increase_after_budget"] in (0.0, None)
    table = markdown_table(record)
    assert table.count("| codes (") == 2 and "| full | window | dynts |" in table


def test_label_cache_is_reused_and_checked(run, llm, corpus, monkeypatch):
    _, _, out = run
    path = str(out / "features.pt")
    problems = read_problems(corpus)
    marker = think_end_ids(llm.tokenizer)

    def no_labelling(*args, **kwargs):
        raise AssertionError("relabelled although the cache matches")

    monkeypatch.setattr(g, "label_traces", no_labelling)
    features = g.label_corpus(llm, problems, marker, path)
    assert features["corpus_ids"] == [p.trace.id for p in problems]
    assert set(features["trace_families"].values()) == set(FAMILIES)
    with pytest.raises(ValueError, match="another corpus"):
        g.label_corpus(llm, problems[:-1], marker, path)


def test_a_stopped_run_keeps_its_families_and_resumes(llm, corpus, tmp_path, monkeypatch):
    """Stopped during the second family, the record holds the first (complete: false);
    `--resume` measures only the second, also when it is named alone in `--families` (the
    first stays in the record); other settings are refused."""
    evaluated, stop = [], [True]

    def evaluate(llm, problems, methods, budgets, *rest):
        family = problems[0].family
        if family == FAMILIES[1] and stop[0]:
            raise KeyboardInterrupt  # the run is stopped during the second family
        evaluated.append(family)
        cell = {"accuracy": 1.0, "nll_after_budget": None, "mean_peak_kv": 1.0}
        return [{m: dict(cell) for m in methods} for _ in budgets]

    monkeypatch.setattr(g, "evaluate_family", evaluate)
    args = arguments(corpus, tmp_path, methods="full,window")
    with pytest.raises(KeyboardInterrupt):
        run_generalization(args, llm)
    path = tmp_path / "results" / "dynts_generalization_SmolLM2-135M-Instruct.Q4_1_per_head.json"
    written = json.loads(path.read_text())
    assert list(written["families"]) == [FAMILIES[0]] and written["complete"] is False
    stop[0] = False
    resumed = arguments(corpus, tmp_path, methods="full,window", resume=True, families=FAMILIES[1])
    record = run_generalization(resumed, llm)
    assert evaluated == [FAMILIES[0], FAMILIES[1]]  # the first family was not measured again
    assert list(record["families"]) == list(FAMILIES) and record["complete"]
    assert record["held_out_families"] == list(FAMILIES)
    assert json.loads(path.read_text())["families"][FAMILIES[0]] == written["families"][FAMILIES[0]]
    other = arguments(corpus, tmp_path, methods="full,window", resume=True, window=8)
    with pytest.raises(ValueError, match="measured with other window"):
        run_generalization(other, llm)


def features_like(problems: list[CorpusProblem], hidden_size: int) -> dict:
    """Fake features shaped like the problems' traces (random hidden states and labels)."""
    features = fake_features([p.trace.id for p in problems], hidden_size)
    gen = torch.Generator().manual_seed(1)
    for entry, problem in zip(features["traces"], problems, strict=True):
        total, start = len(problem.trace.token_ids), len(problem.trace.prompt_token_ids)
        mask = torch.zeros(total, dtype=torch.bool)
        mask[start : start + problem.answer_prefix_end - 3] = True
        entry.update(
            prompt_len=start,
            answer_start=start + problem.answer_prefix_end,
            hidden=torch.randn(total, hidden_size, generator=gen),
            labels=torch.rand(total, generator=gen),
            thinking_mask=mask,
        )
    return features


def test_heads_only_judges_each_head_on_its_unseen_family(llm, corpus, tmp_path, monkeypatch):
    features = features_like(read_problems(corpus), llm.model_config.hidden_size)
    features.update(skipped={})
    monkeypatch.setattr(g, "label_corpus", lambda *args: features)
    monkeypatch.setattr(g, "evaluate_family", lambda *a: pytest.fail("replayed"))
    trained = []
    real = g.train_predictor
    monkeypatch.setattr(g, "train_predictor", lambda f, c: trained.append(f) or real(f, c))
    record = run_generalization(arguments(corpus, tmp_path, heads_only=True), llm)
    assert list(record["families"]) == list(FAMILIES)
    for family, train in zip(FAMILIES, trained, strict=True):
        assert {g.entry_family(e, train) for e in train["traces"]} == set(FAMILIES) - {family}
        entry = record["families"][family]
        assert 0 <= entry["overlap_held_out"] <= 1 and entry["held_out_traces"] == 2
        kept = entry["critical_kept"]  # the first --count (1) problem, at each budget
        assert list(kept) == [str(SMALL), "1.0"] and kept[str(SMALL)]["problems"] == 1
        assert all(0 <= kept[str(SMALL)][r] <= 1 for r in ("head", "labels", "recent"))
        assert all(kept["1.0"][r] == 1.0 for r in ("head", "labels", "recent"))  # no eviction
    name = f"dynts_head_overlap_SmolLM2-135M-Instruct.Q4_1_{record['recipe']}.json"
    written = json.loads((tmp_path / "results" / name).read_text())
    assert written["recipe"] == "qwen_traces_e1_lr0.0005_seed0"


def test_dynts_without_training_data_is_an_error(llm, corpus, tmp_path, monkeypatch):
    only_codes = fake_features(["codes-0"], hidden_size=576)
    only_codes.update(skipped={})
    monkeypatch.setattr(g, "label_corpus", lambda *args: only_codes)
    monkeypatch.setattr(g, "evaluate_family", lambda *a: pytest.fail("replayed"))
    with pytest.raises(ValueError, match="no labelled trace outside family 'codes'"):
        run_generalization(arguments(corpus, tmp_path), llm)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--budgets", "0"], "fractions must be in (0, 1]"),
        (["--budgets", "1.2"], "fractions must be in (0, 1]"),
        (["--families", "recall"], "family recall not in the corpus"),
        (["--methods", "full,lru"], "unknown method(s) lru"),
        (["--budgets", "0.05"], "leaves no room beyond --window 16"),
        (["--count", "0"], "--count must be >= 1"),
        (["--epochs", "0"], "epochs must be >= 1"),
    ],
)
def test_cli_rejects_bad_input(corpus, tmp_path, capsys, extra, message):
    base = ["dynts", "generalization", "--corpus", corpus, "--window", "16"]
    assert main(base + ["--output-dir", str(tmp_path)] + extra) != 0
    assert message in capsys.readouterr().err


def test_cli_rejects_a_corpus_of_one_family(corpus, tmp_path, capsys):
    one = tmp_path / "one.jsonl"
    write_problems(str(one), [p for p in read_problems(corpus) if p.family == "codes"])
    assert main(["dynts", "generalization", "--corpus", str(one)]) != 0
    assert "leave-one-family-out needs at least two" in capsys.readouterr().err
