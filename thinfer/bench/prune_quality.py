"""`thinfer bench prune-quality`: the results table of structured pruning, per method and ratio.

For each (method, ratio): one `run_prune` with `--heal-steps` LoRA steps, which saves the
model before and after healing into a temporary directory. Measured per row: parameters;
held-out perplexity of the dense, pruned and healed models (from the pruning report);
accuracy on held-out proxy-task traces (`thinfer dynts proxy-eval`'s task with the full KV
cache) of the dense, pruned and healed models. Then, once all rows are pruned, the speed
phase: per row the dense and the healed model's decode tokens/s (`time_thinfer`: copies of
one real prompt, greedy, EOS ignored, prefill excluded, after a warm-up) timed alternately,
medians kept. The JSON + PNG are rewritten after every row ("complete" once the speed phase
is done) and a markdown table of the rows is printed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
from typing import TYPE_CHECKING, Any

from thinfer.bench.decode_timing import (
    IDLE_KV_BLOCKS,
    free_device_memory,
    resize_kv_cache,
    time_thinfer,
)
from thinfer.bench.prompts import bench_prompts
from thinfer.bench.prune_quality_args import check_args
from thinfer.bench.report import model_short_name, write_result

if TYPE_CHECKING:
    from thinfer.dynts.proxy import ProxyProblem
    from thinfer.llm import LLM


def load(model: str | None, args: argparse.Namespace, dense: bool) -> LLM:
    """The model with a small idle KV cache (`--load-format` for the dense model, "auto" for
    the pruned checkpoints); ValueError without a tokenizer (the proxy task needs one)."""
    from thinfer.llm import LLM

    llm = LLM(
        model, load_format=args.load_format if dense else "auto", device=args.device,
        num_kv_blocks=IDLE_KV_BLOCKS, max_num_seqs=1,
    )  # fmt: skip
    if llm.tokenizer is None:
        raise ValueError(f"{llm.source} has no tokenizer: the proxy task needs one")
    return llm


def release(llm: LLM) -> None:
    """Close `llm` and give its device memory back."""
    from thinfer.bench.hf_peer import llm_device

    device = llm_device(llm)
    llm.close()
    free_device_memory(device)


def measure(
    model: str | None, args: argparse.Namespace, problems: list[ProxyProblem] | None
) -> dict[str, Any]:
    """Proxy accuracy (full KV cache) of `model` on `problems` (None: the dense model, whose
    tokenizer makes them; returned under "problems")."""
    from thinfer.dynts.proxy import ANSWER_TOKENS, make_problems
    from thinfer.dynts.proxy_eval import run_method

    llm = load(model, args, dense=problems is None)
    result: dict[str, Any] = {"source": llm.source, "short_name": model_short_name(llm)}
    if problems is None:
        kwargs = dict(num_facts=args.facts, num_steps=args.steps)
        problems = make_problems(llm.tokenizer, args.count, args.seed, **kwargs)
    longest = max(len(p.trace.prompt_token_ids) + p.answer_prefix_end for p in problems)
    resize_kv_cache(llm, len(problems), longest + ANSWER_TOKENS)  # all replayed at once
    result.update(proxy_accuracy=run_method(llm, problems, None)["accuracy"], problems=problems)
    release(llm)
    return result


def removed_summary(report: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """A short text of what `run_prune` removed, and the JSON form: the blocks, or the shape
    without the per-layer index lists (uniform widths, or per-layer ones such as FLAP's)."""
    if "removed_blocks" in report:
        blocks = report["removed_blocks"]
        return f"{len(blocks)} blocks ({', '.join(map(str, blocks))})", {"blocks": blocks}
    shape = report["shape"]
    groups, channels = shape["dropped_kv_groups"], shape["dropped_mlp_channels"]
    detail = {k: v for k, v in shape.items() if not k.startswith("dropped")}
    if "intermediate_size" in shape:  # the same in every layer
        kv, mlp = shape["num_key_value_heads"], shape["intermediate_size"]
        dropped_kv, dropped_mlp = len(groups[0]), len(channels[0])
        return f"KV groups {kv + dropped_kv}->{kv}, MLP {mlp + dropped_mlp}->{mlp}", detail
    total_kv, total_mlp = sum(map(len, groups)), sum(map(len, channels))
    return f"{total_kv} KV groups, {total_mlp} MLP channels in {len(groups)} layers", detail


def prune_row(
    method: str, ratio: float, args: argparse.Namespace, dense: dict[str, Any], folder: str
) -> dict[str, Any]:
    """Prune and heal once, the model before healing saved beside the healed one under
    `folder`; proxy accuracy of both. The unhealed copy is deleted, the healed one kept
    (`row["checkpoint"]`) for the speed phase."""
    from thinfer.pruning.run import run_prune

    common = dict(
        model=args.model, load_format=args.load_format, ratio=ratio, calib=args.calib,
        samples=args.samples, eval_samples=args.eval_samples,
    )  # fmt: skip
    problems = dense["problems"]
    healed_dir = os.path.join(folder, f"{method}-{ratio:g}")
    unhealed_dir = healed_dir + "-unhealed"
    print(f"{method} {ratio}: pruning and healing ({args.heal_steps} steps)", flush=True)
    report = run_prune(
        healed_dir, method, heal_steps=args.heal_steps, unhealed_output=unhealed_dir, **common
    )
    before = measure(unhealed_dir, args, problems)
    shutil.rmtree(unhealed_dir)
    after = measure(healed_dir, args, problems)
    text, removed = removed_summary(report)
    params = report["pruned"]["parameters"]
    return {
        "method": method,
        "ratio": ratio,
        "checkpoint": healed_dir,
        "parameters": params,
        "parameters_dense": report["dense"]["parameters"],
        "parameters_fraction": params / report["dense"]["parameters"],
        "removed": text,
        "removed_detail": removed,
        "ppl_dense": report["dense"]["ppl"],
        "ppl_pruned": report["pruned"]["ppl"],
        "ppl_healed": report["healed"]["ppl"],
        "heal_first_loss": report["healed"]["first_loss"],
        "heal_last_loss": report["healed"]["last_loss"],
        "proxy_accuracy_dense": dense["proxy_accuracy"],
        "proxy_accuracy_pruned": before["proxy_accuracy"],
        "proxy_accuracy_healed": after["proxy_accuracy"],
        "prune_and_heal_seconds": report["seconds"],
    }


def measure_speed(rows: list[dict[str, Any]], args: argparse.Namespace) -> list[float]:
    """The speed phase, after all pruning: per row, the dense model's and the healed
    checkpoint's decode tokens/s timed alternately `--speed-repeats` times (both loaded), so
    each ratio compares measurements made under the same load; each row gets the medians
    and the samples. Returns the dense medians."""
    dense_llm = load(args.model, args, dense=True)
    prompt = dense_llm.tokenizer.encode(bench_prompts(1)[0])
    batch = [list(prompt) for _ in range(args.batch_size)]
    dense_speeds = []
    for row in rows:
        print(f"{row['method']} {row['ratio']}: decode speed against dense", flush=True)
        pruned_llm = load(row.pop("checkpoint"), args, dense=False)
        samples: dict[str, list[float]] = {"dense": [], "pruned": []}
        for _ in range(args.speed_repeats):
            for key, llm in (("dense", dense_llm), ("pruned", pruned_llm)):
                samples[key].append(time_thinfer(llm, batch, args.max_tokens).tokens_per_s)
        release(pruned_llm)
        dense, ours = statistics.median(samples["dense"]), statistics.median(samples["pruned"])
        row.update(
            tokens_per_s=ours,
            dense_tokens_per_s=dense,
            speedup_vs_dense=ours / dense,
            speed_samples=samples,
            prompt_tokens=len(prompt),
        )
        dense_speeds.append(dense)
    release(dense_llm)
    return dense_speeds


def run_prune_quality(args: argparse.Namespace) -> dict[str, Any]:
    """Measure every (method, ratio) row; write JSON + PNG after each; print the table."""
    methods, ratios = check_args(args)
    import torch

    from thinfer.bench.prune_quality_plot import markdown_table, plot_prune_quality

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    print("dense model: proxy accuracy", flush=True)
    dense = measure(args.model, args, None)
    data: dict[str, Any] = {
        "benchmark": "prune_quality",
        "model": dense["source"],
        "device": args.device or ("cuda" if torch.cuda.is_available() else "cpu"),
        "methods": methods,
        "ratios": ratios,
        "heal_steps": args.heal_steps,
        "calibration": {"text": args.calib or "default", "samples": args.samples},
        "eval_samples": args.eval_samples,
        "proxy": {"count": args.count, "seed": args.seed, "facts": args.facts, "steps": args.steps},
        "decode": {"batch_size": args.batch_size, "max_tokens": args.max_tokens},
        "notes": "ppl: held-out perplexity (windows of 128 tokens); proxy accuracy: full KV "
        "cache; tokens_per_s: decode of the healed model, prefill excluded, after all "
        "pruning: the median of speed_repeats timings alternating with the dense model's "
        "(dense_tokens_per_s; the median over rows is dense.tokens_per_s)",
        "speed_repeats": args.speed_repeats,
        "dense": None,
        "rows": [],
        "complete": False,
    }  # fmt: skip
    name = f"prune_quality_{dense['short_name']}"
    with tempfile.TemporaryDirectory(prefix="thinfer-prune-quality-") as folder:
        for method in methods:
            for ratio in ratios:
                row = prune_row(method, ratio, args, dense, folder)
                data["dense"] = data["dense"] or {
                    "parameters": row["parameters_dense"], "ppl": row["ppl_dense"],
                    "proxy_accuracy": dense["proxy_accuracy"], "tokens_per_s": None,
                }  # fmt: skip
                data["rows"].append(row)
                write_result(name, data, plot_prune_quality(data), args.output_dir)
        dense_speeds = sorted(measure_speed(data["rows"], args))
    data["dense"]["tokens_per_s"] = dense_speeds[len(dense_speeds) // 2]
    data["complete"] = True
    json_path, png_path = write_result(name, data, plot_prune_quality(data), args.output_dir)
    print(markdown_table(data))
    print(f"wrote {json_path} and {png_path}")
    return data
