"""Width pruning at one ratio in every layer (Wanda-SP and Mag-SP, as in the FLAP code).

A layer loses whole attention groups (a KV head with the query heads that read it, so GQA
stays intact and head_dim is kept) and MLP channels. Scores live on the input channels of
o_proj and down_proj: Wanda-SP |W_ij|·‖X_j‖ averaged over the outputs i (‖X_j‖ over the
calibration tokens), Mag-SP the column norm ‖W_:j‖. A head scores the sum over its
channels, a group the sum over its heads. Per layer, floor(ratio · groups) groups and
floor(ratio · channels) channels with the lowest scores go. Wanda-SP works layer after
layer: the statistics of layer i come from inputs that went through the already pruned
layers before it (the reference's order).
"""

from __future__ import annotations

import torch
from torch import nn

from thinfer.pruning.hf_model import PruningModel


class _Captured(Exception):
    """Raised by a hook to stop the forward pass once a layer's inputs were recorded."""


@torch.no_grad()
def input_square_sums(
    pruned: PruningModel, batch: torch.Tensor, layer_index: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Σ over the calibration tokens of x_j² for the inputs of layer `layer_index`'s o_proj
    and down_proj (the forward pass stops after that layer)."""
    layer = pruned.layers[layer_index]
    sums: dict[str, torch.Tensor] = {}

    def record(name: str, stop: bool):  # noqa: ANN202 - a torch hook
        def hook(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            x = args[0].reshape(-1, args[0].shape[-1]).float()
            sums[name] = sums.get(name, 0) + x.pow(2).sum(0)
            if stop:
                raise _Captured

        return hook

    handles = [
        layer.self_attn.o_proj.register_forward_pre_hook(record("o_proj", False)),
        layer.mlp.down_proj.register_forward_pre_hook(record("down_proj", True)),
    ]
    try:
        for rows in batch.split(8):
            try:
                pruned.model(input_ids=rows, use_cache=False)
            except _Captured:
                pass
    finally:
        for handle in handles:
            handle.remove()
    return sums["o_proj"], sums["down_proj"]


def channel_scores(weight: torch.Tensor, square_sums: torch.Tensor | None) -> torch.Tensor:
    """Per input channel: Wanda-SP mean_i |W_ij|·‖X_j‖ with `square_sums`, else Mag-SP ‖W_:j‖."""
    weight = weight.detach().float()
    if square_sums is None:
        return weight.norm(dim=0)
    return (weight.abs() * square_sums.sqrt()[None, :]).mean(dim=0)


def kept_after_dropping(scores: torch.Tensor, count: int) -> list[int]:
    """Indices kept after dropping the `count` lowest scores, in order."""
    drop = set(torch.argsort(scores, stable=True)[:count].tolist())
    return [i for i in range(scores.numel()) if i not in drop]


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    out = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    out.weight.data.copy_(weight)
    if bias is not None:
        out.bias.data.copy_(bias)
    return out.requires_grad_(False)


def keep_groups(
    layer: nn.Module,
    groups: list[int],
    group_size: int,
    head_dim: int,
    output_bias: torch.Tensor | None = None,
) -> None:
    """Keep KV groups `groups` of a decoder layer: their K/V heads, their query heads;
    `output_bias` (FLAP's compensation) replaces o_proj's bias."""
    attn = layer.self_attn
    heads = [g * group_size + h for g in groups for h in range(group_size)]
    q_rows = torch.tensor([h * head_dim + d for h in heads for d in range(head_dim)])
    kv_rows = torch.tensor([g * head_dim + d for g in groups for d in range(head_dim)])
    for name, rows in (("q_proj", q_rows), ("k_proj", kv_rows), ("v_proj", kv_rows)):
        proj = getattr(attn, name)
        bias = None if proj.bias is None else proj.bias[rows]
        setattr(attn, name, _linear(proj.weight[rows], bias))
    o = attn.o_proj
    attn.o_proj = _linear(o.weight[:, q_rows], o.bias if output_bias is None else output_bias)


def keep_channels(
    layer: nn.Module, channels: list[int], output_bias: torch.Tensor | None = None
) -> None:
    """Keep MLP channels `channels` of a decoder layer; `output_bias` (FLAP's compensation)
    replaces down_proj's bias."""
    mlp, index = layer.mlp, torch.tensor(channels)
    for name in ("gate_proj", "up_proj"):
        proj = getattr(mlp, name)
        bias = None if proj.bias is None else proj.bias[index]
        setattr(mlp, name, _linear(proj.weight[index], bias))
    down = mlp.down_proj
    mlp.down_proj = _linear(
        down.weight[:, index], down.bias if output_bias is None else output_bias
    )


def prune_uniform(
    pruned: PruningModel, ratio: float, batch: torch.Tensor | None
) -> dict[str, object]:
    """Wanda-SP (with a calibration `batch`) or Mag-SP (None) at `ratio` in every layer;
    returns the new shape (query heads, KV heads, MLP channels per layer) and, per layer,
    the KV groups and MLP channels removed."""
    config = pruned.model.config
    kv = config.num_key_value_heads
    group_size = config.num_attention_heads // kv
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    drop_groups = int(ratio * kv)
    drop_channels = int(ratio * config.intermediate_size)
    dropped_groups, dropped_channels = [], []
    for index, layer in enumerate(pruned.layers):
        o_sums, down_sums = (None, None)
        if batch is not None:
            o_sums, down_sums = input_square_sums(pruned, batch, index)
        heads = channel_scores(layer.self_attn.o_proj.weight, o_sums).view(-1, head_dim).sum(1)
        groups = kept_after_dropping(heads.view(kv, group_size).sum(1), drop_groups)
        keep_groups(layer, groups, group_size, head_dim)
        mlp = channel_scores(layer.mlp.down_proj.weight, down_sums)
        channels = kept_after_dropping(mlp, drop_channels)
        keep_channels(layer, channels)
        dropped_groups.append(sorted(set(range(kv)) - set(groups)))
        dropped_channels.append(sorted(set(range(mlp.numel())) - set(channels)))
    config.head_dim = head_dim
    config.num_key_value_heads = kv - drop_groups
    config.num_attention_heads = (kv - drop_groups) * group_size
    config.intermediate_size -= drop_channels
    return {
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads,
        "intermediate_size": config.intermediate_size,
        "dropped_kv_groups": dropped_groups,
        "dropped_mlp_channels": dropped_channels,
    }
