"""`thinfer bench compaction`: the per-step cost of compression (selection + compaction) as
the budget grows, hole filling versus in-order compaction in the same run.

For each method and budget B, one sequence's KV cache (the model's real shape, dummy values)
sits at B slots; each step appends one token, then runs what the engine's compression stage
runs after a sampled token: the schedule, the method's scores, the keep rule
(`select_slots`), the compaction plan, `KVCache.compact` and the slot state's re-alignment.
The steps cover at least two compression cycles (DynTS compresses once per cycle; Window and
H2O every step), so the mean is the amortized cost per decoded token. The peer is the same
with in-order compaction (every kept slot moved to the front in order: what thinfer did before
hole filling). The model forward is not run: this isolates select + compact.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch

from thinfer.bench.report import write_result
from thinfer.compression import CompressionConfig
from thinfer.compression.compaction import plan_compaction, plan_in_order
from thinfer.compression.config import needs_predictor
from thinfer.compression.selection import SequenceView, select_slots
from thinfer.compression.slot_state import SlotState
from thinfer.config import ModelConfig
from thinfer.engine.kv_cache import KVCache
from thinfer.engine.sequence import Sequence
from thinfer.loading.dummy import preset_config
from thinfer.sampling_params import SamplingParams

PLANS = {"fill_holes": plan_compaction, "in_order": plan_in_order}
BLOCK_SIZE = 16


def method_config(method: str, budget: int) -> CompressionConfig:
    """The method at budget B with its native schedule (DynTS: W = 2/5 B, r = 0.3)."""
    extra = {"predictor": "-"} if needs_predictor(method) else {}
    return CompressionConfig(method, budget=budget, **extra)


def _state(config: CompressionConfig, cfg: ModelConfig, kv_len: int, gen: torch.Generator) -> Any:
    prefix = (cfg.num_hidden_layers, cfg.num_key_value_heads) if config.per_head else ()
    state = SlotState(prefix, config.params.slot_values, torch.device("cpu"))
    state.append(torch.arange(kv_len), torch.zeros(kv_len, dtype=torch.bool))
    for name in state.value_names:
        state.value(name).copy_(torch.rand(state.value(name).shape, generator=gen))
    return state


def measure(
    method: str, budget: int, plan_name: str, cfg: ModelConfig, steps: int, seed: int = 0
) -> dict[str, float]:
    """Mean and max milliseconds of select + compact per decoded token."""
    config = method_config(method, budget)
    gen = torch.Generator().manual_seed(seed)
    blocks = -(-(budget + 1) // BLOCK_SIZE) + 1
    kv = KVCache(cfg, blocks, BLOCK_SIZE, torch.float32, torch.device("cpu"))
    kv.storage.normal_(generator=gen)
    seq = Sequence(0, "r", 0, [1] * budget, SamplingParams(), None)
    kv.append_slots(seq, budget - 1)
    seq.kv_len = seq.num_computed_tokens = budget - 1
    state = _state(config, cfg, budget - 1, gen)
    plan = PLANS[plan_name]
    times = []
    for step in range(steps):
        kv.append_slots(seq, 1)  # the token sampled last step is written
        seq.kv_len += 1
        seq.output_token_ids.append(1)
        seq.num_computed_tokens += 1
        fresh = torch.rand(*state.prefix, 1, generator=gen)
        state.append(torch.tensor([budget - 1 + step]), torch.zeros(1, dtype=torch.bool))
        for name in state.value_names:
            state.value(name)[..., -1:] = fresh
        view = SequenceView(seq.kv_len, len(seq.output_token_ids), 0, lambda: seq.all_token_ids)
        started = time.perf_counter()
        chosen = select_slots(config, state, view)
        if chosen is not None:
            compaction = plan(*chosen)
            kv.compact(seq, compaction)
            state.apply(compaction)
        times.append(time.perf_counter() - started)
    return {
        "mean_ms": 1e3 * sum(times) / len(times),
        "max_ms": 1e3 * max(times),
        "steps": steps,
    }


def cycle_steps(method: str, budget: int) -> int:
    """Decoding steps between two compressions under the native schedule."""
    if not needs_predictor(method):  # DynTS-style: compress once per saw-tooth cycle
        return 1
    config = method_config(method, budget)
    window = config.recent_window
    kept = window + int(config.ratio * (budget - window))
    return max(1, budget - kept)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Measure every method x budget x plan; write JSON + PNG."""
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = preset_config(args.model)
    methods = [m for m in args.methods.split(",") if m]
    for method in methods:
        method_config(method, 16)  # unknown methods fail here, naming the choices
    try:
        budgets = [int(b) for b in args.budgets.split(",") if b]
    except ValueError:
        raise ValueError(
            f"--budgets must be comma-separated integers, got {args.budgets!r}"
        ) from None
    if not budgets or min(budgets) < 8:
        raise ValueError(f"--budgets must be integers >= 8, got {args.budgets!r}")
    results: dict[str, Any] = {}
    for method in methods:
        for budget in budgets:
            steps = max(args.min_steps, 2 * cycle_steps(method, budget) + 1)
            for plan_name in PLANS:
                row = measure(method, budget, plan_name, cfg, steps)
                results.setdefault(method, {}).setdefault(plan_name, {})[str(budget)] = row
                print(f"{method:>8} B={budget:<5} {plan_name:<10} {row['mean_ms']:8.3f} ms/step")
    ratios = {
        m: {
            b: results[m]["in_order"][b]["mean_ms"] / results[m]["fill_holes"][b]["mean_ms"]
            for b in results[m]["fill_holes"]
        }
        for m in results
    }
    record = {
        "benchmark": "compaction",
        "model_shape": args.model,
        "config": {"budgets": budgets, "methods": methods, "schedule": "native"},
        "results": results,
        "in_order_over_fill_holes": ratios,
    }
    json_path, png_path = write_result(
        f"compaction_{args.model}", record, _plot(record), args.output_dir
    )
    print(f"wrote {json_path} and {png_path}")
    return record


def _plot(record: dict[str, Any]) -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    budgets = record["config"]["budgets"]
    for index, (method, plans) in enumerate(record["results"].items()):
        for plan_name, style in (("fill_holes", "-o"), ("in_order", "--x")):
            values = [plans[plan_name][str(b)]["mean_ms"] for b in budgets]
            label = f"{method}, {plan_name.replace('_', ' ')}"
            ax.plot(budgets, values, style, color=f"C{index}", label=label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("budget B (KV slots per sequence)")
    ax.set_ylabel("select + compact, ms per decoded token")
    ax.set_title(f"Compression cost per step ({record['model_shape']} shape, CPU fp32)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def add_parser(kinds: Any) -> None:
    """`thinfer bench compaction`."""
    p = kinds.add_parser(
        "compaction",
        help="per-step cost of compression (select + compact) vs budget: hole filling vs "
        "in-order compaction",
        description=__doc__.split("\n\n")[1] if __doc__ else None,
    )
    p.add_argument("--model", default="smollm2-135m", help="dummy preset whose KV shape is used")
    p.add_argument("--methods", default="window,h2o,dynts", help="comma-separated")
    p.add_argument("--budgets", default="256,1024,4096", help="comma-separated KV budgets")
    p.add_argument("--min-steps", type=int, default=64, help="decoded tokens measured at least")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--output-dir", default=None, help="default bench/results")
    p.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    run(args)
    return 0
