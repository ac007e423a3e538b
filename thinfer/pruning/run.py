"""`run_prune`: load, score on calibration text, remove, measure, save."""

from __future__ import annotations

import time
from typing import Any

from thinfer.pruning.calibration import batch_of, perplexity, text_splits
from thinfer.pruning.depth import least_important, ppl_scores, remove_blocks, taylor_scores
from thinfer.pruning.flap import prune_flap
from thinfer.pruning.heal import heal_lora
from thinfer.pruning.hf_model import load_for_pruning
from thinfer.pruning.save import check_output, save_pruned
from thinfer.pruning.width import prune_uniform

DEPTH_METHODS = ("depth-ppl", "depth-taylor")
WIDTH_METHODS = ("flap", "wanda-sp", "mag-sp")
METHODS = DEPTH_METHODS + WIDTH_METHODS


def check_request(method: str, ratio: float | None, blocks: int | None) -> None:
    """ValueError for an unknown method, a ratio outside (0, 1), or a wrong amount option."""
    if method not in METHODS:
        raise ValueError(f"--method {method!r}: use one of {', '.join(METHODS)}")
    if (ratio is None) == (blocks is None):
        raise ValueError("give exactly one of --ratio and --remove-blocks")
    if ratio is not None and not 0.0 < ratio < 1.0:
        raise ValueError(f"--ratio must be in (0, 1), got {ratio}")
    if blocks is not None and method not in DEPTH_METHODS:
        raise ValueError(f"--remove-blocks is for depth pruning, not {method}: use --ratio")
    if blocks is not None and blocks < 1:
        raise ValueError(f"--remove-blocks must be >= 1, got {blocks}")


def run_prune(
    output: str,
    method: str,
    *,
    model: str | None = None,
    load_format: str = "auto",
    ratio: float | None = None,
    remove: int | None = None,
    calib: list[str] | None = None,
    samples: int = 10,
    eval_samples: int = 10,
    heal_steps: int = 0,
    unhealed_output: str | None = None,
) -> dict[str, Any]:
    """Prune `model` with `method` (by `ratio`, or `remove` blocks), heal it with LoRA for
    `heal_steps` steps if > 0, and save it to `output` (and, when given, the model before
    healing to `unhealed_output`); returns the report also written there. Everything is
    checked before the model loads."""
    check_request(method, ratio, remove)
    if heal_steps < 0:
        raise ValueError(f"--heal-steps must be >= 0, got {heal_steps}")
    check_output(output)
    if unhealed_output is not None:
        check_output(unhealed_output)
    started = time.monotonic()
    pruned = load_for_pruning(model, load_format)
    calib_ids, held_out = text_splits(pruned.tokenizer, calib)
    batch = batch_of(calib_ids, samples)
    evaluation = batch_of(held_out, eval_samples)
    before = {"parameters": pruned.num_parameters(), "ppl": perplexity(pruned.model, evaluation)}
    report: dict[str, Any] = {"method": method, "source": pruned.source, "dense": before}
    num_blocks = len(pruned.layers)
    if method in DEPTH_METHODS:
        count = remove if remove is not None else round(ratio * num_blocks)  # type: ignore[operator]
        if count >= num_blocks:
            raise ValueError(f"cannot remove {count} of the model's {num_blocks} blocks")
        scorer = ppl_scores if method == "depth-ppl" else taylor_scores
        scores = scorer(pruned, batch)
        blocks = least_important(scores, count)
        remove_blocks(pruned, blocks)
        report.update(block_scores=scores, removed_blocks=blocks)
    elif method == "flap":
        report["shape"] = prune_flap(pruned, ratio, batch)  # type: ignore[arg-type]
    else:
        report["shape"] = prune_uniform(pruned, ratio, batch if method == "wanda-sp" else None)  # type: ignore[arg-type]
    report["ratio"] = ratio
    report["pruned"] = {
        "parameters": pruned.num_parameters(),
        "ppl": perplexity(pruned.model, evaluation),
    }
    if unhealed_output is not None:
        save_pruned(pruned, unhealed_output, dict(report))
    if heal_steps:
        losses = heal_lora(pruned, batch_of(calib_ids, None), heal_steps)
        report["healed"] = {
            "method": "lora",
            "steps": heal_steps,
            **losses,
            "ppl": perplexity(pruned.model, evaluation),
        }
    report["calibration"] = {
        "text": calib or "default (CPython documentation topics)",
        "samples": samples,
        "eval_samples": eval_samples,
        "window": int(batch.shape[1]),
    }
    report["seconds"] = round(time.monotonic() - started, 1)
    save_pruned(pruned, output, report)
    return report
