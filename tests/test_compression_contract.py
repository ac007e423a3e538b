"""The compression contract, for every registered method x schedule x scoring mode: the KV
bound after every step, protected tokens kept, the slot state in step with the cache (each
slot holds the key of the token its state says), mixed batch under preemption == each alone,
no leaked blocks. A toy method registered here runs through the server and `thinfer eval`."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch
from compression_utils import MAX_TOKENS, combos, config_for, write_random_predictor
from conftest import with_engine
from fastapi.testclient import TestClient

from thinfer import SamplingParams
from thinfer.compression import METHODS, CompressionConfig, Method, ScoreContext, register
from thinfer.engine.admission import peak_slots
from thinfer.models.rope import rotate


@pytest.fixture(scope="module")
def predictor_path(tmp_path_factory, llm) -> str:
    return write_random_predictor(tmp_path_factory.mktemp("contract"), llm)


def layer0_keys(llm, token_ids: list[int], positions: torch.Tensor) -> torch.Tensor:
    """Layer-0 keys [n, Hkv, D] of `token_ids` at `positions`, computed densely."""
    model = llm.engine.model
    attention = model.layers[0].self_attn
    with torch.inference_mode():
        x = model.embed_tokens(torch.tensor(token_ids))
        normed = model.ops.rms_norm(x, model.layers[0].input_layernorm)
        qkv = attention.qkv_proj(normed)
        k = qkv[:, attention.q_size : attention.q_size + attention.kv_size]
        k = k.view(len(token_ids), attention.num_kv_heads, attention.head_dim)
        return rotate(k, model.rotary_emb.angles(positions))


def check_state(llm, core, seq) -> None:
    """The slot state is in step with the cache: one entry per slot, each slot holds the
    layer-0 key of the token its state names, protected tokens are all still there."""
    comp = seq.compression
    state = comp.state
    assert state.length == seq.kv_len
    assert len(seq.block_table) == core.kv_cache.blocks_for(seq.kv_len)
    cached = core.kv_cache.layer_keys(seq, 0)  # [n, Hkv, D] in slot order
    positions = state.positions
    tokens = seq.all_token_ids
    if positions.dim() == 1:
        expected = layer0_keys(llm, [tokens[p] for p in positions.tolist()], positions)
        torch.testing.assert_close(cached, expected, atol=1e-4, rtol=1e-4)
    else:  # per head: slot i of head h holds its own token
        for head in range(positions.shape[1]):
            row = positions[0, head]
            expected = layer0_keys(llm, [tokens[p] for p in row.tolist()], row)[:, head]
            torch.testing.assert_close(cached[:, head], expected, atol=1e-4, rtol=1e-4)
    held = set(positions.reshape(-1).tolist())
    if comp.method.protects_prompt:
        assert set(range(len(seq.prompt_token_ids))) <= held
    if comp.answer_from is not None:
        assert set(range(comp.answer_from, seq.num_computed_tokens)) <= held


def test_contract_mixed_batch_with_preemption_equals_each_alone(
    llm, english_prompts, predictor_path
):
    cases = combos()
    configs = [None] + [config_for(*case, predictor_path) for case in cases]
    prompts = [english_prompts[i % 5] for i in range(len(configs))]
    params = [
        SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True, kv_compression=c)
        for c in configs
    ]
    alone = []
    roomy = with_engine(llm, num_kv_blocks=256, block_size=8)
    for prompt, p in zip(prompts, params, strict=True):
        alone.append(roomy.generate(prompt, p, use_tqdm=False)[0].outputs[0].token_ids)

    tight = with_engine(llm, num_kv_blocks=40, block_size=8)  # 320 slots: far from enough
    core = tight.engine
    ids = [core.add_request(prompt, p) for prompt, p in zip(prompts, params, strict=True)]
    bounds = {
        rid: peak_slots(p.kv_compression, len(llm.tokenizer.encode(prompt)), MAX_TOKENS)
        for rid, prompt, p in zip(ids, prompts, params, strict=True)
    }
    results: dict[str, list[int]] = {}
    compressed: set[str] = set()
    steps = 0
    while core.has_unfinished_requests():
        for output in core.step():
            if output.finished:
                results[output.request_id] = output.outputs[0].token_ids
        steps += 1
        for seq in core.scheduler.running:
            assert seq.kv_len + 1 <= bounds[seq.request_id], seq.params.kv_compression
            if seq.kv_len < seq.num_computed_tokens:
                compressed.add(seq.request_id)
            if seq.compression is not None and steps % 8 == 0:
                check_state(llm, core, seq)
    assert [results[rid] for rid in ids] == alone
    assert core.scheduler.num_preemptions > 0  # the pool was too small: sequences swapped
    assert core.kv_cache.num_free_blocks == 40  # no leaked blocks
    assert compressed == set(ids[1:])  # every method did evict


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ({"method": "h2o", "budget": 24, "interval": 8}, "'interval' belongs to snapkv, rkv"),
        ({"method": "window", "budget": 24, "sink_tokens": 2}, "belongs to sepllm, streamingllm"),
        ({"method": "window", "budget": 24, "colour": 1}, "unknown field 'colour'"),
        ({"method": "window", "budget": 24, "scoring": "per_head"}, "scoring must be"),
        ({"method": "snapkv", "budget": 24, "pool_kernel": 101}, "pool_kernel is out of range"),
        ({"method": "h2o", "budget": 24, "scoring": "each"}, "scoring must be"),
    ],
)
def test_fields_of_other_methods_are_named(bad, message):
    with pytest.raises(ValueError, match=message):
        CompressionConfig.coerce(bad)


@dataclass(frozen=True)
class Oldest(Method):
    """A toy method: keeps the oldest tokens (and the recent window)."""

    name = "oldest"
    bias: float = 0.0

    def score(self, ctx: ScoreContext) -> torch.Tensor:
        return self.bias - ctx.positions[..., : ctx.num_old].float()


@pytest.fixture
def toy_method():
    register(Oldest)
    yield Oldest
    del METHODS["oldest"]


def test_a_toy_method_runs_through_the_server_and_eval(llm, tmp_path, toy_method):
    engine = with_engine(llm, num_kv_blocks=128)
    params = SamplingParams(
        max_tokens=30,
        temperature=0.0,
        ignore_eos=True,
        kv_compression={"method": "oldest", "budget": 16, "window": 4, "bias": 1.0},
    )
    direct = engine.generate("The capital of France is", params)[0].outputs[0]
    assert len(direct.token_ids) == 30

    from thinfer.server.app import create_app

    body = {
        "model": "m",
        "prompt": "The capital of France is",
        "max_tokens": 30,
        "temperature": 0.0,
        "ignore_eos": True,
        "kv_compression": {"method": "oldest", "budget": 16, "window": 4, "bias": 1.0},
    }
    with TestClient(create_app(with_engine(llm, num_kv_blocks=128), "m")) as client:
        reply = client.post("/v1/completions", json=body)
        assert reply.status_code == 200, reply.text
        assert reply.json()["choices"][0]["text"] == direct.text
        wrong = {**body, "kv_compression": {"method": "oldest", "budget": 16, "interval": 2}}
        reply = client.post("/v1/completions", json=wrong)
        assert reply.status_code == 400 and "interval" in reply.json()["error"]["message"]

    from thinfer.cli import build_parser
    from thinfer.eval.runner import run_eval

    dataset = tmp_path / "one.jsonl"
    dataset.write_text(json.dumps({"id": "a", "problem": "What is 2 + 3?", "answer": "5"}) + "\n")
    argv = ["eval", "--dataset", str(dataset), "--output-dir", str(tmp_path / "out")]
    argv += ["--methods", "oldest", "--budget", "16", "--max-tokens", "24", "--samples", "1"]
    data = run_eval(build_parser().parse_args(argv), llm=engine)
    assert [row["method"] for row in data["summary"]] == ["oldest"]
    prompt = data["prompt_tokens"]["max"]  # prefilled whole: the peak is max(prompt, B)
    assert data["methods"]["oldest"]["max_peak_kv"] <= max(prompt, 16) < prompt + 23
