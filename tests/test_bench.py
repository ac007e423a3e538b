"""End-to-end smoke tests of `thinfer bench` on the default model (tiny sizes)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import run_cli

from thinfer.bench.prompts import bench_prompts
from thinfer.cli import main
from thinfer.kernels.cpu_native import native_isa


@pytest.fixture(autouse=True)
def _restore_threads():
    # The runs use --threads 1 (robust on a busy machine); give the next tests torch's setting.
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _only(tmp_path, prefix):
    jsons = sorted(tmp_path.glob(f"{prefix}_*.json"))
    assert len(jsons) == 1, jsons
    png = jsons[0].with_suffix(".png")
    assert png.is_file() and png.stat().st_size > 0
    data = json.loads(jsons[0].read_text())
    assert data["machine"]["cpu_count"] >= 1
    assert data["machine"]["torch"]
    kernels = data["machine"]["cpu_native_kernels"]  # the build that ran, or why none
    assert kernels == native_isa() or (native_isa() is None and kernels.startswith("none ("))
    assert data["timestamp_utc"]
    assert isinstance(data["command"], list)
    return data


def test_bench_prompts_deterministic_and_varied():
    prompts = bench_prompts(40)
    assert prompts == bench_prompts(40)
    assert prompts[32] == prompts[0]
    lengths = [len(p.split()) for p in prompts[:32]]
    assert min(lengths) >= 10 and max(lengths) <= 200
    assert max(lengths) > 5 * min(lengths)


def test_bench_throughput(tmp_path):
    argv = [
        "bench",
        "throughput",
        "--num-prompts",
        "2",
        "--max-tokens",
        "4",
        "--batch-sizes",
        "1,2",
        "--threads",
        "1",
        "--output-dir",
        str(tmp_path),
    ]
    assert main(argv) == 0
    data = _only(tmp_path, "throughput")
    assert [run["batch_size"] for run in data["runs"]] == [1, 2]
    for run in data["runs"]:
        for engine in ("thinfer", "hf"):
            assert run[engine]["tokens"] == 2 * 4
            assert run[engine]["tokens_per_s"] > 0
        assert run["ratio"] > 0
        assert 0.0 <= run["token_agreement"] <= 1.0


def test_bench_throughput_llama_cpp_peer(tmp_path, capsys):
    """The llama.cpp peer runs the default GGUF beside thinfer where llama-cpp-python is
    installed (`.[llamacpp]`); elsewhere the command says what to install. A model that is
    not a GGUF file is refused either way."""
    argv = ["bench", "throughput", "--peer", "llama.cpp", "--num-prompts", "2"]
    argv += ["--max-tokens", "4", "--batch-sizes", "1,2", "--threads", "1"]
    argv += ["--output-dir", str(tmp_path)]
    tiny = ["--model", "tiny", "--load-format", "dummy"]
    assert main(argv + tiny) == 2
    assert "--peer llama.cpp needs a GGUF file model" in capsys.readouterr().err
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        assert main(argv) == 2
        assert "needs llama-cpp-python: pip install" in capsys.readouterr().err
        return
    assert main(argv) == 0
    data = _only(tmp_path, "throughput")
    assert data["peer"] == "llama.cpp" and data["peer_batching"].startswith("sequential")
    for run in data["runs"]:
        assert run["llama.cpp"]["tokens"] == run["thinfer"]["tokens"] == 2 * 4
        assert run["ratio"] > 0 and 0.0 <= run["token_agreement"] <= 1.0


def test_bench_throughput_with_int4_reuses_the_quantized_model(tmp_path):
    argv = ["bench", "throughput", "--model", "tiny", "--load-format", "dummy", "--peer", "none"]
    argv += ["--quantization", "int4", "--num-prompts", "2", "--max-tokens", "3"]
    argv += ["--batch-sizes", "1,2", "--threads", "1", "--output-dir", str(tmp_path)]
    assert main(argv) == 0  # one engine per batch size over the one quantized model
    data = _only(tmp_path, "throughput")
    assert [run["thinfer"]["tokens"] for run in data["runs"]] == [6, 6]
    assert data["quantization"] == "int4"


def test_bench_latency(tmp_path):
    argv = [
        "bench",
        "latency",
        "--num-prompts",
        "2",
        "--max-tokens",
        "3",
        "--threads",
        "1",
        "--output-dir",
        str(tmp_path),
    ]
    assert main(argv) == 0
    data = _only(tmp_path, "latency")
    for engine in ("thinfer", "hf"):
        for key in ("ttft", "tpot"):
            stats = data["single"][engine][key]
            assert 0 < stats["p50"] <= stats["p90"] <= stats["p99"]
    assert data["single"]["ratio_thinfer_over_hf_p50"]["ttft"] > 0
    assert data["loaded"]["ttft"]["p50"] > 0
    assert data["loaded"]["max_num_seqs"] == 16
    assert data["loaded"]["tokens"] == 2 * 3


def test_bench_stream(tmp_path):
    # 2040 + 64 tokens exceed the tiny preset's 2048-token context: it is extended.
    argv = ["bench", "stream", "--tokens", "64", "--prompt-len", "2040", "--threads", "1"]
    assert main(argv + ["--output-dir", str(tmp_path)]) == 0
    data = _only(tmp_path, "stream_tiny")
    assert data["model"] == "tiny" and data["context_extended_from"] == 2048
    assert data["tokens"] == 64 and set(data["runs"]) == {"delta", "cumulative"}
    for run in data["runs"].values():
        binned = run["binned"]
        assert len(binned["position"]) == len(binned["median_us"]) == 64  # one step per bin
        assert all(us > 0 for us in binned["median_us"]) and run["total_seconds"] > 0
    assert data["summary"]["cumulative_over_delta_last_tenth"] > 0


def test_bench_compaction(tmp_path, capsys):
    argv = ["bench", "compaction", "--model", "tiny", "--budgets", "16,32", "--min-steps", "4"]
    assert main(argv + ["--output-dir", str(tmp_path)]) == 0
    data = _only(tmp_path, "compaction")
    assert data["config"]["budgets"] == [16, 32]
    assert set(data["results"]) == {"window", "h2o", "dynts"}
    for method, plans in data["results"].items():
        assert set(plans) == {"fill_holes", "in_order"}
        for plan in plans.values():
            for budget, row in plan.items():
                assert row["mean_ms"] > 0 and row["steps"] >= 4, (method, budget)
        assert set(data["in_order_over_fill_holes"][method]) == {"16", "32"}
    assert main(["bench", "compaction", "--budgets", "16,x"]) == 2
    assert "--budgets" in capsys.readouterr().err


def test_bench_matmul(tmp_path, capsys):
    argv = ["bench", "matmul", "--shapes", "48x80", "--max-m", "4", "--repeats", "1"]
    argv += ["--warmup", "0", "--device", "cpu", "--threads", "1"]
    assert main(argv + ["--output-dir", str(tmp_path)]) == 0
    data = _only(tmp_path, "matmul")
    assert data["m"] == [1, 2, 4] and data["dtype"] == "float32"
    entry = data["shapes"]["48x80"]
    assert (
        entry["n"] == 48
        and entry["k"] == 80
        and (16 in entry["tile_rows"] or entry["tile_rows"] == [1])
    )
    assert {"invariant", "default"} <= set(entry["kernels"]) <= {"invariant", "default", "mkl"}
    for timing in entry["kernels"].values():
        assert len(timing["tflops"]) == 3 and all(t > 0 for t in timing["tflops"])
    assert len(entry["ratio_invariant_over_default"]) == 3
    assert entry["invariance"]["invariant"] == {
        "row0_invariant": True,
        "row0_changed_at_m": [],
        "rows_changed_at_m": [],
    }
    assert main(["bench", "matmul", "--shapes", "48xy"]) == 2
    assert "--shapes" in capsys.readouterr().err


def test_bench_determinism(tmp_path):
    argv = ["bench", "determinism", "--batch-sizes", "1,2", "--output-len", "4", "--runs", "3"]
    argv += ["--completion-len", "6", "--max-mates", "2", "--num-kv-blocks", "256"]
    assert main(argv + ["--output-dir", str(tmp_path)]) == 0
    data = _only(tmp_path, "determinism")
    assert set(data["throughput_tokens_per_s"]) == {"1", "2"}
    row = data["throughput_tokens_per_s"]["2"]
    assert row["default"] > 0 and row["ratio"] == pytest.approx(
        row["deterministic"] / row["default"]
    )
    assert data["distinct"]["deterministic"] == {
        "runs": 3,
        "distinct_completions": 1,
        "distinct_logprobs": 1,
    }
    assert data["runs"] == 3


def test_bench_tensor_parallel(tmp_path):
    """Two gloo ranks against one process: per-rank bytes (the 3 KV heads split 1 and 2),
    the tokens/s ratio, and the same greedy tokens."""
    argv = ["bench", "tensor-parallel", "--sizes", "1,2", "--batch", "2", "--max-tokens", "4"]
    argv += ["--num-kv-blocks", "32", "--output-dir", str(tmp_path)]
    assert main(argv) == 0
    data = _only(tmp_path, "tensor_parallel")
    assert set(data["sizes"]) == {"1", "2"}
    one, two = data["sizes"]["1"], data["sizes"]["2"]
    assert len(one["ranks"]) == 1 and len(two["ranks"]) == 2
    single = one["ranks"][0]
    assert sorted(r["kv_cache"] for r in two["ranks"]) == [
        single["kv_cache"] // 3,
        2 * single["kv_cache"] // 3,
    ]
    assert 0.5 < two["weights_max_rank_share"] < 0.6
    assert two["kv_cache_max_rank_share"] == pytest.approx(2 / 3)
    assert two["throughput_ratio"] == pytest.approx(two["tokens_per_s"] / one["tokens_per_s"])
    assert one["tokens_equal"] and two["tokens_equal"]


def test_bench_tensor_parallel_needs_size_one(tmp_path, capsys):
    argv = ["bench", "tensor-parallel", "--sizes", "2", "--output-dir", str(tmp_path)]
    assert main(argv) == 2
    assert "--sizes" in capsys.readouterr().err


def test_bench_prune_latency(tmp_path):
    """dense, depth and width shapes of the tiny preset, both engines at every point."""
    argv = ["bench", "prune-latency", "--preset", "tiny", "--batch-sizes", "1,2"]
    argv += ["--input-lens", "12", "--output-lens", "4", "--device", "cpu", "--threads", "1"]
    assert main(argv + ["--output-dir", str(tmp_path)]) == 0
    data = _only(tmp_path, "prune_latency_cpu")
    assert data["preset"] == "tiny" and data["dtype"] == "float32"
    assert data["complete"] and list(data["variants"]) == ["dense", "depth", "width"]
    dense, depth, width = data["variants"].values()
    assert depth["shape"]["num_hidden_layers"] == 1 and width["shape"]["num_hidden_layers"] == 2
    assert width["parameters"] == pytest.approx(depth["parameters"], rel=0.01)
    assert depth["parameters"] < dense["parameters"]
    for variant in data["variants"].values():
        assert [(p["input_len"], p["output_len"], p["batch_size"]) for p in variant["points"]] == [
            (12, 4, 1),
            (12, 4, 2),
        ]
        for point in variant["points"]:
            for engine in ("thinfer", "hf"):
                row = point[engine]
                assert row["status"] == "ok" and row["latency_s"] > 0
                assert row["throughput_tokens_per_s"] == pytest.approx(
                    point["batch_size"] * 4 / row["latency_s"]
                )
            assert point["ratio"] == pytest.approx(
                point["thinfer"]["throughput_tokens_per_s"] / point["hf"]["throughput_tokens_per_s"]
            )


def test_prune_width_shape_matches_depth_parameters():
    from thinfer.bench.prune_variants import param_count, preset_variants
    from thinfer.loading.dummy import preset_config

    for preset in ("llama-2-7b", "llama-3-8b", "llama-13b", "smollm2-135m"):
        dense = preset_config(preset)
        shapes = preset_variants(dense, None)
        depth, width = shapes["depth"], shapes["width"]
        assert param_count(width) == pytest.approx(param_count(depth), rel=0.01), preset
        assert width.num_hidden_layers == dense.num_hidden_layers
        assert width.head_dim == dense.head_dim and width.hidden_size == dense.hidden_size
        group = dense.num_attention_heads // dense.num_key_value_heads
        assert width.num_attention_heads == group * width.num_key_value_heads  # whole groups
        assert width.num_key_value_heads < dense.num_key_value_heads, preset
    llama = preset_variants(preset_config("llama-2-7b"), None)
    assert llama["depth"].num_hidden_layers == 23  # the paper's 4.9B of LLaMA-7B
    assert 4.8e9 < param_count(llama["depth"]) < 5.0e9
    assert (llama["width"].num_key_value_heads, llama["width"].num_attention_heads) == (23, 23)
    assert preset_variants(preset_config("llama-13b"), None)["depth"].num_hidden_layers == 29


def test_prune_hf_peer_builds_width_variants_with_their_heads():
    """A width variant drops whole heads (Llama-2-7B: 23 of 32 at hidden 4096, which
    transformers' config refuses by itself): the HF peer gets the variant's real shape."""
    from thinfer.bench.prune_variants import hf_from_config, param_count, preset_variants
    from thinfer.loading.dummy import preset_config
    from thinfer.loading.hf_config import hf_config

    llama = hf_config(preset_variants(preset_config("llama-2-7b"), None)["width"])
    assert (llama.hidden_size, llama.num_attention_heads, llama.head_dim) == (4096, 23, 128)
    width = preset_variants(preset_config("tiny"), None)["width"]
    peer = hf_from_config(width, torch.float32, torch.device("cpu"))
    assert sum(p.numel() for p in peer.parameters()) == param_count(width)
    assert peer(torch.tensor([[1, 2, 3]])).logits.shape == (1, 3, width.vocab_size)


def test_prune_param_count_matches_the_model():
    from thinfer.bench.prune_variants import param_count, preset_variants
    from thinfer.loading.dummy import preset_config
    from thinfer.models import build_model

    for cfg in preset_variants(preset_config("tiny"), None).values():
        net = build_model(cfg, torch.float32, torch.device("cpu"))
        assert param_count(cfg) == sum(p.numel() for p in net.parameters())


def test_prune_latency_sweep_stops_at_oom_and_time():
    from thinfer.bench.prune_latency import Grid, sweep

    def timer(batch, out):
        if len(batch) == 4 and out == 2:
            raise RuntimeError("CUDA out of memory. Tried to allocate")
        return 3.0 if (len(batch), out) == (2, 9) else 0.5

    grid = Grid({3: [5, 6, 7]}, [(3, 2), (3, 9)], [1, 2, 4, 8], max_seconds=2.0)
    got = sweep(timer, grid, fits=4, label="fake")
    assert [got[f"3_2_{m}"]["status"] for m in (1, 2, 4, 8)] == ["ok", "ok", "oom", "oom"]
    assert [got[f"3_9_{m}"]["status"] for m in (1, 2, 4, 8)] == [
        "ok",
        "ok",
        "skipped: time",
        "oom",  # no KV cache for 8 (fits=4)
    ]
    assert got["3_9_1"]["throughput_tokens_per_s"] == pytest.approx(9 / 0.5)

    def broken(batch, out):
        raise RuntimeError("shape mismatch")

    with pytest.raises(RuntimeError, match="shape mismatch"):
        sweep(broken, grid, fits=8, label="fake")


def test_prune_latency_bad_arguments(tmp_path, capsys):
    base = ["bench", "prune-latency", "--output-dir", str(tmp_path)]
    assert main([*base, "--models", "dense=", "--remove-blocks", "2"]) == 2
    assert "--remove-blocks" in capsys.readouterr().err
    assert main([*base, "--models", "=x"]) == 2
    assert "NAME=PATH" in capsys.readouterr().err
    assert main([*base, "--preset", "tiny", "--remove-blocks", "2"]) == 2
    assert "--remove-blocks" in capsys.readouterr().err
    assert main([*base, "--preset", "tiny", "--batch-sizes", "1,x"]) == 2
    assert not list(tmp_path.iterdir())


def test_bench_bad_batch_sizes(tmp_path, capsys):
    argv = ["bench", "throughput", "--batch-sizes", "1,x", "--output-dir", str(tmp_path)]
    assert main(argv) == 2
    assert "--batch-sizes" in capsys.readouterr().err


def _decode_curve(tmp_path, *extra):
    argv = ["bench", "decode-curve", "--model", "tiny", "--load-format", "dummy"]
    argv += ["--batch-size", "2", "--steps", "48", "--threads", "1"]
    argv += ["--output-dir", str(tmp_path), *extra]
    assert main(argv) == 0
    data = _only(tmp_path, "decode_curve")
    png = sorted(tmp_path.glob("decode_curve_*.png"))[0]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert data["steps"] == 48 and data["batch_size"] == 2
    for key in ("full", "method"):
        series = data["runs"][key]["per_step"]
        assert set(series) >= {"tokens_per_s", "kv_gb", "mean_kv_len", "max_kv_len", "gflops"}
        assert all(len(values) == 48 for values in series.values())
        assert all(rate > 0 for rate in series["tokens_per_s"])
        assert all(g > a for g, a in zip(series["gflops"], series["attention_gflops"]))
    full = data["runs"]["full"]["per_step"]
    prompt = data["prompt_tokens"]
    assert full["max_kv_len"] == [prompt + step for step in range(1, 49)]
    return data


def _check_bounded(data, budget):
    full = data["runs"]["full"]["per_step"]
    ours = data["runs"]["method"]["per_step"]
    assert ours["kv_gb"][-1] < full["kv_gb"][-1]
    assert ours["gflops"][-1] < full["gflops"][-1]
    assert max(ours["max_kv_len"]) <= budget
    assert data["runs"]["method"]["peak_kv_gb"] < data["runs"]["full"]["peak_kv_gb"]
    last = data["summary"]["checkpoints"][-1]
    assert [p["step"] for p in data["summary"]["checkpoints"]] == [12, 24, 36, 48]
    assert last["ratio"]["kv_gb"] < 1 and last["ratio"]["tokens_per_s_smoothed"] > 0


def test_bench_decode_curve_window(tmp_path):
    data = _decode_curve(tmp_path, "--method", "window", "--budget", "24", "--window", "4")
    assert data["kv_compression"] == {
        "method": "window",
        "budget": 24,
        "window": 4,
        "ratio": 0.3,
        "trigger": "native",
    }
    assert data["predictor"] is None
    _check_bounded(data, 24)
    method = data["runs"]["method"]
    assert all(ms > 0 for ms in method["per_step"]["compression_ms"])  # timed every step
    assert method["compression_ms_mean"] > 0 == data["runs"]["full"]["compression_ms_mean"]
    lens = data["runs"]["method"]["per_step"]["max_kv_len"]
    assert lens[-12:] == [lens[-1]] * 12  # a full window stays the same size


def test_bench_decode_curve_dynts_random_head(tmp_path):
    data = _decode_curve(tmp_path, "--budget", "40", "--window", "8")
    assert data["method"] == "dynts"
    assert data["kv_compression"]["predictor"].startswith("random head (seed 0)")
    _check_bounded(data, 40)
    lens = data["runs"]["method"]["per_step"]["max_kv_len"]
    assert any(b < a for a, b in zip(lens, lens[1:]))  # at least one eviction: a saw-tooth


def test_decode_curve_flops_match_the_model():
    from thinfer import LLM
    from thinfer.bench.model_cost import linear_flops, linear_params_per_layer, weight_bytes

    llm = LLM(model="tiny", load_format="dummy", device="cpu", num_kv_blocks=4)
    cfg = llm.model_config
    model = llm.engine.model
    params = sum(p.numel() for p in model.parameters())
    assert weight_bytes(cfg, torch.float32) == 4 * params
    matrices = [p for p in model.layers.parameters() if p.dim() == 2]
    in_layers = sum(p.numel() for p in matrices)
    assert linear_params_per_layer(cfg) * cfg.num_hidden_layers == in_layers
    assert linear_flops(cfg, 3, 1) == 2 * (3 * in_layers + cfg.vocab_size * cfg.hidden_size)


def test_bench_decode_curve_bad_arguments(tmp_path, capsys):
    result = run_cli("bench", "decode-curve", "--steps", "0", "--output-dir", str(tmp_path))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["thinfer: error: --steps must be >= 1, got 0"]
    base = ["bench", "decode-curve", "--model", "tiny", "--load-format", "dummy"]
    assert main([*base, "--budget", "8", "--output-dir", str(tmp_path)]) == 2
    assert "window" in capsys.readouterr().err  # window 256 >= budget 8: CompressionConfig
    assert main([*base, "--budget", "12", "--window", "2", "--output-dir", str(tmp_path)]) == 2
    assert "must exceed the prompt + window" in capsys.readouterr().err
    argv = [*base, "--method", "window", "--predictor", "x", "--output-dir", str(tmp_path)]
    assert main(argv) == 2
    assert "--predictor" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())
