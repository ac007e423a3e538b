"""`thinfer eval quant-cost`: what weight-only quantization costs in quality.

For each of fp32 (the reference), int8 and int4 (`LLM(quantization=...)`) on the same
checkpoint: the held-out perplexity of windows of real text (the last 20% of the embedded
default text; `thinfer.eval.perplexity`, what `thinfer eval ppl` reports), and the greedy
agreement with fp32 on the benchmark prompts (the share of tokens before the first
divergence). One process, one model load per variant.
"""

from __future__ import annotations

import argparse
import math
from typing import Any

from matplotlib.figure import Figure

from thinfer.bench.hf_peer import prefix_agreement
from thinfer.bench.prompts import bench_prompt_token_ids
from thinfer.bench.report import model_short_name, write_result
from thinfer.sampling_params import SamplingParams

VARIANTS = (None, "int8", "int4")


def greedy_tokens(llm: Any, prompts: list[list[int]], steps: int) -> list[list[int]]:
    """Each prompt's `steps` greedy tokens (EOS ignored)."""
    params = SamplingParams(temperature=0.0, max_tokens=steps, ignore_eos=True)
    return [list(o.outputs[0].token_ids) for o in llm.generate(prompts, params, use_tqdm=False)]


def run_quant_cost(args: argparse.Namespace) -> dict[str, Any]:
    """Measure every variant, print a line each, write JSON + PNG; return the data."""
    from thinfer.eval.perplexity import perplexity
    from thinfer.eval.texts import default_text, split_tokens, windows
    from thinfer.llm import LLM

    if args.windows < 1 or args.window_len < 2 or args.greedy_tokens < 1:
        raise ValueError("--windows and --greedy-tokens must be >= 1, --window-len >= 2")
    rows: dict[str, dict[str, float]] = {}
    reference: list[list[int]] | None = None
    name = None
    for quantization in VARIANTS:
        llm = LLM(
            args.model,
            load_format=args.load_format,
            dtype="float32",
            device="cpu",
            quantization=quantization,
            max_num_seqs=args.windows,
            num_kv_blocks=args.num_kv_blocks,
        )
        if llm.tokenizer is None:
            raise ValueError("quant-cost needs a model with a tokenizer (real text)")
        held_out = split_tokens(llm.tokenizer.encode(default_text(), add_special_tokens=False))[1]
        nll = perplexity(llm, windows(held_out, args.window_len, args.windows))["nll"]
        greedy = greedy_tokens(llm, bench_prompt_token_ids(llm, args.prompts), args.greedy_tokens)
        reference = greedy if reference is None else reference
        label = quantization or "fp32"
        rows[label] = {
            "held_out_nll": nll,
            "perplexity": math.exp(nll),
            "greedy_agreement_with_fp32": prefix_agreement(reference, greedy),
        }
        print(
            f"{label:>5}: held-out perplexity {math.exp(nll):.3f} (NLL {nll:.4f}), greedy "
            f"agreement with fp32 {rows[label]['greedy_agreement_with_fp32']:.1%}",
            flush=True,
        )
        name = f"quant_cost_{model_short_name(llm)}"
        del llm
    for row in rows.values():
        row["perplexity_vs_fp32"] = row["perplexity"] / rows["fp32"]["perplexity"]
    data = {
        "benchmark": "quant_cost",
        "model": args.model or "default",
        "windows": args.windows,
        "window_len": args.window_len,
        "text": "held-out 20% of the embedded default text (Python documentation topics)",
        "prompts": args.prompts,
        "greedy_tokens": args.greedy_tokens,
        "variants": rows,
    }
    json_path, png_path = write_result(str(name), data, _plot(data), args.output_dir)
    print(f"wrote {json_path} and {png_path}")
    return data


def _plot(data: dict[str, Any]) -> Figure:
    fig = Figure(figsize=(8, 3.4))
    labels = list(data["variants"])
    for index, (key, title) in enumerate(
        (("perplexity", "held-out perplexity"), ("greedy_agreement_with_fp32", "greedy agreement"))
    ):
        ax = fig.add_subplot(1, 2, index + 1)
        values = [data["variants"][label][key] for label in labels]
        ax.bar(labels, values, color=["#1f77b4", "#ff7f0e", "#2ca02c"][: len(labels)])
        for x, value in enumerate(values):
            ax.annotate(f"{value:.3g}", (x, value), ha="center", va="bottom", fontsize=8)
        ax.set_title(title, fontsize=9)
    fig.suptitle(f"Weight-only quantization: {data['model'].split('/')[-1]}", fontsize=10)
    fig.tight_layout()
    return fig


def add_parser(kinds: Any) -> None:
    """Register `thinfer eval quant-cost`."""
    qc = kinds.add_parser(
        "quant-cost",
        help="held-out perplexity and greedy agreement of int8 / int4 against fp32",
        description="fp32, int8 and int4 weights of one checkpoint on the CPU: perplexity of "
        "held-out windows of real text (teacher-forced through the engine) and the share of "
        "greedy tokens agreeing with fp32 (JSON + PNG).",
    )
    qc.add_argument("--model", default=None, help="default: the embedded SmolLM2")
    qc.add_argument("--load-format", default="auto")
    qc.add_argument("--windows", type=int, default=16, help="held-out windows")
    qc.add_argument("--window-len", type=int, default=128, help="tokens per window")
    qc.add_argument("--prompts", type=int, default=8, help="benchmark prompts for greedy")
    qc.add_argument("--greedy-tokens", type=int, default=32)
    qc.add_argument("--num-kv-blocks", type=int, default=1024)
    qc.add_argument("--output-dir", default="bench/results")
    qc.set_defaults(func=lambda args: 0 if run_quant_cost(args) else 1)
