"""The proxy reasoning task: well-formed traces whose answer needs a critical step."""

from __future__ import annotations

from thinfer.dynts.proxy import is_correct, make_problems
from thinfer.dynts.traces import read_traces, think_end_ids, write_traces


def test_problems_are_well_formed_and_reproducible(llm, tmp_path):
    tok = llm.tokenizer
    problems = make_problems(tok, 5, seed=3, num_facts=3, num_steps=20)
    again = make_problems(tok, 5, seed=3, num_facts=3, num_steps=20)
    assert [p.trace for p in problems] == [p.trace for p in again]
    marker = think_end_ids(tok)
    for p in problems:
        completion = p.trace.completion_token_ids
        text = tok.decode(completion)
        assert text.count("so the code of") == 3
        prefix = tok.decode(completion[: p.answer_prefix_end])
        assert prefix.endswith(" is") and "</think>" in prefix
        assert f"the code of {prefix.split('The code of ')[-1][:-3]} is {p.answer}." in text
        start = p.trace.answer_start(marker)
        assert start is not None and start < len(p.trace.prompt_token_ids) + p.answer_prefix_end
        assert is_correct(p, f" {p.answer}.\n") and not is_correct(p, " 1000.")
    path = tmp_path / "traces.jsonl"
    write_traces(str(path), [p.trace for p in problems])
    assert read_traces(str(path)) == [p.trace for p in problems]


def test_proxy_eval_replays_and_grades(llm):
    from thinfer.dynts.proxy_eval import run_method

    problems = make_problems(llm.tokenizer, 2, seed=5, num_facts=2, num_steps=6)
    full = run_method(llm, problems, None)
    window = run_method(llm, problems, {"method": "window", "budget": 24})
    lengths = [len(p.trace.prompt_token_ids) + p.answer_prefix_end for p in problems]
    assert full["max_peak_kv"] >= max(lengths) - 1  # the whole replayed trace was cached
    assert window["max_peak_kv"] <= max(len(p.trace.prompt_token_ids) for p in problems) + 24
    for result in (full, window):
        assert 0.0 <= result["accuracy"] <= 1.0 and len(result["answers"]) == 2
        assert result["correct"] == [is_correct(p, a) for p, a in zip(problems, result["answers"])]


def test_proxy_cli_bad_input(tmp_path):
    from conftest import run_cli

    result = run_cli("dynts", "proxy-traces", "--output", str(tmp_path / "t.jsonl"), "--count", "0")
    assert result.returncode == 2 and "--count" in result.stderr
    result = run_cli("dynts", "proxy-eval", "--methods", "full,dynts", "--count", "2")
    assert result.returncode == 2 and "--predictor" in result.stderr


def test_scoring_applies_to_per_head_methods_only():
    import argparse

    from thinfer.compression import CompressionConfig
    from thinfer.dynts.proxy_eval import method_config, result_name
    from thinfer.eval.runner import compression_for

    args = argparse.Namespace(
        budget=64, window=16, ratio=0.3, trigger="uniform", predictor="h.st", scoring="shared"
    )
    for method in ("h2o", "snapkv", "rkv"):
        assert CompressionConfig.coerce(method_config(args, method, [7])).scoring == "shared"
        assert compression_for(method, args, [7])["scoring"] == "shared"
    for method in ("window", "streamingllm", "sepllm", "dynts"):
        assert "scoring" not in method_config(args, method, [7])
        assert "scoring" not in compression_for(method, args, [7])
    assert result_name("fidelity_nll", args) == "fidelity_nll_uniform_b64_shared"
    args.scoring = "per_head"
    assert "scoring" not in method_config(args, "h2o", [7])
    assert result_name("fidelity_nll", args) == "fidelity_nll_uniform_b64"
