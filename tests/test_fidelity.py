"""`thinfer dynts fidelity`: windows cut from real text files, NLL increase arithmetic, and
an end-to-end run of SmolLM2 on the project's own docs (real English text)."""

from __future__ import annotations

import argparse
import glob
import json
from pathlib import Path

import pytest

from thinfer.cli import main
from thinfer.dynts.fidelity import TextWindow, make_windows, run_fidelity, summarize, text_files

DOCS = sorted(glob.glob(str(Path(__file__).parent.parent / "docs" / "*.md")))


def test_text_files_accepts_files_directories_and_globs(tmp_path):
    (tmp_path / "a.txt").write_text("one")
    (tmp_path / "b.txt").write_text("two")
    (tmp_path / "c.md").write_text("three")
    both = [str(tmp_path / "a.txt"), str(tmp_path / "b.txt")]
    assert text_files([str(tmp_path)]) == both
    assert text_files([str(tmp_path / "*.txt"), str(tmp_path / "a.txt")]) == both
    assert text_files([str(tmp_path / "c.md")]) == [str(tmp_path / "c.md")]
    with pytest.raises(ValueError, match="not a file, a directory or a pattern"):
        text_files([str(tmp_path / "missing.txt")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no text files"):
        text_files([str(tmp_path / "empty")])


def test_windows_come_from_distinct_long_enough_files(llm, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("Too short.")
    files = [*DOCS[:3], str(short)]
    windows = make_windows(llm.tokenizer, files, count=3, length=64, prompt_tokens=8, seed=0)
    assert len({w.name for w in windows}) == 3 and "short.txt" not in {w.name for w in windows}
    for w in windows:
        text = open(next(f for f in files if f.endswith(w.name)), encoding="utf-8").read()
        ids = llm.tokenizer.encode(text, add_special_tokens=False)
        assert w.prompt + w.continuation == ids[w.offset : w.offset + 64]
        assert len(w.prompt) == 8
    again = make_windows(llm.tokenizer, files, count=3, length=64, prompt_tokens=8, seed=0)
    assert [(w.name, w.offset) for w in again] == [(w.name, w.offset) for w in windows]
    with pytest.raises(ValueError, match="only 3 of the 4 files have 64 tokens"):
        make_windows(llm.tokenizer, files, count=4, length=64, prompt_tokens=8, seed=0)
    with pytest.raises(ValueError, match="--prompt-tokens"):
        make_windows(llm.tokenizer, files, count=1, length=64, prompt_tokens=64, seed=0)


def test_summarize_measures_increase_against_full():
    windows = [TextWindow("a", 0, [1, 2], [3, 4, 5]), TextWindow("b", 0, [1, 2], [6, 7, 8])]
    runs = {
        "full": {"logprobs": [[-1.0, -1.0, -1.0], [-2.0, -2.0, -2.0]], "peak_kv": [5, 5]},
        "window": {"logprobs": [[-1.0, -1.5, -2.0], [-2.0, -2.0, -3.0]], "peak_kv": [3, 3]},
    }
    summary = summarize(runs, windows, budget=2)
    assert summary["full"]["nll_increase"] == 0.0
    window = summary["window"]
    assert window["nll_increase"] == pytest.approx((0 + 0.5 + 1 + 0 + 0 + 1) / 6)
    # positions 2, 3, 4: only 3 and 4 have a context beyond the budget of 2
    assert window["nll_increase_after_budget"] == pytest.approx((0.5 + 1 + 0 + 1) / 4)
    assert window["mean_nll"] == pytest.approx((4.5 + 7.0) / 6)
    assert window["nll_increase_by_position"] == {"0": pytest.approx(2.5 / 6)}
    assert (window["mean_peak_kv"], window["max_peak_kv"]) == (3.0, 3)


def test_fidelity_end_to_end_on_real_text(llm, tmp_path):
    args = argparse.Namespace(
        texts=DOCS,
        methods="window,h2o",
        budget=48,
        window=16,
        ratio=0.3,
        trigger="uniform",
        predictor=None,
        count=2,
        length=112,
        prompt_tokens=16,
        seed=0,
        output_dir=str(tmp_path),
    )
    record = run_fidelity(args, llm)
    methods = record["methods"]
    assert list(methods) == ["full", "window", "h2o"]
    assert methods["full"]["nll_increase"] == 0.0
    assert 1.0 < methods["full"]["mean_nll"] < 6.0  # real English under a real model
    for name in ("window", "h2o"):
        assert methods[name]["max_peak_kv"] <= 48  # equal budget under the uniform trigger
        positions = [int(p) for p in methods[name]["nll_increase_by_position"]]
        assert positions == sorted(positions)
    assert methods["full"]["max_peak_kv"] == 111  # the last forced token is never fed back
    # Dropping the first tokens (attention sinks) hurts far more than keeping heavy hitters.
    assert methods["window"]["nll_increase_after_budget"] > 0.3
    assert (
        methods["window"]["nll_increase_after_budget"] > methods["h2o"]["nll_increase_after_budget"]
    )
    written = json.loads((tmp_path / "fidelity_nll_uniform_b48.json").read_text())
    assert written["methods"]["window"]["nll_increase"] == methods["window"]["nll_increase"]
    assert (tmp_path / "fidelity_nll_uniform_b48.png").stat().st_size > 0


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--budget", "1024"], "must exceed --budget"),
        (["--count", "0"], "--count >= 1"),
        (["--methods", "dynts"], "give the trained head with --predictor"),
        (["--methods", "window", "--texts", "/nope.txt"], "not a file, a directory or a pattern"),
    ],
)
def test_cli_rejects_bad_options(tmp_path, capsys, extra, message):
    base = ["dynts", "fidelity", "--texts", *DOCS[:1], "--output-dir", str(tmp_path)]
    code = main(base + extra)
    assert code != 0
    assert message in capsys.readouterr().err
