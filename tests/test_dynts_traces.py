"""`thinfer dynts traces`: samples are kept only with the think-end marker and a correct
answer after it; real SmolLM2 samples go through the whole path into trace files that the
labelling step reads back."""

from __future__ import annotations

import argparse
import json

import pytest

from thinfer.cli import main
from thinfer.dynts.trace_gen import generate_traces, select_traces
from thinfer.dynts.traces import read_traces, write_traces
from thinfer.eval.dataset import Problem
from thinfer.eval.scoring import Grader, Sample

MARKER_TEXT = " answer is"


def sample_of(tokenizer, text: str, finish: str = "stop") -> Sample:
    ids = tokenizer.encode(text, add_special_tokens=False)
    return Sample(text=text, num_tokens=len(ids), finish_reason=finish, peak_kv=0, token_ids=ids)


def test_select_keeps_only_correct_answers_after_the_marker(llm):
    tok = llm.tokenizer
    marker = tok.encode(MARKER_TEXT, add_special_tokens=False)
    problems = [Problem("p", "What is 3 + 4?", "7"), Problem("q", "What is 2 * 5?", "10")]
    prompts = [[1, 2, 3], [4, 5]]
    samples = [
        [
            sample_of(tok, "3 plus 4 makes 7. So the answer is 7."),  # kept
            sample_of(tok, "It is 7, surely. So the answer is 9."),  # right only while thinking
            sample_of(tok, "3 + 4 = 7", finish="length"),  # no marker
        ],
        [sample_of(tok, "Twice five: the answer is 10")],  # kept
    ]
    traces, counts = select_traces(
        problems, prompts, samples, marker, Grader(r"(-?\d+)"), tok.decode
    )
    assert [t.id for t in traces] == ["p-0", "q-0"]
    assert traces[0].prompt_token_ids == [1, 2, 3]
    assert traces[0].completion_token_ids == samples[0][0].token_ids
    assert [t.answer for t in traces] == ["7", "10"]
    assert (counts.generated, counts.truncated, counts.with_marker, counts.kept) == (4, 1, 3, 2)
    assert counts.per_problem_kept == {"p": 1, "q": 1}
    assert all(t.answer_start(marker) is not None for t in traces)


def test_boxed_answers_are_checked_symbolically(llm):
    tok = llm.tokenizer
    marker = tok.encode("</think>", add_special_tokens=False)
    problem = Problem("h", "Half of one?", "1/2")
    samples = [
        [
            sample_of(tok, "one over two</think>The answer is \\boxed{\\frac{1}{2}}"),
            sample_of(tok, "hmm</think> \\boxed{0.5}"),
            sample_of(tok, "hmm</think> \\boxed{2}"),
        ]
    ]
    # A space after the marker keeps its tokens intact (">\\" would merge into one token).
    traces, counts = select_traces([problem], [[7]], samples, marker, Grader(), tok.decode)
    assert [t.id for t in traces] == ["h-0", "h-1"]
    assert counts.with_marker == 3


def test_generate_traces_with_smollm2(llm, tmp_path):
    args = argparse.Namespace(
        samples=3,
        max_tokens=100,
        temperature=0.6,
        top_p=0.95,
        top_k=20,
        seed=0,
        chat=None,
        think_end=MARKER_TEXT,
        answer_pattern=r"(-?\d+)",
        timeout=2.0,
    )
    traces, counts = generate_traces(llm, [Problem("add", "What is 3 + 4?", "7")], args)
    assert counts.generated == 3
    # SmolLM2 ends most answers with "So, the answer is N." -- some right, some wrong.
    assert 1 <= counts.kept < counts.with_marker
    marker = llm.tokenizer.encode(MARKER_TEXT, add_special_tokens=False)
    for trace in traces:
        start = trace.answer_start(marker)
        assert start is not None
        assert "7" in llm.tokenizer.decode(trace.token_ids[start:])
        assert (
            trace.prompt_token_ids[0]
            == llm.tokenizer.encode(
                llm.tokenizer.apply_chat_template([{"role": "user", "content": "x"}]),
                add_special_tokens=False,
            )[0]
        )
    path = tmp_path / "traces.jsonl"
    write_traces(str(path), traces)
    assert [t.completion_token_ids for t in read_traces(str(path))] == [
        t.completion_token_ids for t in traces
    ]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--samples", "0"], "--samples must be >= 1"),
        (["--answer-pattern", "("], "--answer-pattern is not a valid regex"),
        (["--limit", "0"], "--limit must be >= 1"),
    ],
)
def test_cli_rejects_bad_options(tmp_path, capsys, extra, message):
    dataset = tmp_path / "p.jsonl"
    dataset.write_text(json.dumps({"problem": "1+1?", "answer": "2"}) + "\n")
    code = main(
        ["dynts", "traces", "--dataset", str(dataset), "--output", str(tmp_path / "o"), *extra]
    )
    assert code != 0
    assert message in capsys.readouterr().err


def test_cli_rejects_a_bad_dataset(tmp_path, capsys):
    dataset = tmp_path / "p.jsonl"
    dataset.write_text('{"problem": "no answer"}\n')
    code = main(["dynts", "traces", "--dataset", str(dataset), "--output", str(tmp_path / "o")])
    assert code != 0
    assert "needs an 'answer'" in capsys.readouterr().err
