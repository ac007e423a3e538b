"""DynTS head training: learns a simple synthetic importance, writes a head the engine loads
plus its JSON report, is deterministic, rejects bad features files; the `thinfer dynts
label` / `train` commands end to end on real SmolLM2 traces."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import run_cli

from thinfer.cli import main
from thinfer.compression.predictor import load_predictor
from thinfer.dynts.feature_file import FORMAT, VERSION, load_features, save_features
from thinfer.dynts.traces import Trace, write_traces
from thinfer.dynts.train import TrainConfig, make_schedule, train_from_file, train_predictor
from thinfer.dynts.train_data import split_by_trace, transform_labels

HIDDEN = 16


def synthetic_features(num_traces: int = 30, tokens: int = 120, seed: int = 0) -> dict:
    """Labels = softplus(w . h) of random hidden states; 10 prompt and 10 answer tokens."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(HIDDEN, generator=gen) * 0.6
    traces = []
    for i in range(num_traces):
        hidden = torch.randn(tokens, HIDDEN, generator=gen)
        mask = torch.zeros(tokens, dtype=torch.bool)
        mask[10 : tokens - 10] = True
        traces.append(
            {
                "id": f"s{i}",
                "prompt_len": 10,
                "answer_start": tokens - 10,
                "hidden": hidden,
                "labels": F.softplus(hidden @ w),
                "thinking_mask": mask,
            }
        )
    return {
        "format": FORMAT,
        "version": VERSION,
        "model": "synthetic",
        "hidden_size": HIDDEN,
        "num_layers": 1,
        "num_heads": 1,
        "think_end_token_ids": [7],
        "skipped": {},
        "traces": traces,
    }


def test_learns_a_synthetic_importance(tmp_path):
    path = str(tmp_path / "features.pt")
    save_features(path, synthetic_features())
    config = TrainConfig(epochs=6, lr=3e-3, batch_size=64, val_fraction=0.2, label_transform="none")
    report = train_from_file(path, str(tmp_path / "head.safetensors"), config)
    mses = [row["val_mse"] for row in report["metrics"]]
    assert mses[-1] < 0.1 * mses[0] and mses[-1] < 0.05
    assert report["final"]["val_top20_overlap"] > 0.8
    assert report["num_val_traces"] == 6 and report["num_train_tokens"] == 24 * 100
    assert len(set(report["val_trace_ids"])) == 6 and report["num_train_traces"] == 24
    head = load_predictor(str(tmp_path / "head.safetensors"), torch.float32, "cpu")
    assert head.hidden_size == HIDDEN
    saved = json.loads((tmp_path / "head.safetensors.json").read_text())
    for key in (
        "hidden_size",
        "label_transform",
        "epochs",
        "metrics",
        "final",
        "num_traces",
        "num_train_tokens",
        "num_val_tokens",
    ):
        assert key in saved
    assert saved["label_transform"] == "none" and saved["hidden_size"] == HIDDEN
    assert saved["final"]["val_top20_overlap"] == report["final"]["val_top20_overlap"]
    assert set(saved["metrics"][0]) == {"epoch", "train_loss", "val_mse", "val_top20_overlap"}


def test_same_seed_same_head_and_auto_transform():
    features = synthetic_features(num_traces=6, tokens=40)
    config = TrainConfig(epochs=2, seed=3)
    first, report = train_predictor(features, config)
    second, _ = train_predictor(features, config)
    for a, b in zip(first.state_dict().values(), second.state_dict().values()):
        assert torch.equal(a, b)
    assert report["label_transform"] == "qwen" and report["label_transform_requested"] == "auto"
    other, _ = train_predictor(features, TrainConfig(epochs=2, seed=4))
    assert not torch.equal(other.fc1.weight, first.fc1.weight)


def test_split_is_by_trace_and_label_transforms():
    train, val = split_by_trace(10, 0.1, 0)
    assert len(val) == 1 and sorted(train + val) == list(range(10))
    assert split_by_trace(1, 0.5, 0) == ([0], [])
    assert split_by_trace(5, 0.0, 0)[1] == []
    y = torch.tensor([0.0, 1e-4, 1e-2])
    torch.testing.assert_close(transform_labels(y, "llama"), torch.tensor([0.0, 1.0, 100.0]))
    torch.testing.assert_close(transform_labels(y, "qwen"), 10 * y**0.3 / 0.3)
    assert torch.equal(transform_labels(y, "none"), y)


def test_schedule_warms_up_then_decays_to_zero():
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    schedule = make_schedule(opt, 100, 0.1)
    lrs = []
    for _ in range(100):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        schedule.step()
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:])) and lrs[-1] < 0.01


def test_bad_features_files_are_value_errors(tmp_path, capsys):
    missing = str(tmp_path / "missing.pt")
    with pytest.raises(ValueError, match="does not exist"):
        load_features(missing)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="not a readable features file"):
        load_features(str(garbage))
    other = str(tmp_path / "other.pt")
    torch.save({"weights": torch.zeros(3)}, other)
    with pytest.raises(ValueError, match="not a DynTS features file"):
        load_features(other)
    features = synthetic_features(num_traces=2, tokens=30)
    features["traces"][1]["labels"] = torch.zeros(29)
    torch.save(features, other)
    with pytest.raises(ValueError, match="trace 1: labels"):
        load_features(other)
    features = synthetic_features(num_traces=2, tokens=30)
    for trace in features["traces"]:
        trace["thinking_mask"][:] = False
    torch.save(features, other)
    with pytest.raises(ValueError, match="no trace with thinking tokens"):
        train_from_file(other, str(tmp_path / "h.safetensors"), TrainConfig(epochs=1))
    with pytest.raises(ValueError, match="epochs"):
        train_from_file(other, str(tmp_path / "h.safetensors"), TrainConfig(epochs=0))
    code = main(["dynts", "train", "--features", str(garbage), "--output", "x.safetensors"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("thinfer: error:") and len(err.strip().splitlines()) == 1


def test_label_then_train_from_the_command_line(llm, tmp_path):
    tok = llm.tokenizer
    prompts = ["Question: What is 2 + 2?\n", "Question: Name a primary colour.\n"]
    completions = [
        "<think>\nTwo plus two makes four. Easy.\n</think>\nThe answer is 4.",
        "<think>\nRed, blue and yellow are primary colours. Pick red.\n</think>\nRed.",
    ]
    traces = [
        Trace(f"t{i}", tok.encode(p), tok.encode(c))
        for i, (p, c) in enumerate(zip(prompts, completions))
    ]
    traces.append(Trace("nomarker", tok.encode("Hi"), tok.encode("No marker here.")))
    write_traces(str(tmp_path / "traces.jsonl"), traces)
    features = str(tmp_path / "features.pt")
    labelled = run_cli(
        "dynts", "label", "--traces", str(tmp_path / "traces.jsonl"), "--output", features,
        "--dtype", "float32", "--device", "cpu", "--chunk", "16",
    )  # fmt: skip
    assert labelled.returncode == 0, labelled.stderr
    assert "skipped 1 trace(s): no think-end marker" in labelled.stderr
    assert "labelled 2 of 3 traces" in labelled.stdout
    cached = load_features(features)
    assert [t["id"] for t in cached["traces"]] == ["t0", "t1"]
    assert cached["hidden_size"] == llm.model_config.hidden_size
    first = cached["traces"][0]
    marker = len(cached["think_end_token_ids"])
    expected = torch.zeros(len(traces[0].token_ids), dtype=torch.bool)
    expected[len(traces[0].prompt_token_ids) : first["answer_start"] - marker] = True
    assert torch.equal(first["thinking_mask"], expected)
    head = str(tmp_path / "head.safetensors")
    trained = run_cli(
        "dynts", "train", "--features", features, "--output", head, "--epochs", "1",
        "--val-fraction", "0.5",
    )  # fmt: skip
    assert trained.returncode == 0, trained.stderr
    assert "trained on 1 traces" in trained.stdout and "top-20% overlap" in trained.stdout
    assert load_predictor(head, torch.float32, "cpu").hidden_size == cached["hidden_size"]
    report = json.loads(open(head + ".json").read())
    assert report["epochs"] == 1 and len(report["metrics"]) == 1
