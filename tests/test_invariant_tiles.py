"""Tile plans of the batch-invariant matmul (`thinfer.kernels.invariant_tiles`): only tiles
proven to give bitwise-identical outputs are mixed across M, a plan keeps every row's bits
whatever M is, a candidate that is not row-invariant or does not launch is dropped. On the
CPU the kernel runs through Triton's interpreter (conftest sets TRITON_INTERPRET=1); the
Llama-2-7B test needs CUDA and tunes the real candidates there."""

from __future__ import annotations

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")


@pytest.fixture(scope="module")
def it():
    """The tuner module (skips without Triton)."""
    return pytest.importorskip("thinfer.kernels.invariant_tiles")


@pytest.fixture
def im(it):
    """The kernel module; every plan a test registers is dropped after it."""
    import thinfer.kernels.invariant_matmul as module

    saved = dict(module._PLANS)
    yield module
    module._PLANS.clear()
    module._PLANS.update(saved)


def _weight(n, k, dtype=torch.bfloat16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=gen).to(dtype).to(DEVICE)


def test_plan_keeps_rows_bitwise_across_buckets(it, im):
    w = _weight(48, 80)
    cands = (im.Tiles(16, 32, 32, 4, 2), im.Tiles(64, 64, 64, 4, 3), im.Tiles(32, 16, 64, 4, 2))
    plan = it.tune_tiles(w, candidates=cands, buckets=(1, 16, 64), repeats=1)
    assert im.registered_plan(w) == plan.plan
    assert set(plan.classes) == {t.label() for t in cands} and not plan.dropped
    chosen = {plan.classes[t.label()] for _, t in plan.plan}
    assert len(chosen) == 1  # never two classes in one plan
    assert [top for top, _ in plan.plan][-1] == 64
    x = torch.randn(130, 80, generator=torch.Generator().manual_seed(1)).to(w.dtype).to(DEVICE)
    full = im.invariant_linear(x, w)
    expected = im.invariant_linear_reference(x, w)
    assert (full.float() - expected.float()).abs().max() <= 1e-2 * expected.float().abs().max()
    for m in (1, 2, 15, 16, 17, 64, 65, 129):
        assert torch.equal(im.invariant_linear(x[:m], w), full[:m]), m


def test_choose_never_mixes_classes(it, im):
    a, b, c = im.Tiles(16, 32, 64, 4, 3), im.Tiles(64, 64, 64, 4, 3), im.Tiles(128, 128, 64, 8, 3)
    classes = {a: 0, b: 1, c: 1}
    # a is fastest at M=1 but its class loses overall: the plan must not borrow it.
    seconds = {a: [1.0, 9.0, 9.0], b: [2.0, 2.0, 4.0], c: [3.0, 3.0, 1.0]}
    plan = it._choose(classes, seconds, (1, 64, 4096))
    assert plan == ((64, b), (4096, c))
    assert it._choose({a: 0}, {a: [1.0, 1.0, 1.0]}, (1, 64, 4096)) == ((4096, a),)


def test_candidates_that_fail_or_vary_with_m_are_dropped(it, im, monkeypatch):
    w = _weight(48, 80, seed=2)
    good, moody, broken = (
        im.Tiles(64, 64, 64, 4, 3),
        im.Tiles(16, 32, 32, 4, 2),
        im.Tiles(16, 16, 16, 4, 2),
    )
    real = it.invariant_linear

    def fake(x, weight, bias=None, tiles=None):
        if tiles == broken:
            raise RuntimeError("out of resource: shared memory")
        out = real(x, weight, bias, tiles=tiles)
        return out + x.shape[0] * 1e-2 if tiles == moody else out  # depends on M

    monkeypatch.setattr(it, "invariant_linear", fake)
    plan = it.tune_tiles(w, candidates=(moody, broken, good), buckets=(1, 8), repeats=1)
    assert plan.classes == {moody.label(): None, broken.label(): None, good.label(): 0}
    assert "row 0 changed" in plan.dropped[moody.label()]
    assert "shared memory" in plan.dropped[broken.label()]
    assert plan.plan == ((8, good),)


def test_no_candidate_left_falls_back_to_default_tiles(it, im, monkeypatch):
    w = _weight(48, 80, seed=3)

    def failing(*args, **kwargs):
        raise RuntimeError("no launch")

    monkeypatch.setattr(it, "invariant_linear", failing)
    plan = it.tune_tiles(w, candidates=(im.Tiles(16, 32, 32, 4, 2),), buckets=(1,), repeats=1)
    assert plan.plan == ((1, im.invariant_config(48, 80, w.dtype)),)


def test_bad_plans_and_buckets_are_refused(it, im):
    w = _weight(48, 80)
    tiles = im.Tiles(64, 64, 64, 4, 3)
    with pytest.raises(ValueError, match="M buckets in increasing order"):
        im.register_plan(w, ((64, tiles), (16, tiles)))
    with pytest.raises(ValueError, match="M buckets in increasing order"):
        im.register_plan(w, ())
    with pytest.raises(ValueError, match="buckets must be increasing positive"):
        it.tune_tiles(w, candidates=(tiles,), buckets=(16, 1))
    im.register_plan(w, ((16, tiles),))
    assert im.tiles_for(w, 1000) == tiles  # past the last bucket: its tiles
    im.register_plan(w, None)
    assert im.registered_plan(w) is None


@pytest.mark.skipif(not HAS_CUDA, reason="tunes the real candidates at Llama-2-7B shapes")
@pytest.mark.parametrize(("n", "k"), [(4096, 4096), (4096, 11008)])
def test_gpu_tuned_plan_llama_2_7b_rows_invariant(it, im, n, k):
    w = _weight(n, k, seed=n + k)
    plan = it.tune_tiles(w)
    assert plan.plan, plan.dropped
    x = torch.randn(3000, k, generator=torch.Generator().manual_seed(4)).to(w.dtype).to(DEVICE)
    full = im.invariant_linear(x, w)
    for m in (1, 3, 4, 5, 16, 17, 64, 65, 256, 257, 1024, 1025):
        assert torch.equal(im.invariant_linear(x[:m], w), full[:m]), (m, plan.as_dict()["plan"])


def test_bench_matmul_gpu_kernels_run_the_tuned_plan(it, im, monkeypatch):
    """`thinfer bench matmul`'s CUDA kernels (interpreted here): fixed tiles, the tuned plan
    and the library matmul agree, and the plan is reported."""
    from thinfer.bench.matmul import cuda_kernels

    monkeypatch.setattr(it, "CANDIDATES", (im.Tiles(16, 32, 32, 4, 2), im.Tiles(64, 64, 64, 4, 3)))
    monkeypatch.setattr(it, "BUCKETS", (1, 8))
    w = _weight(48, 80, seed=5)
    kernels, info = cuda_kernels(w)
    assert set(kernels) == {"invariant", "invariant_tuned", "default"}
    assert info["triton_tiles"]["block_m"] == im.BLOCK_M
    assert info["tile_plan"]["buckets"] == [1, 8] and info["tile_plan"]["plan"]
    x = torch.randn(9, 80, generator=torch.Generator().manual_seed(6)).to(w.dtype).to(DEVICE)
    outs = {name: kernel(x).float() for name, kernel in kernels.items()}
    for name in ("invariant", "invariant_tuned"):
        torch.testing.assert_close(outs[name], outs["default"], rtol=2e-2, atol=2e-2)
