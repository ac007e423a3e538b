"""`thinfer eval ppl`: the default text, its splits and windows, perplexity against HF."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import run_cli

from thinfer.cli import build_parser, main
from thinfer.eval.perplexity import perplexity
from thinfer.eval.texts import default_text, read_texts, split_tokens, windows


@pytest.fixture(scope="module")
def eval_windows(llm) -> list[list[int]]:
    """4 windows of 64 tokens from the held-out split of the default text."""
    ids = llm.tokenizer.encode(default_text(), add_special_tokens=False)
    return windows(split_tokens(ids)[1], 64, 4)


@pytest.fixture(scope="module")
def batched(llm, eval_windows) -> dict[str, float]:
    """thinfer's perplexity on the 4 windows, all in one forward pass."""
    return perplexity(llm, eval_windows)


def test_default_text_is_the_python_topics_in_order():
    from pydoc_data.topics import topics

    text = default_text()
    assert len(text) > 100_000
    first, last = sorted(topics)[0], sorted(topics)[-1]
    assert text.startswith(topics[first].strip())
    assert text.endswith(topics[last].strip())
    assert default_text() == text


def test_perplexity_matches_hf_transformers(hf_model, eval_windows, batched):
    result = batched
    ids = torch.tensor(eval_windows)
    with torch.inference_mode():
        logits = hf_model(input_ids=ids).logits[:, :-1].float()
    picked = torch.log_softmax(logits, dim=-1).gather(2, ids[:, 1:, None])
    hf_nll = -picked.double().mean().item()
    assert result["windows"] == 4 and result["window"] == 64 and result["tokens"] == 4 * 63
    assert result["nll"] == pytest.approx(hf_nll, rel=1e-3)
    assert result["ppl"] == pytest.approx(math.exp(hf_nll), rel=1e-3)
    assert 1.0 < result["ppl"] < 200.0  # a real model on real prose, not a uniform guess


def test_windows_are_scored_independently_of_the_batch(llm, eval_windows, batched):
    alone = [perplexity(llm, [w], batch_size=1)["nll"] for w in eval_windows]
    assert batched["nll"] == pytest.approx(sum(alone) / len(alone), rel=1e-5)


def test_perplexity_rejects_bad_windows(llm):
    with pytest.raises(ValueError, match="no windows"):
        perplexity(llm, [])
    with pytest.raises(ValueError, match="same length"):
        perplexity(llm, [[1, 2, 3], [1, 2]])
    with pytest.raises(ValueError, match="batch_size"):
        perplexity(llm, [[1, 2]], batch_size=0)
    with pytest.raises(ValueError, match="token ids must be in"):
        perplexity(llm, [[1, 10**9]])
    with pytest.raises(ValueError, match="exceeds the model's context"):
        perplexity(llm, [[1] * (llm.model_config.max_position_embeddings + 1)])


def test_split_keeps_the_tail_for_evaluation():
    ids = list(range(10))
    calib, held_out = split_tokens(ids)
    assert (calib, held_out) == (list(range(8)), [8, 9])
    calib, held_out = split_tokens(ids, 0.5)
    assert calib + held_out == ids and not set(calib) & set(held_out)
    for bad in (0.0, 1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match=r"held_out_fraction must be in \(0, 1\)"):
            split_tokens(ids, bad)


def test_windows_drop_the_remainder_and_respect_count():
    ids = list(range(10))
    assert windows(ids, 3) == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    assert windows(ids, 3, count=2) == [[0, 1, 2], [3, 4, 5]]
    assert windows(ids, 5, count=9) == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]
    assert windows(ids, 10) == [ids]
    with pytest.raises(ValueError, match="not even one window fits: 10 tokens, a window needs 11"):
        windows(ids, 11)
    with pytest.raises(ValueError, match="window length must be >= 2"):
        windows(ids, 1)
    with pytest.raises(ValueError, match="window count must be >= 1"):
        windows(ids, 2, count=0)


def test_read_texts_files_directories_and_patterns(tmp_path):
    (tmp_path / "b.txt").write_text("second", encoding="utf-8")
    (tmp_path / "a.txt").write_bytes(b"first \xff")
    (tmp_path / "notes.md").write_text("markdown", encoding="utf-8")
    assert read_texts([str(tmp_path)]) == "first \ufffd\n\nsecond"
    assert read_texts([str(tmp_path / "*.md")]) == "markdown"
    assert read_texts([str(tmp_path / "b.txt"), str(tmp_path)]).count("second") == 1
    missing = str(tmp_path / "missing.txt")
    with pytest.raises(ValueError, match="missing.txt: no such file"):
        read_texts([missing])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="empty: directory holds no"):
        read_texts([str(empty)])


def test_eval_keeps_its_options_beside_ppl(capsys):
    args = build_parser().parse_args(["eval", "--dataset", "d.jsonl", "--budget", "8"])
    assert args.eval_command is None and args.window is None and args.dataset == "d.jsonl"
    args = build_parser().parse_args(["eval", "ppl", "m.gguf", "--window", "64", "--text", "a"])
    assert args.eval_command == "ppl" and args.window == 64 and args.split == "eval"
    assert args.model_path == "m.gguf" and args.text == ["a"]
    assert main(["eval", "--dataset", "d.jsonl"]) == 2
    assert "required: --budget" in capsys.readouterr().err
    assert main(["eval", "ppl", "--text", "/no/such/dir/x.txt"]) == 2
    assert "/no/such/dir/x.txt: no such file" in capsys.readouterr().err


def test_cli_prints_ppl_and_writes_json(tmp_path):
    out = tmp_path / "ppl.json"
    result = run_cli("eval", "ppl", "--window", "64", "--count", "2", "--json", str(out))
    assert result.returncode == 0, result.stderr
    line = result.stdout.strip().splitlines()[-1]
    assert line.startswith("ppl ") and "2 windows x 64 tokens, held-out split of" in line
    saved = json.loads(out.read_text())
    assert saved["window"] == 64 and saved["count"] == 2 and saved["split"] == "eval"
    assert saved["text_source"].startswith("pydoc_data.topics")
    assert saved["ppl"] == pytest.approx(math.exp(saved["nll"]))
    assert f"ppl {saved['ppl']:.2f}" in line and saved["model"]
