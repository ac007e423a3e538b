"""`thinfer bench speedup|bandwidth|decode-attention`: the GPU-path benchmark harnesses.

On CPU they run through the real CLI at tiny shapes (random-weight `tiny` preset, a few
tokens); the numbers are meaningless there, but the JSON fields, the ratios between them,
the OOM handling and the PNGs are checked. GPU runs at real shapes are skipped without CUDA.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from default_model import require_default_model

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    # Must precede the kernel imports: @triton.jit picks the interpreter when it decorates.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from thinfer.attention.torch_paged import decode_attention  # noqa: E402
from thinfer.bench import attention_bench, decode_timing, speedup  # noqa: E402
from thinfer.bench.attention_bench import decode_inputs, moved_bytes  # noqa: E402
from thinfer.bench.model_cost import weight_bytes  # noqa: E402
from thinfer.cli import main  # noqa: E402
from thinfer.config import ModelConfig  # noqa: E402
from thinfer.engine import factory as engine_factory  # noqa: E402
from thinfer.loading.dummy import PRESETS, preset_config  # noqa: E402

needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="GPU run at real shapes needs CUDA")
# The CPU path at fp32, also on a GPU machine (the GPU runs at real shapes are separate).
TINY = ["--model", "tiny", "--load-format", "dummy", "--threads", "1", "--device", "cpu"]


@pytest.fixture(autouse=True)
def _restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _result(tmp_path, prefix):
    jsons = sorted(tmp_path.glob(f"{prefix}*.json"))
    assert len(jsons) == 1, jsons
    png = jsons[0].with_suffix(".png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads(jsons[0].read_text())
    assert data["machine"]["torch"] and data["timestamp_utc"]
    assert isinstance(data["command"], list)
    return data


def _check_timing(entry, batch, output_len):
    assert entry.get("status", "ok") == "ok"  # speedup cells have a status, bandwidth not
    assert entry["decode_steps"] == output_len - 1
    assert entry["decode_tokens"] == batch * (output_len - 1)
    assert entry["prefill_seconds"] > 0 and entry["decode_seconds"] > 0
    assert entry["tokens_per_s"] == pytest.approx(entry["decode_tokens"] / entry["decode_seconds"])


def test_speedup_grid_with_oom_cells(tmp_path, monkeypatch):
    # torch.OutOfMemoryError only happens on a GPU: mock it. thinfer's KV cache allocation
    # fails in cell (16, 2), exercising the real recovery (1-block engine, grid goes on);
    # HF's generate fails in cell (32, 2).
    fail = {"kv": False}
    real_kv_cache, real_time_thinfer = engine_factory.KVCache, speedup.time_thinfer
    real_generate = decode_timing.hf_generate_tokens

    def kv_cache(cfg, num_blocks, *args):
        if fail["kv"] and num_blocks > 1:
            raise torch.OutOfMemoryError("CUDA out of memory (mocked KV cache)")
        return real_kv_cache(cfg, num_blocks, *args)

    def time_thinfer(llm, prompts, output_len):
        fail["kv"] = (len(prompts), len(prompts[0])) == (2, 16)
        try:
            return real_time_thinfer(llm, prompts, output_len)
        finally:
            fail["kv"] = False

    def hf_generate(model, prompts, batch_size, max_new_tokens):
        if (len(prompts), len(prompts[0]), max_new_tokens) == (2, 32, 4):
            raise torch.OutOfMemoryError("CUDA out of memory (mocked HF generate)")
        return real_generate(model, prompts, batch_size, max_new_tokens)

    monkeypatch.setattr(engine_factory, "KVCache", kv_cache)  # where engines allocate it
    monkeypatch.setattr(speedup, "time_thinfer", time_thinfer)
    monkeypatch.setattr(decode_timing, "hf_generate_tokens", hf_generate)
    argv = ["bench", "speedup", *TINY, "--input-lens", "16,32", "--batch-sizes", "1,2"]
    assert main([*argv, "--output-len", "4", "--output-dir", str(tmp_path)]) == 0
    data = _result(tmp_path, "speedup")
    assert data["model"] == "tiny" and data["context_extended_from"] is None
    cells = {(c["input_len"], c["batch_size"]): c for c in data["cells"]}
    assert list(cells) == [(16, 1), (16, 2), (32, 1), (32, 2)]
    assert cells[(16, 2)]["thinfer"]["status"] == "oom"
    assert "mocked KV cache" in cells[(16, 2)]["thinfer"]["error"]
    assert cells[(32, 2)]["hf"]["status"] == "oom"
    assert data["table"] == {
        "16": {"1": cells[(16, 1)]["label"], "2": "oom (thinfer)"},
        "32": {"1": cells[(32, 1)]["label"], "2": "oom (hf)"},
    }
    _check_timing(cells[(16, 2)]["hf"], 2, 4)
    _check_timing(cells[(32, 2)]["thinfer"], 2, 4)  # the engine recovered from the OOM
    for key in ((16, 1), (32, 1)):
        cell = cells[key]
        for engine in ("thinfer", "hf"):
            _check_timing(cell[engine], 1, 4)
        ratio = cell["thinfer"]["tokens_per_s"] / cell["hf"]["tokens_per_s"]
        assert cell["speedup"] == pytest.approx(ratio)
        assert cell["label"] == f"{ratio:.2f}x"
    assert data["oom_cells"] == 2
    assert data["min_speedup"] == min(cells[k]["speedup"] for k in ((16, 1), (32, 1)))


def test_speedup_extends_a_dummy_context(tmp_path):
    argv = ["bench", "speedup", *TINY, "--input-lens", "2100", "--batch-sizes", "1"]
    assert main([*argv, "--output-len", "3", "--output-dir", str(tmp_path)]) == 0
    data = _result(tmp_path, "speedup_tiny")
    assert data["context_extended_from"] == PRESETS["tiny"].max_position_embeddings == 2048
    assert data["max_model_len"] == 2103
    (cell,) = data["cells"]
    for engine in ("thinfer", "hf"):
        _check_timing(cell[engine], 1, 3)
    assert cell["speedup"] > 0


@pytest.mark.parametrize("name", ["llama-2-7b", "llama-3.1-8b", "qwen2.5-7b", "tiny"])
def test_extended_config_reads_back(name):
    cfg = preset_config(name)
    assert ModelConfig.from_hf_dict(decode_timing._hf_config_dict(cfg)) == cfg


def test_bandwidth(tmp_path):
    argv = ["bench", "bandwidth", *TINY, "--input-len", "16", "--output-len", "6"]
    assert main([*argv, "--copy-mib", "4", "--repeats", "2", "--output-dir", str(tmp_path)]) == 0
    data = _result(tmp_path, "bandwidth")
    copy = data["copy"]
    assert copy["bytes_copied"] == 4 * 2**20
    assert copy["gb_per_s"] >= copy["median_gb_per_s"] > 0
    cfg = preset_config("tiny")
    kv_per_token = cfg.kv_elements_per_token * 4  # float32 on CPU
    assert data["weight_bytes"] == weight_bytes(cfg, torch.float32)
    assert data["kv_bytes_per_token"] == kv_per_token
    # 5 decode steps attend 17..21 slots: 19 on average.
    assert data["bytes_per_step"] == data["weight_bytes"] + 19 * kv_per_token
    assert data["bound_tokens_per_s"] == pytest.approx(
        copy["gb_per_s"] * 1e9 / data["bytes_per_step"]
    )
    for engine in ("thinfer", "hf"):
        entry = data[engine]
        _check_timing(entry, 1, 6)
        achieved = data["bytes_per_step"] * 5 / entry["decode_seconds"] / 1e9
        assert entry["achieved_gb_per_s"] == pytest.approx(achieved)
        assert entry["mbu"] == pytest.approx(achieved / copy["gb_per_s"])
    ours = data["thinfer"]
    assert ours["fraction_of_bound"] == pytest.approx(ours["mbu"])
    ratio = ours["tokens_per_s"] / data["hf"]["tokens_per_s"]
    assert data["thinfer_over_hf"] == pytest.approx(ratio)


def test_decode_inputs_are_paged_copies_of_the_contiguous_kv():
    x = decode_inputs(2, 40, 4, 2, 16, 16, torch.float32, torch.device("cpu"))
    tables = x["block_tables"]
    assert tables.shape == (2, 3) and tables.dtype == torch.int64
    assert x["k_cache"].shape == (12, 16, 2, 16)  # twice the blocks in use
    used = tables.flatten().tolist()
    assert len(set(used)) == 6 and set(used) <= set(range(12))
    assert used != sorted(used)  # shuffled
    for b in range(2):
        for slot in (0, 17, 39):
            block, offset = tables[b, slot // 16], slot % 16
            assert torch.equal(x["k"][b, :, slot], x["k_cache"][block, offset])
            assert torch.equal(x["v"][b, :, slot], x["v_cache"][block, offset])
    paged = decode_attention(
        x["q"], x["k_cache"], x["v_cache"], tables, x["context_lens"], 40, 0.25
    )
    expected = torch.nn.functional.scaled_dot_product_attention(
        x["q"][:, :, None], x["k"], x["v"], scale=0.25, enable_gqa=True
    )[:, :, 0]
    torch.testing.assert_close(paged, expected)
    assert moved_bytes(2, 40, 4, 2, 16, 4) == 4 * (2 * 2 * 40 * 2 * 16 + 2 * 2 * 4 * 16)


def _decode_attention(tmp_path, *extra):
    argv = ["bench", "decode-attention", "--context-lens", "20,64", "--batch-size", "2"]
    argv += ["--heads", "4", "--kv-heads", "2", "--head-dim", "16", "--iters", "3"]
    argv += ["--device", "cpu"]  # on a GPU machine too: the CPU path at fp32
    assert main([*argv, "--threads", "1", "--output-dir", str(tmp_path), *extra]) == 0
    data = _result(tmp_path, "decode_attention")
    assert [r["context_len"] for r in data["results"]] == [20, 64]
    for r in data["results"]:
        assert r["bytes"] == moved_bytes(2, r["context_len"], 4, 2, 16, 4)
        for side in ("paged", "sdpa"):
            seconds = r[side]["median_seconds"]
            assert r[side]["tb_per_s"] == pytest.approx(r["bytes"] / seconds / 1e12)
        assert r["ratio"] == pytest.approx(r["paged"]["tb_per_s"] / r["sdpa"]["tb_per_s"])
        assert r["matches_sdpa"] and r["max_abs_error"] < 1e-4
    assert data["all_match_sdpa"] and data["min_ratio_from_8192"] is None
    return data


def test_decode_attention_torch_backend(tmp_path):
    data = _decode_attention(tmp_path)
    assert data["backend"] == "torch" and data["dtype"] == "float32"


def test_decode_attention_flags_a_wrong_kernel(tmp_path, monkeypatch, capsys):
    # A "kernel" that ignores the block table (reads blocks in storage order) must not pass.
    def ignores_block_table(backend, device):
        def paged(q, k_cache, v_cache, block_tables, context_lens, max_context_len, scale):
            identity = torch.arange(block_tables.numel()).view_as(block_tables)
            args = (k_cache, v_cache, identity, context_lens, max_context_len, scale)
            return decode_attention(q, *args)

        return paged

    monkeypatch.setattr(attention_bench, "paged_backend", ignores_block_table)
    argv = ["bench", "decode-attention", "--context-lens", "4096", "--heads", "2"]
    argv += ["--kv-heads", "2", "--head-dim", "16", "--iters", "1", "--warmup", "0"]
    argv += ["--device", "cpu"]
    assert main([*argv, "--threads", "1", "--output-dir", str(tmp_path)]) == 0
    data = _result(tmp_path, "decode_attention")
    assert not data["all_match_sdpa"] and not data["results"][0]["matches_sdpa"]
    assert "MISMATCH" in capsys.readouterr().out


@pytest.mark.skipif(HAS_CUDA, reason="the interpreter run is the CPU stand-in for the GPU one")
def test_decode_attention_triton_backend_interpreted(tmp_path):
    pytest.importorskip("thinfer.kernels.decode_attention")
    data = _decode_attention(tmp_path, "--backend", "triton", "--warmup", "1")
    assert data["backend"] == "triton"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["speedup", "--input-lens", ""], "--input-lens: expected positive integers"),
        (["speedup", "--input-lens", "128,0"], "--input-lens: expected positive integers"),
        (["speedup", "--batch-sizes", "1,x"], "--batch-sizes: expected comma-separated"),
        (["speedup", "--output-len", "1"], "--output-len must be >= 2"),
        (["speedup", "--input-lens", "9000"], "exceed the model's context of 8192"),
        (["bandwidth", "--input-len", "0"], "--input-len must be >= 1"),
        (["bandwidth", "--output-len", "1"], "--output-len must be >= 2"),
        (["bandwidth", "--copy-mib", "0"], "--copy-mib must be >= 1"),
        (["bandwidth", "--repeats", "0"], "--repeats must be >= 1"),
        (["decode-attention", "--context-lens", ","], "--context-lens: expected positive"),
        (["decode-attention", "--context-lens", "-8"], "--context-lens: expected positive"),
        (["decode-attention", "--batch-size", "0"], "--batch-size must be >= 1"),
        (["decode-attention", "--heads", "3", "--kv-heads", "2"], "must be a multiple of"),
        (["decode-attention", "--warmup", "-1"], "--warmup must be >= 0"),
    ],
)
def test_bad_arguments(tmp_path, capsys, argv, message):
    if "9000" in argv:
        require_default_model()  # its context is the point: a dummy one would be extended
    assert main(["bench", *argv, "--output-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("thinfer: error: ") and message in err
    assert not list(tmp_path.iterdir())


@needs_cuda
def test_gpu_decode_attention_real_shapes(tmp_path):
    argv = ["bench", "decode-attention", "--context-lens", "1024,8192", "--dtype", "bf16"]
    assert main([*argv, "--iters", "20", "--output-dir", str(tmp_path)]) == 0
    data = _result(tmp_path, "decode_attention_triton_cuda")
    assert data["all_match_sdpa"]
    assert all(r["paged"]["tb_per_s"] > 0.1 for r in data["results"])


@needs_cuda
def test_gpu_bandwidth_llama_2_7b_shape(tmp_path):
    argv = ["bench", "bandwidth", "--model", "llama-2-7b", "--load-format", "dummy"]
    argv += ["--dtype", "bf16", "--output-len", "32", "--peer", "none"]
    assert main([*argv, "--output-dir", str(tmp_path)]) == 0
    data = _result(tmp_path, "bandwidth_llama-2-7b_cuda")
    assert data["copy"]["gb_per_s"] > 500
    assert 0 < data["thinfer"]["mbu"] < 1.2


@needs_cuda
def test_gpu_speedup_small_grid(tmp_path):
    argv = ["bench", "speedup", "--model", "smollm2-135m", "--load-format", "dummy"]
    argv += ["--dtype", "bf16", "--input-lens", "128,1024", "--batch-sizes", "1,4"]
    assert main([*argv, "--output-len", "16", "--output-dir", str(tmp_path)]) == 0
    data = _result(tmp_path, "speedup_smollm2-135m_cuda")
    assert data["oom_cells"] == 0 and data["min_speedup"] > 0
