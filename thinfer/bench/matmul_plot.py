"""The PNG of `thinfer bench matmul`: one panel per weight shape, TFLOPS against M (log
scale), one line per kernel, kernels whose rows change with M marked in the legend."""

from __future__ import annotations

import math
from typing import Any

from matplotlib.figure import Figure

STYLES = {"invariant": "o-", "invariant_tuned": "D-", "default": "s--", "mkl": "^:"}
LABELS = {
    "cuda": {
        "invariant": "batch-invariant (Triton, fixed tiles)",
        "invariant_tuned": "batch-invariant (Triton, verified tiles by M)",
        "default": "default (cuBLAS)",
    },
    "cpu": {
        "invariant": "batch-invariant (tiled oneDNN)",
        "default": "default (oneDNN packed)",
        "mkl": "F.linear (MKL)",
    },
}


def plot_matmul(data: dict[str, Any]) -> Figure:
    """Per shape: TFLOPS of each kernel against M; '(not invariant)' on kernels whose row 0
    changed with M."""
    shapes = data["shapes"]
    cols = min(4, len(shapes))
    rows = math.ceil(len(shapes) / cols)
    fig = Figure(figsize=(4.0 * cols, 3.4 * rows + 0.4))
    labels = LABELS.get(data["device_type"], {})
    for i, (label, entry) in enumerate(shapes.items()):
        ax = fig.add_subplot(rows, cols, i + 1)
        for name, timing in entry["kernels"].items():
            check = entry["invariance"][name]
            flag = "" if check["row0_invariant"] else " (not invariant)"
            ax.plot(
                data["m"],
                timing["tflops"],
                STYLES.get(name, "x-"),
                markersize=3,
                label=labels.get(name, name) + flag,
            )
        ax.set_xscale("log", base=2)
        ax.set_title(f"{label} [{entry['n']}x{entry['k']}]", fontsize=9)
        ax.set_xlabel("M (tokens)", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        if i % cols == 0:
            ax.set_ylabel("TFLOPS", fontsize=8)
        ax.legend(fontsize=6)
    fig.suptitle(
        f"Batch-invariant matmul vs default: {data['device']}, {data['dtype']}", fontsize=10
    )
    fig.tight_layout()
    return fig
