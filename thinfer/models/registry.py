"""Maps a checkpoint's architecture to the module that implements it.

Adding a family means one new file and one entry here.
"""

from __future__ import annotations

import torch
from torch import nn

from thinfer.config import ModelConfig
from thinfer.models.collectives import SINGLE_PROCESS, Collectives
from thinfer.models.llama import LlamaForCausalLM
from thinfer.models.shards import ShardLayout

_FAMILIES: dict[str, type[nn.Module]] = {
    "llama": LlamaForCausalLM,
    "mistral": LlamaForCausalLM,
    "qwen2": LlamaForCausalLM,
}


def build_model(
    cfg: ModelConfig,
    dtype: torch.dtype,
    device: torch.device,
    layout: ShardLayout | None = None,
    collectives: Collectives = SINGLE_PROCESS,
) -> LlamaForCausalLM:
    """Instantiate the decoder for `cfg` (weights uninitialized): the whole model, or the
    shard of one tensor-parallel rank (`layout`, joined to the others by `collectives`)."""
    arch = cfg.architecture.lower()
    for family, cls in _FAMILIES.items():
        if arch.startswith(family):
            return cls(cfg, dtype, device, layout, collectives)  # type: ignore[call-arg]
    raise ValueError(f"architecture {cfg.architecture!r} is not supported: {', '.join(_FAMILIES)}")
