"""`thinfer bench prune-quality` on a tiny random Llama (GQA: 4 query heads in 2 KV groups,
8 blocks) with the default model's real tokenizer: one depth and one width method, pruned,
healed for 2 LoRA steps, scored on 4 proxy traces and timed; and its bad-input errors."""

from __future__ import annotations

import json
import math

import pytest
import torch
from tiny_llama import save_tiny_llama

from thinfer.cli import main

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    """A tiny Llama checkpoint with SmolLM2's tokenizer (`tests/tiny_llama.py`)."""
    return save_tiny_llama(str(tmp_path_factory.mktemp("tiny")))


def _argv(model: str, out, *extra: str) -> list[str]:
    argv = ["bench", "prune-quality", "--model", model, "--methods", "depth-ppl,mag-sp"]
    argv += ["--ratios", "0.5", "--heal-steps", "2", "--samples", "1", "--eval-samples", "1"]
    argv += ["--count", "4", "--facts", "1", "--steps", "2", "--batch-size", "2"]
    argv += ["--max-tokens", "4", "--speed-repeats", "2", "--device", "cpu", "--threads", "1"]
    argv += ["--output-dir", str(out)]
    return argv + list(extra)


@pytest.fixture
def keep_threads():
    """--threads sets torch's process-wide thread count: restore it for the other tests (one
    thread keeps this tiny model fast on a busy machine)."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_prune_quality_rows(tiny, tmp_path, capsys, keep_threads):
    assert main(_argv(tiny, tmp_path)) == 0
    files = sorted(p.name for p in tmp_path.iterdir())  # the model's folder names the result
    assert files == ["prune_quality_tiny0.json", "prune_quality_tiny0.png"]
    data = json.loads((tmp_path / "prune_quality_tiny0.json").read_text())
    assert data["complete"] and data["heal_steps"] == 2 and data["ratios"] == [0.5]
    assert [r["method"] for r in data["rows"]] == ["depth-ppl", "mag-sp"]
    depth, width = data["rows"]
    assert depth["removed"].startswith("4 blocks") and len(depth["removed_detail"]["blocks"]) == 4
    assert width["removed"] == "KV groups 2->1, MLP 48->24"
    dense = data["dense"]
    for row in data["rows"]:
        assert row["parameters"] < row["parameters_dense"] == dense["parameters"]
        assert 0 < row["parameters_fraction"] < 1
        for key in ("ppl_dense", "ppl_pruned", "ppl_healed"):
            assert math.isfinite(row[key]) and row[key] > 1
        for key in ("proxy_accuracy_dense", "proxy_accuracy_pruned", "proxy_accuracy_healed"):
            assert 0.0 <= row[key] <= 1.0
        assert row["tokens_per_s"] > 0 and row["dense_tokens_per_s"] > 0
        samples = row["speed_samples"]  # timed alternately, medians kept
        assert len(samples["dense"]) == len(samples["pruned"]) == 2
        assert row["tokens_per_s"] == pytest.approx(sum(samples["pruned"]) / 2)
        assert row["speedup_vs_dense"] == pytest.approx(
            row["tokens_per_s"] / row["dense_tokens_per_s"]
        )
        assert "checkpoint" not in row  # the temporary checkpoints are gone
        assert row["prune_and_heal_seconds"] >= 0
    assert dense["tokens_per_s"] > 0 and 0 <= dense["proxy_accuracy"] <= 1
    table = capsys.readouterr().out
    assert (
        "| dense | 0 |" in table and "| depth-ppl | 0.5 |" in table and "| mag-sp | 0.5 |" in table
    )


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--methods", "depth-ppl,nope", "nope"),
        ("--ratios", "0.2,1.0", "(0, 1)"),
        ("--ratios", "0", "(0, 1)"),
        ("--ratios", "x", "--ratios"),
        ("--count", "0", "--count"),
        ("--heal-steps", "0", "--heal-steps"),
        ("--batch-size", "-1", "--batch-size"),
        ("--max-tokens", "1", "--max-tokens"),
        ("--speed-repeats", "0", "--speed-repeats"),
        ("--facts", "3", "--facts"),
    ],
)
def test_prune_quality_bad_input_fails_before_loading(tmp_path, capsys, option, value, message):
    # the model path does not exist: reaching the loader would name it instead
    argv = _argv(str(tmp_path / "missing"), tmp_path / "out", option, value)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "missing" not in err
    assert not (tmp_path / "out").exists()


def test_prune_quality_default_methods_are_read_at_run_time(monkeypatch):
    import thinfer.pruning.run as run
    from thinfer.bench.prune_quality_args import parse_methods

    monkeypatch.setattr(run, "METHODS", (*run.METHODS, "new-method"))
    assert parse_methods(None)[-1] == "new-method"
    assert parse_methods("new-method") == ["new-method"]


def test_removed_summary_of_uniform_and_per_layer_widths():
    from thinfer.bench.prune_quality import removed_summary

    assert removed_summary({"removed_blocks": [3, 5]}) == ("2 blocks (3, 5)", {"blocks": [3, 5]})
    uniform = {"num_attention_heads": 6, "num_key_value_heads": 2, "intermediate_size": 10}
    uniform |= {"dropped_kv_groups": [[1], [0]], "dropped_mlp_channels": [[0, 4], [1, 2]]}
    text, detail = removed_summary({"shape": uniform})
    assert text == "KV groups 3->2, MLP 12->10" and "dropped_kv_groups" not in detail
    per_layer = {"layer_num_key_value_heads": [3, 2], "layer_intermediate_sizes": [9, 12]}
    per_layer |= {"dropped_kv_groups": [[], [0]], "dropped_mlp_channels": [[0, 1, 2], []]}
    text, detail = removed_summary({"shape": per_layer})
    assert text == "1 KV groups, 3 MLP channels in 2 layers"
    assert detail == {"layer_num_key_value_heads": [3, 2], "layer_intermediate_sizes": [9, 12]}


def test_table_and_figure_mark_rows_that_were_not_timed():
    from thinfer.bench.prune_quality_plot import markdown_table, plot_prune_quality

    def row(method: str, timed: bool) -> dict:
        r = {
            "method": method, "ratio": 0.2, "removed": "x", "parameters": 8e7,
            "parameters_fraction": 0.8, "ppl_pruned": 30.0, "ppl_healed": 20.0,
            "proxy_accuracy_pruned": 0.1, "proxy_accuracy_healed": 0.2,
            "prune_and_heal_seconds": 9.0,
        }  # fmt: skip
        if timed:
            r.update(tokens_per_s=120.0, dense_tokens_per_s=100.0, speedup_vs_dense=1.2)
        return r

    data = {
        "rows": [row("flap", False), row("mag-sp", True)], "model": "m", "heal_steps": 5,
        "dense": {"parameters": 1e8, "ppl": 16.0, "proxy_accuracy": 0.6, "tokens_per_s": 100.0},
        "device": "cpu", "decode": {"batch_size": 4, "max_tokens": 8}, "proxy": {"count": 4},
    }  # fmt: skip
    table = markdown_table(data)
    assert "0.10 -> 0.20 | - | - | 9 |" in table and "| 120.0 | 1.20 | 9 |" in table
    figure = plot_prune_quality(data)
    speed = figure.axes[2]
    assert [t.get_text() for t in speed.texts] == ["1.20x", "not\ntimed"]  # bar label, note
    assert [round(p.get_height(), 2) for p in speed.patches] == [1.2]
