"""`thinfer bench softmax-offset`: the unified-max offset chosen from SmolLM2's real scores."""

from __future__ import annotations

import json
import math

import numpy as np

from thinfer.bench.softmax_offset import PHI_GRID, best_phi, in_window_share
from thinfer.cli import main
from thinfer.kernels.decode_attention import DEFAULT_SOFTMAX_OFFSET


def test_window_share_and_tie_break():
    maxima = np.array([0.0, 5.0, 10.0, 30.0])
    # fp16 window around phi = 5: log2 units [5*log2e - 4, 5*log2e + 15] ~ [3.2, 22.2]
    assert in_window_share(maxima, 5.0, 4.0, 15.0) == 0.5
    assert in_window_share(maxima, 5.0, 60.0, 60.0) == 1.0
    assert best_phi([1.0] * len(PHI_GRID)) == 0.0  # all equal: the one nearest 0
    shares = [0.0] * len(PHI_GRID)
    shares[PHI_GRID.index(7.0)] = 1.0
    assert best_phi(shares) == 7.0
    assert math.isclose(in_window_share(maxima, 0.0, 0.0, 0.0), 0.25)


def test_bench_records_real_scores(tmp_path):
    argv = ["bench", "softmax-offset", "--num-prompts", "2", "--max-tokens", "4"]
    assert main([*argv, "--output-dir", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("softmax_offset_*.json")
    data = json.loads(path.read_text())
    # 2 prompts x 3 decode steps x 30 layers x 9 heads, one chunk each (short contexts)
    assert data["chunk_maxima"] == 2 * 3 * 30 * 9
    assert data["percentiles"]["0"] <= data["percentiles"]["50"] <= data["percentiles"]["100"]
    assert data["best_phi"]["bfloat16/float32"] == 0.0  # its window holds every chunk
    assert 0.0 < data["share_at_best"]["float16"] <= 1.0
    assert DEFAULT_SOFTMAX_OFFSET in PHI_GRID
    assert path.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
    assert main([*argv[:2], "--num-prompts", "0", "--output-dir", str(tmp_path)]) == 2
