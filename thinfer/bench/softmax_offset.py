"""`thinfer bench softmax-offset`: FlashDecoding++'s unified max phi, chosen from the scores a
real model produces.

The decode kernel subtracts one preset offset phi from every scaled score q.k * scale; a chunk
whose largest score x (log2 units, x = score * log2(e)) falls outside [phi*log2(e) - low,
phi*log2(e) + high] is recomputed with the exact online softmax (`unified_max_window`: +-60
for bf16 and fp32, [-4, +15] for fp16). The results are exact either way; phi decides how
often the cheaper unified path holds. This records, while the model decodes real text with
the torch backend, the largest scaled score of every (layer, query head, chunk of
`DECODE_SPLIT_TOKENS` keys) at every decode step, and reports for each dtype the share of
chunks inside the window as a function of phi, and the phi that keeps the most.
"""

from __future__ import annotations

import argparse
import math
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure

from thinfer.attention import torch_paged
from thinfer.attention.backend import AttentionBackend
from thinfer.attention.metadata import AttentionMetadata
from thinfer.bench.prompts import bench_prompts
from thinfer.bench.report import model_short_name, write_result

# Candidate offsets, in units of the scaled logits.
PHI_GRID = [float(p) for p in range(-8, 41)]
# (low, high) of the window in log2 units, as the kernel's `unified_max_window`.
WINDOWS = {"float16": (4.0, 15.0), "bfloat16/float32": (60.0, 60.0)}


def recording_backend(maxima: list[torch.Tensor], chunk: int) -> AttentionBackend:
    """The torch backend, recording for every decode row the largest scaled score per query
    head and chunk of `chunk` keys (appended to `maxima` as [Hq, chunks] tensors)."""

    def paged_attention(
        q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:  # fmt: skip
        group = q.shape[1] // k_cache.shape[2]
        for i in range(meta.num_decodes):
            length = meta.context_lens_list[i]
            keys = torch_paged.gather_kv(k_cache, meta.block_tables[i], length).float()
            keys = keys.repeat_interleave(group, dim=1)  # [L, Hq, D]
            scores = torch.einsum("hd,lhd->hl", q[i].float(), keys) * scale
            pad = (-length) % chunk
            padded = torch.nn.functional.pad(scores, (0, pad), value=float("-inf"))
            maxima.append(padded.view(scores.shape[0], -1, chunk).amax(-1))
        return torch_paged.paged_attention(q, k_cache, v_cache, meta, scale)

    return AttentionBackend("recording", torch_paged.store_kv, paged_attention)


def in_window_share(maxima: np.ndarray, phi: float, low: float, high: float) -> float:
    """Share of chunk maxima (scaled-logit units) whose log2 value lies in the window."""
    x = maxima * math.log2(math.e)
    centre = phi * math.log2(math.e)
    return float(np.mean((x >= centre - low) & (x <= centre + high)))


def best_phi(shares: list[float]) -> float:
    """The phi of `PHI_GRID` keeping the most chunks; among equals, the one nearest 0."""
    top = max(shares)
    return min((phi for phi, s in zip(PHI_GRID, shares) if s == top), key=abs)


def run_softmax_offset(args: argparse.Namespace) -> dict[str, Any]:
    """Decode real prompts, record the chunk maxima, write JSON + PNG; return the results."""
    from thinfer import LLM, SamplingParams
    from thinfer.kernels.decode_attention import DECODE_SPLIT_TOKENS

    if args.num_prompts < 1 or args.max_tokens < 1:
        raise ValueError("--num-prompts and --max-tokens must be >= 1")
    llm = LLM(
        model=args.model, load_format=args.load_format, dtype="float32", device="cpu",
        attention_backend="torch", num_kv_blocks=512, max_num_seqs=args.num_prompts,
    )  # fmt: skip
    maxima: list[torch.Tensor] = []
    llm.engine.model.set_attention_backend(recording_backend(maxima, DECODE_SPLIT_TOKENS))
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
    llm.generate(bench_prompts(args.num_prompts), params)
    values = torch.cat([m.flatten() for m in maxima]).numpy()
    values = values[np.isfinite(values)]
    shares = {
        dtype: [in_window_share(values, phi, *window) for phi in PHI_GRID]
        for dtype, window in WINDOWS.items()
    }
    best = {dtype: best_phi(share) for dtype, share in shares.items()}
    data: dict[str, Any] = {
        "benchmark": "softmax_offset",
        "model": llm.source,
        "prompts": args.num_prompts,
        "max_tokens": args.max_tokens,
        "chunk_tokens": DECODE_SPLIT_TOKENS,
        "chunk_maxima": len(values),
        "percentiles": {
            str(p): float(np.percentile(values, p)) for p in (0, 1, 5, 50, 95, 99, 100)
        },
        "windows_log2": {dtype: list(window) for dtype, window in WINDOWS.items()},
        "phi_grid": PHI_GRID,
        "in_window_share": shares,
        "best_phi": best,
        "share_at_best": {d: max(s) for d, s in shares.items()},
        "share_at_zero": {d: s[PHI_GRID.index(0.0)] for d, s in shares.items()},
        "notes": {
            "units": "phi and the maxima in scaled-logit units (q.k * scale); windows in log2",
            "exactness": "results are exact for any phi; it decides how often chunks are "
            "recomputed with the exact online softmax",
        },
    }
    name = f"softmax_offset_{model_short_name(llm)}"
    json_path, png_path = write_result(name, data, _plot(data, values), args.output_dir)
    print(f"chunk maxima: {data['percentiles']}")
    for dtype in WINDOWS:
        print(
            f"{dtype}: best phi {best[dtype]:g} keeps {data['share_at_best'][dtype]:.1%} of the "
            f"chunks on the unified path (phi 0: {data['share_at_zero'][dtype]:.1%})"
        )
    print(f"wrote {json_path} and {png_path}")
    return data


def _plot(data: dict[str, Any], values: np.ndarray) -> Figure:
    fig = Figure(figsize=(10, 3.8))
    ax = fig.add_subplot(1, 2, 1)
    ax.hist(values, bins=80, color="#1f77b4")
    ax.set_xlabel("largest scaled score q.k*scale per (layer, head, chunk, step)")
    ax.set_ylabel("count")
    ax = fig.add_subplot(1, 2, 2)
    for dtype, share in data["in_window_share"].items():
        ax.plot(data["phi_grid"], share, label=f"{dtype} (best phi {data['best_phi'][dtype]:g})")
    ax.set_xlabel("phi (scaled-logit units)")
    ax.set_ylabel("share of chunks on the unified path")
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.suptitle(f"Unified max: {data['model'].split('/')[-1]}", fontsize=10)
    return fig


def add_parser(kinds: Any) -> None:
    """Register `thinfer bench softmax-offset`."""
    so = kinds.add_parser(
        "softmax-offset",
        help="choose the unified-max offset phi from a real model's attention scores",
        description="Decodes real prompts with the torch backend, records the largest scaled "
        "score per layer, head and key chunk, and reports per dtype the share of chunks the "
        "unified max keeps for each phi (JSON + PNG).",
    )
    so.add_argument("--model", default=None, help="default: the embedded SmolLM2")
    so.add_argument("--load-format", default="auto")
    so.add_argument("--num-prompts", type=int, default=8)
    so.add_argument("--max-tokens", type=int, default=128, help="decode steps per prompt")
    so.add_argument("--output-dir", default="bench/results")
    so.set_defaults(func=lambda args: 0 if run_softmax_offset(args) else 1)
