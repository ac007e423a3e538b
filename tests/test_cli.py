"""The `thinfer` command line on the real default model, run as a real subprocess."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import run_cli

from thinfer import SamplingParams


def test_generate_prints_the_greedy_completion(llm):
    result = run_cli("generate", "The capital of France is", "--max-tokens", "8")
    assert result.returncode == 0, result.stderr
    expected = (
        llm.generate("The capital of France is", SamplingParams(max_tokens=8, temperature=0.0))[0]
        .outputs[0]
        .text
    )
    assert result.stdout == expected + "\n"


def test_python_dash_m_works():
    result = subprocess.run(
        [sys.executable, "-m", "thinfer", "generate", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0 and "--max-tokens" in result.stdout


def test_file_mode_writes_jsonl(tmp_path, llm):
    prompts = tmp_path / "prompts.jsonl"
    rows = [
        {"id": "a", "prompt": "Once upon a time", "max_tokens": 5},
        {"id": "b", "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 6},
        {
            "id": "c",
            "prompt": [1, 504, 3575],
            "max_tokens": 4,
            "n": 2,
            "temperature": 0.8,
            "seed": 3,
        },
    ]
    prompts.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "out.jsonl"
    result = run_cli("generate", "--file", str(prompts), "--output", str(out))
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["id"], r["index"]) for r in lines] == [("a", 0), ("b", 0), ("c", 0), ("c", 1)]
    assert len(lines[0]["token_ids"]) <= 5 and len(lines[2]["token_ids"]) <= 4
    first = llm.generate("Once upon a time", SamplingParams(max_tokens=5, temperature=0.0))
    assert lines[0]["text"] == first[0].outputs[0].text
    assert all(r["time_to_first_token"] > 0 for r in lines)


def test_file_mode_rejects_malformed_lines(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{not json\n')
    result = run_cli("generate", "--file", str(bad))
    assert result.returncode == 2
    assert "bad.jsonl:2: invalid JSON" in result.stderr
    missing = tmp_path / "missing.jsonl"
    missing.write_text('{"text": "no prompt field"}\n')
    result = run_cli("generate", "--file", str(missing))
    assert result.returncode == 2 and "needs a 'prompt' or 'messages' field" in result.stderr
