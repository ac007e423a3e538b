"""The decode-time linear kernels (flat GEMM, GEMV) against their fp32 torch reference, the
dataflow table (choice, file format, errors), the engine routing its linears through a table,
and `thinfer bench gemm-dataflow`. On CPU the kernels run through Triton's interpreter;
real shapes on the GPU are skipped without CUDA."""

from __future__ import annotations

import json

import pytest
import torch

from thinfer import LLM, SamplingParams
from thinfer.cli import main
from thinfer.kernels import flat_gemm as kernels
from thinfer.kernels.gemm_dataflow import (
    CUBLAS,
    DataflowTable,
    GemmChoice,
    load_table,
    table_from_json,
)
from thinfer.loading.dummy import preset_config

HAS_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="GPU test at real shapes needs CUDA")
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}  # of max |y|


def _operands(m, n, k, dtype, seed=0, bias=True):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen).to(dtype).to(DEVICE)
    w = torch.randn(n, k, generator=gen).to(dtype).to(DEVICE)
    b = torch.randn(n, generator=gen).to(dtype).to(DEVICE) if bias else None
    return x, w, b


def _assert_matches(y, x, w, b):
    expected = kernels.linear_reference(x, w, b).float()
    assert y.shape == expected.shape and y.dtype == x.dtype
    error = (y.float() - expected).abs().max().item()
    assert error <= TOLERANCE[x.dtype] * max(expected.abs().max().item(), 1.0), error


@pytest.mark.parametrize(
    ("m", "n", "k", "split_k", "dtype"),
    [
        (1, 70, 100, 1, torch.float32),  # nothing a multiple of a tile
        (3, 130, 257, 3, torch.float16),  # uneven K splits
        (17, 64, 128, 2, torch.float32),  # two M tiles
        (33, 40, 48, 1, torch.float16),  # three M tiles, N < block_n
    ],
)
def test_flat_gemm_matches_reference(m, n, k, split_k, dtype):
    x, w, b = _operands(m, n, k, dtype, seed=m)
    _assert_matches(kernels.flat_gemm(x, w, b, block_n=32, block_k=64, split_k=split_k), x, w, b)


@pytest.mark.parametrize(("m", "split_k", "bias"), [(1, 1, True), (3, 2, False), (4, 4, True)])
def test_gemv_matches_reference(m, split_k, bias):
    x, w, b = _operands(m, 96, 200, torch.float32, seed=m, bias=bias)
    _assert_matches(kernels.gemv(x, w, b, block_n=16, block_k=64, split_k=split_k), x, w, b)


def test_kernels_reject_bad_operands():
    x, w, _ = _operands(5, 8, 16, torch.float32)
    with pytest.raises(ValueError, match="gemv takes at most 4 rows, got 5"):
        kernels.gemv(x, w)
    with pytest.raises(ValueError, match=r"expected x \[M, K\] and weight \[N, K\]"):
        kernels.flat_gemm(x, w[:, :8])
    with pytest.raises(ValueError, match="x is torch.float32 but weight is torch.float16"):
        kernels.flat_gemm(x, w.half())
    with pytest.raises(ValueError, match="split_k must be >= 1"):
        kernels.flat_gemm(x, w, split_k=0)
    assert kernels.flat_gemm(x[:0], w).shape == (0, 8)


def test_table_chooses_by_shape_and_rows():
    gemv, flat = GemmChoice("gemv", block_n=32), GemmChoice("flat", split_k=2)
    table = DataflowTable("cpu", "float32", {(8, 16): ((1, gemv), (16, flat))})
    assert table.choose(8, 16, 1) == gemv
    assert table.choose(8, 16, 2) == flat and table.choose(8, 16, 16) == flat
    assert table.choose(8, 16, 17) == CUBLAS  # past the last bucket
    assert table.choose(16, 8, 1) == CUBLAS  # shape not measured
    assert table_from_json(json.loads(json.dumps(table.to_json()))) == table


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d.update(format="other"), '"format" must be'),
        (lambda d: d.update(version=2), '"version" 2 is not 1'),
        (lambda d: d.pop("device"), '"device" must be a string'),
        (lambda d: d["shapes"][0].update(n=0), '"n" and "k" must be positive'),
        (lambda d: d["shapes"].append(dict(d["shapes"][0])), "appears twice"),
        (lambda d: d["shapes"][0]["choices"][0].update(impl="magic"), "unknown kernel 'magic'"),
        (lambda d: d["shapes"][0]["choices"][0].update(block_k=48), "power of two >= 16"),
        (lambda d: d["shapes"][0]["choices"][0].update(tiles=3), "unexpected keyword"),
        (lambda d: d["shapes"][0]["choices"].reverse(), '"max_m" must increase'),
    ],
)
def test_malformed_tables_are_refused(tmp_path, edit, message):
    choices = ((1, GemmChoice("gemv")), (8, GemmChoice("flat")))
    data = DataflowTable("cpu", "float32", {(8, 16): choices}).to_json()
    edit(data)
    path = tmp_path / "table.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=message) as info:
        load_table(path, torch.device("cpu"))
    assert str(path) in str(info.value)


def test_unreadable_and_foreign_tables_are_refused(tmp_path):
    with pytest.raises(ValueError, match="cannot read"):
        load_table(tmp_path / "missing.json", torch.device("cpu"))
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="is not JSON"):
        load_table(tmp_path / "bad.json", torch.device("cpu"))
    DataflowTable("NVIDIA H200", "bfloat16", {}).save(tmp_path / "h200.json")
    with pytest.raises(ValueError, match="measured on 'NVIDIA H200', this device is 'cpu'"):
        load_table(tmp_path / "h200.json", torch.device("cpu"))


def _forcing_table(tmp_path) -> str:
    """Every linear of the tiny preset: GEMV at 1 row, flat GEMM up to 64, cuBLAS beyond."""
    cfg = preset_config("tiny")
    from thinfer.bench.gemm_dataflow_bench import linear_shapes

    rows = ((1, GemmChoice("gemv", block_n=16, block_k=32, split_k=2)),
            (64, GemmChoice("flat", block_n=32, block_k=32, split_k=2)))  # fmt: skip
    table = DataflowTable("cpu", "float32", {shape: rows for shape in linear_shapes(cfg).values()})
    path = tmp_path / "table.json"
    table.save(path)
    return str(path)


@pytest.mark.skipif(
    torch.cuda.is_available(),
    reason="CPU engine with Triton kernels: needs the interpreter, which conftest sets only "
    "without CUDA (on a GPU the gemm-dataflow stage of bench gpu-check runs the kernels)",
)
def test_engine_routes_linears_through_the_table(tmp_path, monkeypatch):
    calls = {"gemv": 0, "flat_gemm": 0}
    for name in calls:
        real = getattr(kernels, name)

        def counting(*args, _real=real, _name=name, **kwargs):
            calls[_name] += 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(kernels, name, counting)
    common = dict(model="tiny", load_format="dummy", device="cpu", dtype="float32")
    prompts = [[5, 9, 11, 40, 3], [7, 8]]  # prefill 7 rows, then decodes of 2 and 1 rows
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, logprobs=0)
    plain = LLM(**common, num_kv_blocks=16).generate(prompts, [params, params])
    assert calls == {"gemv": 0, "flat_gemm": 0}
    routed = LLM(**common, num_kv_blocks=16, gemm_dataflow=_forcing_table(tmp_path))
    outs = routed.generate(prompts, [params, SamplingParams(temperature=0.0, max_tokens=3)])
    assert calls["gemv"] > 0 and calls["flat_gemm"] > 0
    for a, b in zip(plain, outs, strict=True):
        n = len(b.outputs[0].token_ids)
        assert a.outputs[0].token_ids[:n] == b.outputs[0].token_ids


def test_table_with_kernels_needs_cuda_or_the_interpreter(tmp_path, monkeypatch):
    from thinfer.attention import triton_paged

    monkeypatch.setattr(triton_paged, "kernels_interpreted", lambda: False)
    with pytest.raises(ValueError, match="picks Triton kernels, which need a CUDA device"):
        LLM(model="tiny", load_format="dummy", device="cpu", gemm_dataflow=_forcing_table(tmp_path))


def test_cli_flag_and_bad_path(tmp_path, capsys):
    argv = ["generate", "--model", "tiny", "--load-format", "dummy", "--device", "cpu"]
    argv += ["--gemm-dataflow", str(tmp_path / "none.json"), "hi"]
    assert main(argv) == 2
    assert "gemm_dataflow: cannot read" in capsys.readouterr().err


@pytest.mark.skipif(
    torch.cuda.is_available(),
    reason="CPU engine with Triton kernels: needs the interpreter, which conftest sets only "
    "without CUDA (on a GPU the gemm-dataflow stage of bench gpu-check runs the kernels)",
)
def test_bench_writes_a_loadable_table(tmp_path):
    argv = ["bench", "gemm-dataflow", "--model", "tiny", "--device", "cpu", "--m", "1,8"]
    argv += ["--quick", "--iters", "1", "--warmup", "0", "--output-dir", str(tmp_path)]
    assert main(argv) == 0
    table = load_table(tmp_path / "gemm_dataflow_cpu.json", torch.device("cpu"))
    assert len(table.shapes) == 5
    assert all([m for m, _ in rows] == [1, 8] for rows in table.shapes.values())
    data = json.loads((tmp_path / "gemm_dataflow_tiny_cpu.json").read_text())
    row = data["shapes"]["o_proj"]["rows"][0]
    assert row["timings"][0]["impl"] == "cublas" and row["best_triton"]["status"] == "ok"
    assert any(t["impl"] == "gemv" for t in row["timings"])  # M = 1 tries the GEMV
    assert (tmp_path / "gemm_dataflow_tiny_cpu.png").read_bytes()[:4] == b"\x89PNG"
    assert main(["bench", "gemm-dataflow", "--m", "0", "--output-dir", str(tmp_path)]) == 2


@needs_cuda
@pytest.mark.parametrize("m", [1, 8, 16])
def test_gpu_kernels_at_llama_2_7b_shapes(m):
    for n, k in ((4096, 4096), (22016, 4096), (4096, 11008)):
        x, w, _ = _operands(m, n, k, torch.bfloat16, seed=m, bias=False)
        _assert_matches(kernels.flat_gemm(x, w, split_k=2), x, w, None)
        if m <= kernels.GEMV_MAX_ROWS:
            _assert_matches(kernels.gemv(x, w, split_k=2), x, w, None)
