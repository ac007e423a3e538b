"""DynTS inference policy: dense reference for the kept set, protected tokens, the budget
bound, and the predictor file."""

from __future__ import annotations

import math

import pytest
import torch
from compression_utils import make_state, select
from conftest import with_engine
from hypothesis import given, settings
from hypothesis import strategies as st

from thinfer import SamplingParams
from thinfer.compression import CompressionConfig
from thinfer.dynts import ImportancePredictor, load_predictor, save_predictor
from thinfer.engine.admission import peak_slots
from thinfer.kernels.cpu_panels import panels_available


@pytest.fixture(scope="module")
def predictor_path(tmp_path_factory, llm) -> str:
    torch.manual_seed(0)
    head = ImportancePredictor(llm.model_config.hidden_size)
    path = tmp_path_factory.mktemp("dynts") / "head.safetensors"
    save_predictor(head, str(path))
    return str(path)


def dense_dynts_keep(scores: list[float], budget: int, window: int, ratio: float) -> list[int]:
    """Straight from the definition: last W, plus the top floor(r(L-W)) older by score."""
    length = len(scores)
    if length < budget:
        return list(range(length))
    old = length - window
    ranked = sorted(range(old), key=lambda i: (-scores[i], i))
    protected = sum(math.isinf(s) for s in scores[:old])
    count = max(math.floor(ratio * old), protected)
    return sorted(ranked[:count]) + list(range(old, length))


@settings(max_examples=60, deadline=None)
@given(st.integers(8, 64), st.integers(0, 7), st.floats(0.0, 0.9), st.data())
def test_kept_set_equals_dense_definition(budget, window, ratio, data):
    length = data.draw(st.integers(1, 2 * budget))
    prompt_len = data.draw(st.integers(1, length))
    # float32 values: the engine keeps scores in float32, so values distinct only in float64
    # (2e-75 vs 0.0) would tie there and the dense reference would break the tie differently
    distinct = st.floats(0.0, 100.0, allow_nan=False, width=32)
    scores = [math.inf] * prompt_len + data.draw(
        st.lists(distinct, min_size=length - prompt_len, max_size=length - prompt_len, unique=True)
    )
    config = CompressionConfig("dynts", budget=budget, window=window, ratio=ratio, predictor="x")
    protected = torch.tensor([math.isinf(x) for x in scores])
    predicted = torch.tensor([0.0 if math.isinf(x) else x for x in scores])
    state = make_state(config, length, values={"predicted": predicted}, protected=protected)
    keep = select(config, length, length - prompt_len, state=state, prompt_len=prompt_len)
    expected = dense_dynts_keep(scores, budget, window, ratio)
    assert (keep is None and expected == list(range(length))) or keep.tolist() == expected
    if keep is not None:  # protected (prompt) slots always survive
        assert set(range(prompt_len)) <= set(keep.tolist())


def test_large_budget_changes_nothing(llm, english_prompts, predictor_path):
    full = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    dynts = SamplingParams(
        max_tokens=24,
        temperature=0.0,
        ignore_eos=True,
        kv_compression={"method": "dynts", "budget": 400, "predictor": predictor_path},
    )
    ours = [o.outputs[0].token_ids for o in llm.generate(english_prompts[:3], dynts)]
    assert ours == [o.outputs[0].token_ids for o in llm.generate(english_prompts[:3], full)]


def test_saw_tooth_within_budget_and_answer_protected(llm, english_prompts, predictor_path):
    engine = with_engine(llm, num_kv_blocks=128, block_size=8).engine
    budget, window = 40, 8
    prompt = llm.tokenizer.encode(english_prompts[0])
    marker = (30, 31)  # pretend these two tokens close the thinking phase
    params = SamplingParams(
        max_tokens=120,
        temperature=0.0,
        ignore_eos=True,
        kv_compression={
            "method": "dynts",
            "budget": budget,
            "window": window,
            "ratio": 0.3,
            "predictor": predictor_path,
            "think_end_token_ids": marker,
        },
    )
    engine.add_request(prompt, params)
    lengths = []
    while engine.has_unfinished_requests():
        engine.step()
        for seq in engine.scheduler.running:
            lengths.append(seq.kv_len + 1)  # slots in use once the pending token is written
            assert seq.kv_len + 1 <= budget
            # the prompt is protected: its slots are never evicted, so never moved
            positions = seq.compression.state.positions[: len(prompt)]
            assert positions.tolist() == list(range(len(prompt)))
    assert max(lengths) == budget and min(lengths[len(prompt) :]) < budget * 0.6  # saw-tooth
    assert engine.kv_cache.num_free_blocks == 128


def test_marker_makes_answer_tokens_permanent(llm, predictor_path):
    config = {"method": "dynts", "budget": 100, "predictor": predictor_path}
    params = SamplingParams(
        max_tokens=6,
        temperature=0.0,
        ignore_eos=True,
        forced_tokens=[5, 7, 8, 9],
        kv_compression={**config, "think_end_token_ids": [7, 8]},
    )
    core = with_engine(llm).engine
    core.add_request([1, 2], params)
    core.step()
    seq = core.scheduler.running[0]
    while seq.num_computed_tokens < 6:
        core.step()
    protected = seq.compression.state.protected[:6].tolist()
    assert protected == [True, True, False, True, True, True]  # prompt, thinking, answer
    core.abort_request(seq.request_id)


def test_bad_predictor_files(tmp_path, llm, english_prompts):
    with pytest.raises(ValueError, match="needs the path"):
        CompressionConfig("dynts", budget=10)
    missing = SamplingParams(
        kv_compression={
            "method": "dynts",
            "budget": 8,
            "predictor": str(tmp_path / "none.safetensors"),
        }
    )
    with pytest.raises(ValueError, match="does not exist"):
        with_engine(llm).generate(english_prompts[0], missing)
    wrong = tmp_path / "small.safetensors"
    save_predictor(ImportancePredictor(32), str(wrong))
    params = SamplingParams(
        kv_compression={"method": "dynts", "budget": 8, "predictor": str(wrong)}
    )
    with pytest.raises(ValueError, match="hidden size 32"):
        with_engine(llm).generate(english_prompts[0], params)
    core = with_engine(llm).engine
    core.add_request(english_prompts[1], SamplingParams(max_tokens=3))
    with pytest.raises(ValueError, match="kv_compression.predictor"):
        core.add_request(english_prompts[0], params)  # refused at admission, not in a step
    assert len([o for _ in range(5) for o in core.step() if o.finished]) == 1


def test_peak_slots_cover_what_can_never_be_evicted():
    config = dict(method="dynts", budget=64, window=16, predictor="head.safetensors")
    thinking_only = CompressionConfig(**config)
    assert peak_slots(thinking_only, prompt_len=20, max_tokens=1000) == 64
    assert peak_slots(thinking_only, prompt_len=60, max_tokens=1000) == 60 + 16 + 1
    with_marker = CompressionConfig(**config, think_end_token_ids=(7,))
    assert peak_slots(with_marker, prompt_len=20, max_tokens=1000) == 1020  # answer unbounded


def test_loaded_head_on_panels_matches_the_trained_module(tmp_path):
    """`load_predictor` packs the head into fp32 panels where they run; scores equal the
    `F.linear` module's up to summation order, for one row and a batch."""
    torch.manual_seed(3)
    head = ImportancePredictor(96)
    path = str(tmp_path / "head.safetensors")
    save_predictor(head, path)
    loaded = load_predictor(path, torch.float32, "cpu")
    assert (loaded._panels is not None) == panels_available()
    for rows in (1, 5, 37):
        hidden = torch.randn(rows, 96)
        torch.testing.assert_close(loaded(hidden), head(hidden), rtol=1e-5, atol=1e-6)
