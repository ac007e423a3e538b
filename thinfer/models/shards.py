"""Which part of the model one tensor-parallel rank holds (Megatron-style sharding).

Column-parallel layers (q/k/v, gate/up) keep a contiguous range of their output rows, the
row-parallel ones (o, down) the matching range of their input columns, so each block needs
one all-reduce after o_proj and one after down_proj. Attention is split by whole KV groups:
a rank holds KV heads [kv_heads) and exactly the query heads that read them. With more ranks
than KV heads each KV head is replicated on `world_size / num_kv_heads` ranks (as vLLM does)
and its query heads are split among them. Ranges may be uneven (SmolLM2's 3 KV heads over 2
ranks: 1 and 2), since only the hidden states, whose size every rank shares, are reduced.
The vocabulary is split into equal shards of ceil(vocab / world_size) rows (the last one
padded with zero rows), so the logits of all ranks can be gathered in one collective.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from thinfer.config import ModelConfig

Range = tuple[int, int]


@dataclass(frozen=True)
class ShardLayout:
    """Rank `rank` of `world_size`: the [start, stop) ranges of the heads, KV heads, MLP
    channels and vocabulary rows it holds (`vocab_rows` is the padded shard size)."""

    rank: int
    world_size: int
    heads: Range
    kv_heads: Range
    ffn: Range
    vocab: Range
    vocab_rows: int
    kv_replicas: int  # ranks holding each KV head (1 unless world_size > num_kv_heads)

    @property
    def num_heads(self) -> int:
        """Query heads on this rank."""
        return self.heads[1] - self.heads[0]

    @property
    def num_kv_heads(self) -> int:
        """KV heads on this rank."""
        return self.kv_heads[1] - self.kv_heads[0]

    @property
    def ffn_size(self) -> int:
        """MLP channels on this rank."""
        return self.ffn[1] - self.ffn[0]

    def local_config(self, cfg: ModelConfig) -> ModelConfig:
        """`cfg` with this rank's head counts and MLP width: the shape of its KV cache and of
        its compression state (vocabulary and hidden size stay global)."""
        return dataclasses.replace(
            cfg,
            num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_kv_heads,
            intermediate_size=self.ffn_size,
        )


def _split(total: int, parts: int, index: int) -> Range:
    """The `index`-th of `parts` contiguous, as-even-as-possible ranges of range(total)."""
    return total * index // parts, total * (index + 1) // parts


def plan_shards(cfg: ModelConfig, world_size: int) -> list[ShardLayout]:
    """The layout of every rank for `world_size` ranks; ValueError naming the dimension that
    cannot be split (a rank must hold at least one query head and one MLP channel)."""
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"tensor_parallel_size must be a positive integer, got {world_size!r}")
    if world_size > 1 and (not cfg.uniform_width or cfg.output_bias):
        raise ValueError(
            f"tensor_parallel_size {world_size}: this model's layers differ in width or have "
            "o_proj/down_proj biases (a FLAP-pruned checkpoint); tensor parallelism needs "
            "uniform layers without them"
        )
    heads, kv = cfg.num_attention_heads, cfg.num_key_value_heads
    group = heads // kv
    if world_size > kv and world_size % kv:
        raise ValueError(
            f"tensor_parallel_size {world_size} exceeds the model's {kv} KV heads and is not a "
            f"multiple of them, so KV heads cannot be replicated evenly; use a divisor or a "
            f"multiple of {kv}"
        )
    replicas = max(1, world_size // kv)
    if replicas > group:
        raise ValueError(
            f"tensor_parallel_size {world_size}: each of the {kv} KV heads would be split "
            f"over {replicas} ranks but has only {group} query heads"
        )
    if cfg.intermediate_size < world_size:
        raise ValueError(
            f"tensor_parallel_size {world_size} exceeds the MLP width {cfg.intermediate_size}"
        )
    rows = -(-cfg.vocab_size // world_size)
    layouts = []
    for rank in range(world_size):
        if replicas == 1:
            kv_range = _split(kv, world_size, rank)
            head_range = (kv_range[0] * group, kv_range[1] * group)
        else:
            kv_head = rank // replicas
            first, last = _split(group, replicas, rank % replicas)
            kv_range = (kv_head, kv_head + 1)
            head_range = (kv_head * group + first, kv_head * group + last)
        vocab = (min(rank * rows, cfg.vocab_size), min((rank + 1) * rows, cfg.vocab_size))
        layouts.append(
            ShardLayout(
                rank=rank,
                world_size=world_size,
                heads=head_range,
                kv_heads=kv_range,
                ffn=_split(cfg.intermediate_size, world_size, rank),
                vocab=vocab,
                vocab_rows=rows,
                kv_replicas=replicas,
            )
        )
    return layouts


def full_layout(cfg: ModelConfig) -> ShardLayout:
    """The layout of a single process: everything."""
    return plan_shards(cfg, 1)[0]


def layer_layout(layout: ShardLayout, cfg: ModelConfig, layer: int) -> ShardLayout:
    """The part of layer `layer` a rank holds: `layout` itself, except in a model whose
    layers differ in width (single process only), where it is that layer's own heads and
    MLP channels."""
    if cfg.uniform_width:
        return layout
    kv = cfg.layer_kv_heads(layer)
    group = cfg.num_attention_heads // cfg.num_key_value_heads
    return dataclasses.replace(
        layout, heads=(0, kv * group), kv_heads=(0, kv), ffn=(0, cfg.layer_ffn_size(layer))
    )


# HF tensor name part -> (dimension sharded, the layout's range; heads count head_dim rows).
_SHARDED = {
    "self_attn.q_proj": (0, "heads"),
    "self_attn.k_proj": (0, "kv_heads"),
    "self_attn.v_proj": (0, "kv_heads"),
    "self_attn.o_proj": (1, "heads"),
    "mlp.gate_proj": (0, "ffn"),
    "mlp.up_proj": (0, "ffn"),
    "mlp.down_proj": (1, "ffn"),
}


def shard_tensor(
    hf_name: str, tensor: torch.Tensor, layout: ShardLayout, head_dim: int
) -> torch.Tensor:
    """This rank's part of checkpoint tensor `hf_name` (HF Llama naming); norms are whole,
    embeddings and lm_head keep the vocabulary shard, zero-padded to `vocab_rows`."""
    if layout.world_size == 1:
        return tensor
    if hf_name in ("model.embed_tokens.weight", "lm_head.weight"):
        start, stop = layout.vocab
        shard = tensor.new_zeros(layout.vocab_rows, *tensor.shape[1:])
        shard[: stop - start] = tensor[start:stop]
        return shard
    for part, (dim, which) in _SHARDED.items():
        if f".{part}." not in hf_name:
            continue
        start, stop = getattr(layout, which)
        unit = 1 if which == "ffn" else head_dim
        return tensor.narrow(dim, start * unit, (stop - start) * unit)
    return tensor
