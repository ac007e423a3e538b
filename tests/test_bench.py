"""End-to-end smoke tests of `thinfer bench` on the default model (tiny sizes)."""

from __future__ import annotations

import json

import pytest
import torch

from thinfer.bench.prompts import bench_prompts
from thinfer.cli import main


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


def test_bench_bad_batch_sizes(tmp_path, capsys):
    argv = ["bench", "throughput", "--batch-sizes", "1,x", "--output-dir", str(tmp_path)]
    assert main(argv) == 2
    assert "--batch-sizes" in capsys.readouterr().err
