"""FLAP (An et al., AAAI 2024): fluctuation-based adaptive width pruning with bias
compensation, as the authors' code does it (`lib/prune.py`, `prune_flap`, defaults: the
WIFV metric, the AL-AM structure, bias on), made GQA-aware.

1. One pass of the dense model over the calibration windows records, for the inputs of
   every layer's o_proj and down_proj, each channel's mean and its variance over the
   calibration tokens (the "fluctuation").
2. Channel score: variance × ‖column j of the weight‖² (WIFV); attention's is squared (the
   reference does), then each layer's scores are standardized (mean 0, std 1 over the
   module's channels), and an attention group (a KV head with its query heads: GQA stays
   intact, head_dim is kept) scores the mean over its channels.
3. All groups and MLP channels of all layers are ranked together, a group weighing its
   parameter cost in MLP channels ((2·g + 2)·head_dim / 3 with g query heads per KV head:
   512/3 for LLaMA-7B's heads, the reference's constant), and the best are kept until the
   kept weight is the closest to (1 − ratio) of the total: each layer gets its own width.
4. Bias compensation: what a removed channel j fed o_proj/down_proj on average,
   W[:, j]·mean(x_j), becomes a bias of that projection, so the pruned layer gives the
   dense output at the calibration mean input.

Deviations: every layer keeps at least its best group and its best channel (the reference
may empty a whole module at high ratios; thinfer's model needs a width of at least one),
and the statistics are exact mean/variance over all calibration tokens (the reference's
running update weights its first window differently; standardization makes both rank alike).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from thinfer.pruning.hf_model import PruningModel
from thinfer.pruning.width import keep_channels, keep_groups


@dataclass
class InputStatistics:
    """Mean and variance over the calibration tokens of each input channel of one
    projection."""

    mean: torch.Tensor
    variance: torch.Tensor


@torch.no_grad()
def input_statistics(
    pruned: PruningModel, batch: torch.Tensor
) -> list[tuple[InputStatistics, InputStatistics]]:
    """Per layer, (o_proj, down_proj) input statistics of the dense model on `batch`."""
    sums: dict[tuple[int, str], list[torch.Tensor]] = {}

    def record(key: tuple[int, str]):  # noqa: ANN202 - a torch hook
        def hook(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            total = sums.setdefault(key, [x.new_zeros(x.shape[1]), x.new_zeros(x.shape[1])])
            total[0] += x.sum(0)
            total[1] += x.pow(2).sum(0)

        return hook

    handles = []
    for index, layer in enumerate(pruned.layers):
        for name, module in (("o", layer.self_attn.o_proj), ("down", layer.mlp.down_proj)):
            handles.append(module.register_forward_pre_hook(record((index, name))))
    try:
        for rows in batch.split(8):
            pruned.model(input_ids=rows, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    count = batch.numel()

    def stats(key: tuple[int, str]) -> InputStatistics:
        total, squares = sums[key]
        mean = total / count
        variance = (squares / count - mean.pow(2)).clamp_min(0.0)
        return InputStatistics(mean.float(), variance.float())

    return [(stats((i, "o")), stats((i, "down"))) for i in range(len(pruned.layers))]


def _standardize(scores: torch.Tensor) -> torch.Tensor:
    """Each row to mean 0 and (unbiased) std 1, as the reference's `standarlization`."""
    return (scores - scores.mean(dim=1, keepdim=True)) / scores.std(dim=1, keepdim=True)


def flap_scores(
    pruned: PruningModel, stats: list[tuple[InputStatistics, InputStatistics]]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Standardized scores: attention groups [layers, kv_heads], MLP channels
    [layers, intermediate]."""
    config = pruned.model.config
    kv = config.num_key_value_heads
    attention, mlp = [], []
    for layer, (o_stats, down_stats) in zip(pruned.layers, stats, strict=True):
        o_weight = layer.self_attn.o_proj.weight.float()
        attention.append((o_stats.variance * o_weight.pow(2).sum(0)).pow(2))
        down_weight = layer.mlp.down_proj.weight.float()
        mlp.append(down_stats.variance * down_weight.pow(2).sum(0))
    groups = _standardize(torch.stack(attention)).view(len(attention), kv, -1).mean(dim=2)
    return groups, _standardize(torch.stack(mlp))


def adaptive_masks(
    groups: torch.Tensor, channels: torch.Tensor, group_weight: float, ratio: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep masks (groups [L, kv], channels [L, ffn]): all units ranked by score, a group
    weighing `group_weight` channels, the best kept until their weight is the closest to
    (1 − ratio) of the total; then each layer's best group and channel are kept too."""
    scores = torch.cat([groups.flatten(), channels.flatten()])
    weights = torch.ones_like(scores, dtype=torch.float64)
    weights[: groups.numel()] = group_weight
    order = torch.argsort(scores, descending=True, stable=True)
    kept_weight = torch.cumsum(weights[order], 0)
    target = float(weights.sum()) * (1.0 - ratio)
    count = int(torch.argmin((kept_weight - target).abs())) + 1
    keep = torch.zeros_like(scores, dtype=torch.bool)
    keep[order[:count]] = True
    group_mask = keep[: groups.numel()].view_as(groups)
    channel_mask = keep[groups.numel() :].view_as(channels)
    rows = torch.arange(groups.shape[0])
    group_mask[rows, groups.argmax(dim=1)] = True
    channel_mask[rows, channels.argmax(dim=1)] = True
    return group_mask, channel_mask


def compensation_bias(
    weight: torch.Tensor, bias: torch.Tensor | None, mean: torch.Tensor, kept: torch.Tensor
) -> torch.Tensor:
    """The bias that replaces the removed input channels (~`kept`, a bool mask) of a
    projection by their calibration mean: bias + W[:, removed] · mean[removed]."""
    removed = ~kept
    extra = weight[:, removed].float() @ mean[removed]
    return extra if bias is None else bias.float() + extra


def prune_flap(pruned: PruningModel, ratio: float, batch: torch.Tensor) -> dict[str, object]:
    """FLAP at `ratio` (of the decoder layers' attention and MLP parameters) calibrated on
    `batch`; returns the per-layer shape written to config.json and what was removed."""
    config = pruned.model.config
    kv = config.num_key_value_heads
    group_size = config.num_attention_heads // kv
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    stats = input_statistics(pruned, batch)
    groups, channels = flap_scores(pruned, stats)
    group_weight = (2 * group_size + 2) * head_dim / 3
    group_mask, channel_mask = adaptive_masks(groups, channels, group_weight, ratio)
    channels_per_group = group_size * head_dim
    for layer, (o_stats, down_stats), gmask, cmask in zip(
        pruned.layers, stats, group_mask, channel_mask, strict=True
    ):
        o_proj, down_proj = layer.self_attn.o_proj, layer.mlp.down_proj
        o_kept = gmask.repeat_interleave(channels_per_group)
        o_bias = compensation_bias(o_proj.weight, o_proj.bias, o_stats.mean, o_kept)
        down_bias = compensation_bias(down_proj.weight, down_proj.bias, down_stats.mean, cmask)
        keep_groups(layer, gmask.nonzero().flatten().tolist(), group_size, head_dim, o_bias)
        keep_channels(layer, cmask.nonzero().flatten().tolist(), down_bias)
    layer_kv = group_mask.sum(dim=1).tolist()
    layer_ffn = channel_mask.sum(dim=1).tolist()
    config.head_dim = head_dim
    config.num_key_value_heads = max(layer_kv)
    config.num_attention_heads = max(layer_kv) * group_size
    config.intermediate_size = max(layer_ffn)
    config.layer_num_key_value_heads = layer_kv
    config.layer_intermediate_sizes = layer_ffn
    config.output_bias = True
    return {
        "layer_num_key_value_heads": layer_kv,
        "layer_intermediate_sizes": layer_ffn,
        "output_bias": True,
        "dropped_kv_groups": [(~m).nonzero().flatten().tolist() for m in group_mask],
        "dropped_mlp_channels": [(~m).nonzero().flatten().tolist() for m in channel_mask],
    }
