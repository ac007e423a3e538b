"""`thinfer eval`: datasets, scoring (pass@k) and an end-to-end run on the real model."""

from __future__ import annotations

import json
import math

import pytest
from conftest import run_cli

from thinfer.cli import build_parser
from thinfer.eval.dataset import Problem, load_problems
from thinfer.eval.runner import run_eval
from thinfer.eval.scoring import Grader, Sample, pass_at_k, score_method

PROBLEMS = [
    {"id": "add", "problem": "What is 2 + 3?", "answer": "5"},
    {"id": "sub", "question": "What is 10 - 4?", "solution": "10 - 4 = \\boxed{6}"},
    {"id": "mul", "prompt": "What is 3 * 3?", "answer": 9},
]


def _write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def _args(dataset, tmp_path, *extra):
    argv = ["eval", "--dataset", str(dataset), "--output-dir", str(tmp_path / "out"), *extra]
    return build_parser().parse_args(argv)


@pytest.mark.parametrize(
    ("n", "c", "k", "expected"),
    [
        (5, 0, 1, 0.0),
        (5, 5, 1, 1.0),
        (5, 2, 1, 0.4),
        (5, 2, 2, 1 - 3 / 10),  # 1 - C(3,2)/C(5,2)
        (10, 3, 5, 1 - 21 / 252),  # 1 - C(7,5)/C(10,5)
        (2, 1, 2, 1.0),
        (2, 0, 2, 0.0),
        (4, 1, 4, 1.0),
    ],
)
def test_pass_at_k(n, c, k, expected):
    assert math.isclose(pass_at_k(n, c, k), expected)
    assert math.isclose(pass_at_k(n, c, k), 1 - math.comb(n - c, k) / math.comb(n, k))


def test_pass_at_k_rejects_bad_counts():
    with pytest.raises(ValueError):
        pass_at_k(2, 3, 1)
    with pytest.raises(ValueError):
        pass_at_k(2, 1, 3)


def test_score_method_on_stub_outputs():
    problems = [
        Problem("a", "1/2 of 1?", "0.5"),
        Problem("b", "7?", "7"),
        Problem("c", "Prime?", "C", [("A", "4"), ("B", "6"), ("C", "7")]),
    ]
    samples = [
        [Sample(r"\boxed{\frac{1}{2}}", 10, "stop", 30), Sample(r"\boxed{1/2}", 20, "stop", 40)],
        [Sample(r"\boxed{8}", 5, "stop", 25), Sample("no box", 7, "length", 27)],
        [Sample(r"\boxed{(C)}", 3, "stop", 13), Sample(r"\boxed{A}", 9, "stop", 19)],
    ]
    result = score_method(problems, samples, [20, 20, 10], Grader(), keep_text=True)
    assert math.isclose(result["pass_at_1"], (1.0 + 0.0 + 0.5) / 3)
    assert math.isclose(result["pass_at_k"], (1.0 + 0.0 + 1.0) / 3)
    assert math.isclose(result["mean_generated_tokens"], 54 / 6)
    assert math.isclose(result["mean_peak_kv"], 154 / 6)
    assert result["max_peak_kv"] == 40
    assert result["finish_reasons"] == {"stop": 5, "length": 1}
    second = result["problems"][1]
    assert second["num_correct"] == 0 and second["samples"][1]["answer"] is None
    assert result["problems"][2]["samples"][0] == {
        "answer": "(C)",
        "correct": True,
        "generated_tokens": 3,
        "peak_kv": 13,
        "finish_reason": "stop",
        "text": r"\boxed{(C)}",
    }


def test_dataset_formats(tmp_path):
    records = PROBLEMS + [
        {"question": "Which is prime?", "choices": ["4", "6", "7"], "answer": "7"},
        {"question": "Pick", "choices": {"A": "x", "B": "y"}, "answer": "(b)"},
        {"problem": "Boxed ref", "answer": "\\boxed{\\frac{1}{2}}"},
    ]
    problems = load_problems(str(_write(tmp_path / "d.jsonl", records)))
    assert [p.reference for p in problems] == ["5", "6", "9", "C", "B", "\\frac{1}{2}"]
    assert [p.id for p in problems][:4] == ["add", "sub", "mul", "4"]
    prompt = problems[3].prompt_text()
    assert "A. 4\nB. 6\nC. 7" in prompt and "\\boxed{}" in prompt
    assert len(load_problems(str(tmp_path / "d.jsonl"), limit=2)) == 2


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (['{"problem": "a", "answer": "1"}', "{not json"], "d.jsonl:2: invalid JSON"),
        (['{"answer": "1"}'], "d.jsonl:1: needs a non-empty 'problem'"),
        (['{"problem": "a"}'], "d.jsonl:1: needs an 'answer'"),
        (['{"problem": "a", "solution": "no box"}'], "d.jsonl:1: needs an 'answer'"),
        (['{"question": "q", "choices": ["x", "y"], "answer": "D"}'], "choices' letters"),
        (["[1, 2]"], "d.jsonl:1: each line must be a JSON object"),
        (["", "  "], "has no problems"),
    ],
)
def test_dataset_errors(tmp_path, lines, message):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=message):
        load_problems(str(path))


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--methods", "full,magic", "--budget", "32"], "unknown method 'magic'"),
        (["--methods", "full,dynts", "--budget", "32"], "dynts, which needs --predictor"),
        (["--methods", "window", "--budget", "1"], "--budget must be an integer >= 2"),
        (["--methods", "window", "--budget", "32", "--samples", "0"], "--samples must be >= 1"),
        (["--methods", "window", "--budget", "8", "--window", "8"], "window must be in"),
        (["--methods", "full", "--budget", "32", "--answer-pattern", "("], "--answer-pattern"),
    ],
)
def test_bad_arguments_fail_before_generation(llm, tmp_path, extra, message):
    dataset = _write(tmp_path / "tiny.jsonl", PROBLEMS)
    with pytest.raises(ValueError, match=message):
        run_eval(_args(dataset, tmp_path, *extra), llm=llm)
    assert not llm.engine.has_unfinished_requests()


def test_default_methods_include_the_dynts_ones_only_with_a_predictor(tmp_path):
    from thinfer.eval.runner import validate_args

    dataset = _write(tmp_path / "tiny.jsonl", PROBLEMS)
    head = tmp_path / "head.safetensors"
    head.write_bytes(b"")
    without = validate_args(_args(dataset, tmp_path, "--budget", "32"))
    assert without == ["full", "window", "streamingllm", "sepllm", "h2o", "snapkv", "rkv"]
    with_head = validate_args(_args(dataset, tmp_path, "--budget", "32", "--predictor", str(head)))
    assert with_head == [*without, "dynts", "dynts-h2o"]


def test_cli_missing_dataset_exits_2(tmp_path):
    missing = tmp_path / "nope.jsonl"
    result = run_cli("eval", "--dataset", str(missing), "--methods", "full", "--budget", "32")
    assert result.returncode == 2
    assert "nope.jsonl" in result.stderr and "Traceback" not in result.stderr


def test_eval_end_to_end(llm, tmp_path):
    dataset = _write(tmp_path / "tiny.jsonl", PROBLEMS)
    args = _args(
        dataset,
        tmp_path,
        *("--methods", "full,window", "--budget", "32", "--samples", "2"),
        *("--max-tokens", "24", "--temperature", "0.6"),
    )
    data = run_eval(args, llm=llm)
    assert not llm.engine.has_unfinished_requests()
    saved = json.loads((tmp_path / "out" / "eval_tiny_SmolLM2-135M-Instruct.Q4_1.json").read_text())
    assert saved["methods"].keys() == {"full", "window"}
    assert [row["method"] for row in saved["summary"]] == ["full", "window"]
    assert (tmp_path / "out" / "eval_tiny_SmolLM2-135M-Instruct.Q4_1.png").stat().st_size > 0
    assert saved["machine"] and saved["protocol"]["chat"] is True
    assert saved["methods"]["full"]["kv_compression"] is None
    assert saved["methods"]["window"]["kv_compression"]["budget"] == 32
    for name, result in saved["methods"].items():
        assert 0.0 <= result["pass_at_1"] <= result["pass_at_k"] <= 1.0
        assert 0 < result["mean_generated_tokens"] <= 24
        assert len(result["problems"]) == 3
        for problem in result["problems"]:
            assert len(problem["samples"]) == 2
            for sample in problem["samples"]:
                assert 1 <= sample["generated_tokens"] <= 24
                if name == "full":  # every token but the last is fed, none evicted
                    assert sample["peak_kv"] == problem["prompt_tokens"] + (
                        sample["generated_tokens"] - 1
                    )
                else:
                    assert sample["peak_kv"] <= max(problem["prompt_tokens"], 32)
    window = saved["methods"]["window"]
    assert window["max_peak_kv"] <= max(saved["prompt_tokens"]["max"], 32)
    assert saved["methods"]["full"]["max_peak_kv"] > window["max_peak_kv"] or (
        saved["methods"]["full"]["mean_generated_tokens"] <= 1
    )
    # Same seeds under every method: the same prompt lengths and problem order.
    assert data["summary"] == saved["summary"]
