"""Tensor parallelism on CPU: 2 gloo ranks (spawned processes) against the single process.

The default model has 3 KV heads, so its two ranks hold 1 and 2 of them (an uneven split);
a tiny HF checkpoint with 2 KV heads runs on 4 ranks, where each KV head is replicated.
"""

from __future__ import annotations

import os
import signal
import time

import pytest
import torch
from compression_utils import BUDGET, MAX_TOKENS, combos, config_for, write_random_predictor
from conftest import with_engine
from default_model import require_default_model

from thinfer import LLM, SamplingParams
from thinfer.compression import CompressionConfig
from thinfer.loading import load_checkpoint
from thinfer.models.shards import plan_shards, shard_tensor

BLOCKS = 16  # 256 slots: the four long requests below must preempt


@pytest.fixture(scope="module")
def tp_llm():
    require_default_model()
    with LLM(dtype="float32", device="cpu", num_kv_blocks=BLOCKS, tensor_parallel_size=2) as llm:
        yield llm


@pytest.fixture(scope="module")
def reference(llm):
    return with_engine(llm, num_kv_blocks=BLOCKS)


def greedy(max_tokens: int, **extra: object) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, **extra)


def test_shard_plans_cover_the_model_once():
    """Uneven KV groups, replicated KV heads, and the splits that cannot be made."""
    require_default_model()
    checkpoint = load_checkpoint(None)
    cfg = checkpoint.config
    two = plan_shards(cfg, 2)
    assert [p.kv_heads for p in two] == [(0, 1), (1, 3)]
    assert [p.heads for p in two] == [(0, 3), (3, 9)]
    assert [p.ffn for p in two] == [(0, 768), (768, 1536)]
    six = plan_shards(cfg, 6)  # each of the 3 KV heads on 2 ranks, its 3 query heads split
    assert [p.kv_heads for p in six] == [(0, 1), (0, 1), (1, 2), (1, 2), (2, 3), (2, 3)]
    assert [p.heads for p in six] == [(0, 1), (1, 3), (3, 4), (4, 6), (6, 7), (7, 9)]
    assert all(p.kv_replicas == 2 for p in six)
    for bad, why in [(4, "not a multiple"), (12, "only 3 query heads"), (0, "positive")]:
        with pytest.raises(ValueError, match=why):
            plan_shards(cfg, bad)
    full = dict(checkpoint.tensors())
    for name in (
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.0.self_attn.o_proj.weight",
        "model.layers.0.mlp.down_proj.weight",
        "model.layers.0.self_attn.k_proj.weight",
    ):
        dim = 1 if "o_proj" in name or "down_proj" in name else 0
        parts = [shard_tensor(name, full[name], p, cfg.head_dim) for p in two]
        assert torch.equal(torch.cat(parts, dim=dim), full[name]), name
    embed = [
        shard_tensor("model.embed_tokens.weight", full["model.embed_tokens.weight"], p, 64)
        for p in plan_shards(cfg, 9)
    ]  # 49152 rows = 8 x 5462 + 5456: the last padded
    assert all(e.shape[0] == 5462 for e in embed)
    assert torch.equal(torch.cat(embed)[: cfg.vocab_size], full["model.embed_tokens.weight"])
    assert not embed[-1][5456:].any()


def test_two_ranks_give_the_single_process_tokens_and_logprobs(tp_llm, reference, english_prompts):
    params = greedy(24, logprobs=2)
    expected = reference.generate(english_prompts[:6], params)
    got = tp_llm.generate(english_prompts[:6], params)
    for want, have in zip(expected, got, strict=True):
        a, b = want.outputs[0], have.outputs[0]
        assert a.token_ids == b.token_ids
        assert a.text == b.text
        for la, lb, token in zip(a.logprobs, b.logprobs, a.token_ids, strict=True):
            assert abs(la[token] - lb[token]) < 1e-4


def test_each_rank_holds_its_share_of_weights_and_kv_cache(tp_llm, reference):
    """Weights: the ranks' shards add up to the model (plus the replicated norms); the larger
    rank holds 53% of it (2 of the 3 KV groups' attention, half the MLP and vocabulary). KV
    cache: 1/3 and 2/3 of the single process's, the same blocks split by KV head."""
    whole = reference.engine.memory_bytes()
    ranks = tp_llm.engine.rank_memory_bytes()
    weights = [rank["weights"] for rank in ranks]
    norms = (2 * 30 + 1) * 576 * 4  # fp32 RMSNorm weights, on every rank
    assert sum(weights) == whole["weights"] + norms
    assert max(weights) < 0.54 * whole["weights"]
    kv = [rank["kv_cache"] for rank in ranks]
    assert kv[0] * 3 == whole["kv_cache"] and kv[1] * 3 == 2 * whole["kv_cache"]


def _run_for(llm: LLM, prompts: list[str], configs: list, steps: int) -> dict:
    """Add one request per config, step `steps` times; tokens and kept positions per id."""
    engine = llm.engine
    ids = []
    for i, (prompt, config) in enumerate(zip(prompts, configs, strict=True)):
        params = greedy(MAX_TOKENS + 20, kv_compression=config)
        ids.append(engine.add_request(prompt, params, f"c{i}"))
    tokens: dict[str, list[int]] = {i: [] for i in ids}
    for _ in range(steps):
        for out in engine.step():
            tokens[out.request_id] += out.outputs[0].delta_token_ids
    kept = {i: engine.kept_positions(i)[0] for i in ids}
    for request_id in ids:
        engine.abort_request(request_id)
    assert engine.kv_cache.num_used_blocks == 0
    return {i: (tokens[i], kept[i]) for i in ids}


def test_every_compression_method_keeps_the_single_process_slots(
    tp_llm, reference, english_prompts, tmp_path
):
    """Each method and scoring mode under its native trigger: after MAX_TOKENS steps the
    same tokens, and the same token in every KV slot (per head: both ranks' heads)."""
    predictor = write_random_predictor(tmp_path, reference)
    cases = [c for c in combos() if c[1] == "native"]
    configs = [CompressionConfig.coerce(config_for(*c, predictor)) for c in cases]
    prompts = [english_prompts[i % 4] for i in range(len(cases))]
    expected = _run_for(reference, prompts, configs, 1 + MAX_TOKENS)
    got = _run_for(tp_llm, prompts, configs, 1 + MAX_TOKENS)
    for case, request_id in zip(cases, expected, strict=True):
        (want_tokens, want_kept), (tokens, kept) = expected[request_id], got[request_id]
        assert tokens == want_tokens, case
        assert want_kept.shape[-1] <= BUDGET + 8, case  # it did evict
        assert torch.equal(kept.cpu(), want_kept.cpu()), case


def test_preemption_and_abort_match_the_single_process(tp_llm, reference, english_prompts):
    """Four long requests overflow the 16-block pool (sequences are swapped out and back);
    one more is aborted mid-way: the others' outputs equal the single process's."""
    prompts = english_prompts[:4]
    params = greedy(64)
    before = tp_llm.engine.num_preemptions
    expected = reference.generate(prompts, params)
    got = tp_llm.generate(prompts, params)
    assert tp_llm.engine.num_preemptions > before
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in expected]
    engine = tp_llm.engine
    engine.add_request(english_prompts[0], greedy(24), "kept")
    engine.add_request(english_prompts[1], greedy(24), "dropped")
    finals = {}
    for step in range(40):
        if step == 5:
            final = engine.abort_request("dropped")
            assert final is not None and final.outputs[0].finish_reason == "abort"
        for out in engine.step():
            if out.finished:
                finals[out.request_id] = out
        if "kept" in finals:
            break
    assert set(finals) == {"kept"}
    alone = reference.generate(english_prompts[0], greedy(24))[0].outputs[0].token_ids
    assert finals["kept"].outputs[0].token_ids == alone
    assert engine.kv_cache.num_used_blocks == 0


def test_bad_tensor_parallel_settings_fail_before_any_rank_starts(llm, tmp_path):
    """Impossible splits and settings fail before spawning; a checkpoint that fails to load
    raises the loader's own error, with every rank stopped."""
    transformers = pytest.importorskip("transformers")
    import safetensors.torch

    shape = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1)
    config = transformers.LlamaConfig(**shape, num_attention_heads=2, num_key_value_heads=2)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    weights = safetensors.torch.load_file(tmp_path / "model.safetensors")
    del weights["model.layers.0.mlp.down_proj.weight"]
    safetensors.torch.save_file(weights, tmp_path / "model.safetensors", {"format": "pt"})
    with pytest.raises(ValueError, match="missing 1 tensor"):
        LLM(str(tmp_path), device="cpu", tensor_parallel_size=2)
    require_default_model()
    with pytest.raises(ValueError, match="not a multiple"):
        LLM(device="cpu", tensor_parallel_size=4)
    with pytest.raises(ValueError, match="positive integer"):
        LLM(device="cpu", tensor_parallel_size=0)
    with pytest.raises(ValueError, match="loaded model"):
        LLM(llm.loaded, tensor_parallel_size=2)
    with pytest.raises(ValueError, match="deterministic"):
        LLM(device="cpu", tensor_parallel_size=2, deterministic=True)


def test_replicated_kv_heads_on_four_ranks_match_transformers_shapes(tmp_path):
    """A tiny Qwen2 checkpoint (q/k/v biases; 4 query heads, 2 KV heads) on 4 ranks: each
    KV head lives on 2 ranks with one query head each. Greedy tokens equal the single
    process's, a shared method runs, and a per-head one is refused with the reason."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    hf_config = transformers.Qwen2Config(
        vocab_size=250,  # not a multiple of 4: the last vocabulary shard is padded
        hidden_size=64,
        intermediate_size=130,  # uneven MLP shards
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        initializer_range=0.3,
        tie_word_embeddings=False,
    )
    hf = transformers.AutoModelForCausalLM.from_config(hf_config)
    for layer in hf.model.layers:
        for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
            torch.nn.init.normal_(proj.bias, std=0.5)
    hf.save_pretrained(tmp_path)
    prompts = [[3, 17, 99, 4], [200, 5, 6, 7, 8, 9, 10, 11], [42]]
    shared_h2o = {"method": "h2o", "budget": 8, "scoring": "shared"}
    runs = [greedy(12), greedy(20, kv_compression=shared_h2o)]
    single = LLM(str(tmp_path), dtype="float32", device="cpu", num_kv_blocks=32)
    expected = [o.outputs[0].token_ids for p in runs for o in single.generate(prompts, p)]
    with LLM(
        str(tmp_path), dtype="float32", device="cpu", num_kv_blocks=32, tensor_parallel_size=4
    ) as four:
        got = [o.outputs[0].token_ids for p in runs for o in four.generate(prompts, p)]
        with pytest.raises(ValueError, match="replicated"):
            four.generate(prompts[0], greedy(4, kv_compression=SNAPKV))
        assert four.generate(prompts[0], greedy(4))[0].outputs[0].token_ids == expected[0][:4]
    assert got == expected


SNAPKV = {"method": "snapkv", "budget": 16, "observation_window": 4}


def _children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(child) for child in f.read().split()]


def test_a_dead_rank_fails_the_server_loudly():
    """`thinfer serve --tensor-parallel-size 2`, then rank 1 is killed: /health answers
    503 naming the rank, requests fail at once, and the log says why."""
    import httpx
    from server_utils import ServerProcess

    require_default_model()
    server = ServerProcess("--tensor-parallel-size", "2", "--num-kv-blocks", "64")
    try:
        body = {"prompt": "The capital of France is", "max_tokens": 4, "temperature": 0}
        ok = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60)
        assert ok.status_code == 200
        workers = [
            child
            for child in _children(server.proc.pid)
            if "spawn_main" in open(f"/proc/{child}/cmdline").read()
        ]
        assert len(workers) == 1
        os.kill(workers[0], signal.SIGKILL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            health = httpx.get(f"{server.url}/health", timeout=10)
            if health.status_code == 503:
                break
            time.sleep(0.2)
        assert health.status_code == 503 and health.json()["status"] == "failed"
        assert "rank 1" in health.json()["error"]
        failed = httpx.post(f"{server.url}/v1/completions", json=body, timeout=30)
        assert failed.status_code >= 500
        assert "rank 1" in server.output()
    finally:
        server.stop()


def test_two_node_torchrun_command_matches_the_single_process(llm):
    """The two-node launch of docs/distributed.md, both "nodes" on loopback: torchrun with
    --nnodes 2 and one process each runs the same `thinfer generate`; rank 0 prints what
    the single process generates, rank 1 serves it and exits 0."""
    import subprocess
    import sys

    from server_utils import free_port

    require_default_model()
    prompt = "The capital of France is"
    port = str(free_port())

    def node(rank: int) -> subprocess.Popen:
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2"]
        torchrun += ["--nproc-per-node", "1", "--node-rank", str(rank)]
        torchrun += ["--master-addr", "127.0.0.1", "--master-port", port]
        thinfer = ["-m", "thinfer", "generate", prompt, "--max-tokens", "12"]
        thinfer += ["--temperature", "0", "--tensor-parallel-size", "2", "--device", "cpu"]
        return subprocess.Popen(torchrun + thinfer, stdout=subprocess.PIPE, text=True)

    nodes = [node(1), node(0)]
    outputs = [n.communicate(timeout=300)[0] for n in nodes]
    assert [n.returncode for n in nodes] == [0, 0]
    expected = llm.generate(prompt, SamplingParams(max_tokens=12, temperature=0.0))
    assert outputs[1].strip() == expected[0].outputs[0].text.strip()
    assert outputs[0].strip() == ""


def test_a_worker_whose_scheduler_diverged_fails_before_the_forward_pass():
    """Divergent schedules cannot be produced by real ranks (they replay one command
    stream), so the driver's broadcast is stood in for by a stub returning another batch."""
    from types import SimpleNamespace

    from thinfer.distributed.rank_exchange import RankExchange
    from thinfer.engine.scheduler import ScheduledSequence

    driver_batch = [(0, 5), (1, 1)]
    groups = SimpleNamespace(rank=1, world_size=2, broadcast_object=lambda obj=None: driver_batch)
    exchange = RankExchange(groups, torch.device("cpu"))  # type: ignore[arg-type]
    seq = SimpleNamespace(seq_id=0, num_computed_tokens=0, num_tokens=5)
    with pytest.raises(RuntimeError, match="rank 1 scheduled"):
        exchange.check_batch([ScheduledSequence(seq, 5)])  # type: ignore[arg-type]
