"""`thinfer eval quant-cost` (its perplexity is `thinfer.eval.perplexity`, checked against
HF transformers in tests/test_perplexity.py): the command records every variant, and a model
without a tokenizer is refused."""

from __future__ import annotations

import json

import pytest

from thinfer.bench.hf_peer import prefix_agreement
from thinfer.cli import main


def test_agreement_counts_tokens_before_divergence():
    assert prefix_agreement([[1, 2, 3, 4], [5, 6]], [[1, 2, 9, 4], [5, 6]]) == pytest.approx(4 / 6)
    assert prefix_agreement([[1, 2]], [[1, 2]]) == 1.0


def test_bench_quant_cost_records_every_variant(tmp_path, capsys):
    argv = ["eval", "quant-cost", "--windows", "2", "--window-len", "16", "--prompts", "2"]
    argv += ["--greedy-tokens", "4", "--num-kv-blocks", "64", "--output-dir", str(tmp_path)]
    assert main(argv) == 0
    (path,) = tmp_path.glob("quant_cost_*.json")
    data = json.loads(path.read_text())
    assert list(data["variants"]) == ["fp32", "int8", "int4"]
    fp32 = data["variants"]["fp32"]
    assert fp32["greedy_agreement_with_fp32"] == 1.0 and fp32["perplexity_vs_fp32"] == 1.0
    for row in data["variants"].values():
        assert row["perplexity"] == pytest.approx(2.718281828 ** row["held_out_nll"])
    tiny = ["eval", "quant-cost", "--model", "tiny", "--load-format", "dummy"]
    assert main(tiny + ["--output-dir", str(tmp_path)]) == 2
    assert "needs a model with a tokenizer" in capsys.readouterr().err
