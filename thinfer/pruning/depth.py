"""Depth pruning (Shortened LLaMA, arXiv 2402.02834): rank the decoder blocks, remove the
least important ones whole.

- PPL criterion: the calibration perplexity of the model with that one block removed; the
  block whose removal hurts least goes first. One-shot (all blocks ranked once on the dense
  model), as the paper; no iterative re-ranking is offered.
- Taylor+: one backward pass per calibration batch; a weight's salience is W ⊙ ∂L/∂W summed
  over the batches, a matrix's score the sum of |salience|, a block's the sum over its
  matrices and norms (the reference code's defaults); the first 4 and last 2 blocks are
  kept whatever their score (the "+" heuristic).
"""

from __future__ import annotations

import torch
from torch import nn

from thinfer.pruning.calibration import mean_nll
from thinfer.pruning.hf_model import PruningModel

KEEP_FIRST, KEEP_LAST = 4, 2  # Taylor+'s blocks that are never removed


def remove_blocks(pruned: PruningModel, blocks: list[int]) -> None:
    """Delete decoder blocks `blocks` from the model in place (configs renumbered)."""
    layers = pruned.layers
    doomed = set(blocks)
    if not doomed <= set(range(len(layers))):
        raise ValueError(f"blocks {sorted(doomed)} are not all in 0..{len(layers) - 1}")
    if len(doomed) >= len(layers):
        raise ValueError(f"cannot remove all {len(layers)} blocks")
    kept = [layer for i, layer in enumerate(layers) if i not in doomed]
    config = pruned.model.config
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        config.layer_types = [t for i, t in enumerate(layer_types) if i not in doomed]
    pruned.model.model.layers = nn.ModuleList(kept)
    config.num_hidden_layers = len(kept)
    for index, layer in enumerate(kept):
        layer.self_attn.layer_idx = index


def ppl_scores(pruned: PruningModel, batch: torch.Tensor) -> list[float]:
    """Per block: the calibration NLL with that block removed (lower: remove first)."""
    model, layers = pruned.model, list(pruned.layers)
    config = model.config
    scores = []
    try:
        config.num_hidden_layers = len(layers) - 1
        for index in range(len(layers)):
            model.model.layers = nn.ModuleList(layers[:index] + layers[index + 1 :])
            scores.append(mean_nll(model, batch))
    finally:
        model.model.layers = nn.ModuleList(layers)
        config.num_hidden_layers = len(layers)
    return scores


def taylor_scores(pruned: PruningModel, batch: torch.Tensor, chunk: int = 4) -> list[float]:
    """Per block: Σ |W ⊙ ∂L/∂W| over its matrices and norms; +inf for the first 4 and last 2
    blocks (never removed)."""
    model = pruned.model
    params = dict(model.named_parameters())
    for param in params.values():
        param.requires_grad_(True)
    salience = {name: torch.zeros_like(p) for name, p in params.items() if ".layers." in name}
    try:
        for rows in batch.split(chunk):
            model.zero_grad(set_to_none=True)
            model(input_ids=rows, labels=rows, use_cache=False).loss.backward()
            for name, total in salience.items():
                grad = params[name].grad
                if grad is not None:
                    total += params[name].detach() * grad
    finally:
        model.zero_grad(set_to_none=True)
        for param in params.values():
            param.requires_grad_(False)
    num_blocks = len(pruned.layers)
    scores = [0.0] * num_blocks
    for name, total in salience.items():
        scores[int(name.split(".layers.")[1].split(".")[0])] += float(total.abs().sum())
    for index in range(num_blocks):
        if index < KEEP_FIRST or index >= num_blocks - KEEP_LAST:
            scores[index] = float("inf")
    return scores


def least_important(scores: list[float], count: int) -> list[int]:
    """The `count` blocks with the lowest scores (ties: the later block first)."""
    if count > sum(s != float("inf") for s in scores):
        raise ValueError(
            f"cannot remove {count} blocks: only "
            f"{sum(s != float('inf') for s in scores)} may be removed"
        )
    order = sorted(range(len(scores)), key=lambda i: (scores[i], -i))
    return sorted(order[:count])
