"""Bad input gets a precise ValueError (CLI: exit 2, one line) and the engine keeps serving."""

from __future__ import annotations

import pytest
from conftest import run_cli, with_engine

from thinfer import LLM, SamplingParams
from thinfer.loading.checkpoint import default_model_path

OK = SamplingParams(max_tokens=4, temperature=0.0)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("temperature", -0.5, "temperature"),
        ("top_p", 0.0, "top_p"),
        ("top_p", 1.5, "top_p"),
        ("top_k", -2, "top_k"),
        ("max_tokens", 0, "max_tokens"),
        ("n", 0, "n"),
        ("min_p", 2.0, "min_p"),
        ("repetition_penalty", 0.0, "repetition_penalty"),
        ("stop", [""], "stop"),
    ],
)
def test_invalid_sampling_params(field, value, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**{field: value})


def test_empty_prompts(llm):
    with pytest.raises(ValueError, match="prompt is empty"):
        llm.generate("", OK)
    with pytest.raises(ValueError, match="prompt is empty"):
        llm.generate([[]], OK)
    with pytest.raises(ValueError, match="no prompts"):
        llm.generate([], OK)


def test_out_of_range_token_id(llm):
    with pytest.raises(ValueError, match="token id 49152"):
        llm.generate([[1, 2, 49152]], OK)


def test_prompt_longer_than_context(llm):
    with pytest.raises(ValueError, match="context is 8192"):
        llm.generate([[5] * 9000], OK)
    with pytest.raises(ValueError, match="exceeds the model's context"):
        llm.generate([[5] * 8000], SamplingParams(max_tokens=500))


def test_max_tokens_that_never_fit_the_kv_pool(llm):
    small = with_engine(llm, num_kv_blocks=4, block_size=16)
    with pytest.raises(ValueError, match="can never fit in the KV cache of 64 tokens"):
        small.generate("Hello there", SamplingParams(max_tokens=100))
    assert small.generate("Hello there", OK)[0].outputs[0].token_ids


def test_engine_keeps_serving_after_a_bad_request(llm, english_prompts):
    engine = with_engine(llm, num_kv_blocks=64)
    before = engine.generate(english_prompts[0], OK)[0].outputs[0].token_ids
    with pytest.raises(ValueError):
        engine.generate([english_prompts[0], ""], OK)  # second prompt bad: nothing queued
    assert not engine.engine.has_unfinished_requests()
    assert engine.engine.kv_cache.num_free_blocks == 64
    core = engine.engine
    good = core.add_request(english_prompts[0], OK)
    with pytest.raises(ValueError):
        core.add_request([10**9], OK)
    finals = {}
    while core.has_unfinished_requests():
        for out in core.step():
            finals[out.request_id] = out
    assert finals[good].outputs[0].token_ids == before


def test_params_count_must_match_prompts(llm):
    with pytest.raises(ValueError, match="2 SamplingParams for 1 prompts"):
        llm.generate(["a"], [OK, OK])


def test_unknown_model_path():
    with pytest.raises(ValueError, match="does not exist"):
        LLM(model="/nonexistent/model.gguf")


def test_truncated_gguf(tmp_path):
    bad = tmp_path / "broken.gguf"
    with open(default_model_path(), "rb") as f:
        bad.write_bytes(f.read(3_000_000))
    with pytest.raises(ValueError, match="broken.gguf"):
        LLM(model=str(bad))


def test_corrupt_safetensors(tmp_path):
    (tmp_path / "config.json").write_text(
        '{"model_type": "llama", "vocab_size": 64, "hidden_size": 16, "intermediate_size": 32,'
        ' "num_hidden_layers": 1, "num_attention_heads": 2}'
    )
    (tmp_path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(ValueError, match="model.safetensors"):
        LLM(model=str(tmp_path))


def test_unknown_dtype_and_engine_sizes():
    with pytest.raises(ValueError, match="dtype"):
        LLM(model="tiny", load_format="dummy", dtype="float8")
    with pytest.raises(ValueError, match="max_num_seqs"):
        LLM(model="tiny", load_format="dummy", max_num_seqs=0)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["generate", "Hi", "--temperature", "-1"], "temperature"),
        (["generate", "Hi", "--top-p", "0"], "top_p"),
        (["generate", "Hi", "--model", "/nonexistent/x.gguf"], "does not exist"),
        (["generate", ""], "prompt is empty"),
    ],
)
def test_cli_bad_input_exits_2_with_one_line(args, message):
    result = run_cli(*args)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], result.stderr


def test_tiny_temperature_is_greedy(llm, english_prompts):
    """Dividing logits by a temperature near 0 would overflow them; vLLM's rule applies."""
    tiny = SamplingParams(temperature=1e-300, max_tokens=8, ignore_eos=True)
    greedy = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    assert tiny.greedy
    out = llm.generate(english_prompts[0], tiny)[0].outputs[0].token_ids
    assert out == llm.generate(english_prompts[0], greedy)[0].outputs[0].token_ids
