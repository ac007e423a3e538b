"""DynTS+H2O (thinfer's variant): its kept set equals a dense reference of the rank blend,
mix = 1 keeps what DynTS keeps and mix = 0 what H2O keeps under the same rule, and bad values
are named. (The engine runs it in the contract, determinism and tensor-parallel tests, which
cover every registered method.)"""

from __future__ import annotations

import math

import pytest
import torch
from compression_utils import make_state, select

from thinfer.compression import CompressionConfig
from thinfer.compression.config import needs_predictor
from thinfer.compression.methods.dynts_h2o import scaled_ranks

BUDGET, WINDOW, RATIO, LAYERS, HEADS = 32, 6, 0.4, 2, 3


def hybrid(mix: float, scoring: str = "per_head") -> CompressionConfig:
    return CompressionConfig(
        "dynts-h2o", budget=BUDGET, window=WINDOW, ratio=RATIO, predictor="x", mix=mix,
        scoring=scoring,
    )  # fmt: skip


def values(length: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Distinct predicted scores [length] and per-head attention [LAYERS, HEADS, length]."""
    gen = torch.Generator().manual_seed(seed)
    predicted = torch.randperm(length, generator=gen).float()
    attention = torch.stack([torch.randperm(length, generator=gen) for _ in range(LAYERS * HEADS)])
    return predicted, attention.float().view(LAYERS, HEADS, length)


def dense_keep(predicted: list[float], attention: list[float], mix: float) -> list[int]:
    """From the definition: the last W, plus the top floor(r (L - W)) older slots by
    mix * rank(predicted) + (1 - mix) * rank(attention) among the older slots."""
    length = len(predicted)
    old = length - WINDOW

    def ranks(xs: list[float]) -> list[float]:
        return [sum(y < x for y in xs[:old]) / (old - 1) for x in xs[:old]]

    p, a = ranks(predicted), ranks(attention)
    score = [mix * p[i] + (1 - mix) * a[i] for i in range(old)]
    top = sorted(range(old), key=lambda i: (-score[i], i))[: math.floor(RATIO * old)]
    return sorted(top) + list(range(old, length))


@pytest.mark.parametrize("mix", [0.0, 0.3, 1.0])
def test_kept_set_equals_the_dense_rank_blend(mix):
    length = 40
    predicted, attention = values(length, seed=1)
    config = hybrid(mix)
    state = make_state(
        config, length, LAYERS, HEADS, {"predicted": predicted, "attention": attention}
    )
    kept = select(config, length, length - 4, state=state, prompt_len=4)
    for layer in range(LAYERS):
        for head in range(HEADS):
            expected = dense_keep(predicted.tolist(), attention[layer, head].tolist(), mix)
            assert kept[layer, head].tolist() == expected, (layer, head)


def test_the_ends_of_mix_are_dynts_and_h2o():
    length = 45
    predicted, attention = values(length, seed=2)
    both = {"predicted": predicted, "attention": attention}
    rule = dict(budget=BUDGET, window=WINDOW, ratio=RATIO, trigger="uniform")
    dynts = CompressionConfig("dynts", predictor="x", **rule)
    want = select(dynts, length, 10, make_state(dynts, length, values={"predicted": predicted}))
    got = select(hybrid(1.0), length, 10, make_state(hybrid(1.0), length, LAYERS, HEADS, both))
    assert torch.equal(got, want.expand(LAYERS, HEADS, -1))
    h2o = CompressionConfig("h2o", **rule)
    h2o_state = make_state(h2o, length, LAYERS, HEADS, {"attention": attention})
    want = select(h2o, length, 10, h2o_state)
    got = select(hybrid(0.0), length, 10, make_state(hybrid(0.0), length, LAYERS, HEADS, both))
    assert torch.equal(got, want)


def test_shared_scoring_blends_the_head_averaged_attention():
    length = 40
    predicted, attention = values(length, seed=3)
    config = hybrid(0.5, scoring="shared")
    mean = attention.mean(dim=(0, 1))
    state = make_state(config, length, values={"predicted": predicted, "attention": mean})
    kept = select(config, length, length - 4, state=state, prompt_len=4)
    assert kept.tolist() == dense_keep(predicted.tolist(), mean.tolist(), 0.5)


def test_equal_values_share_a_rank():
    ranks = scaled_ranks(torch.tensor([[3.0, 1.0, 3.0, 2.0], [0.0, 0.0, 0.0, 0.0]]))
    expected = torch.tensor([[2 / 3, 0.0, 2 / 3, 1 / 3], [0.0] * 4])
    torch.testing.assert_close(ranks, expected)


@pytest.mark.parametrize("mix", [-0.1, 1.5, float("nan"), "half"])
def test_bad_mix_is_named(mix):
    with pytest.raises(ValueError, match="kv_compression.mix"):
        hybrid(mix)


def test_methods_scored_by_a_head_are_known():
    assert needs_predictor("dynts") and needs_predictor("dynts-h2o")
    assert not any(needs_predictor(m) for m in ("full", "h2o", "snapkv", "window"))
    with pytest.raises(ValueError, match="DynTS needs the path of a predictor head"):
        CompressionConfig("dynts-h2o", budget=BUDGET)
