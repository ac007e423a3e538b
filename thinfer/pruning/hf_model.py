"""Any checkpoint thinfer loads, as an HF transformers model to prune.

Pruning needs gradients (Taylor scores), activation statistics and module surgery, which
HF's modules give directly; the weights come from thinfer's own loaders (so a GGUF works
too: its tensors arrive with HF names, Q/K rows already un-permuted) and are cast to fp32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from thinfer.loading import load_checkpoint
from thinfer.loading.hf_config import hf_model_from_checkpoint
from thinfer.loading.tokenizer import Tokenizer


@dataclass
class PruningModel:
    """The HF model being pruned, its tokenizer, and where it came from."""

    model: nn.Module
    tokenizer: Tokenizer
    source: str

    @property
    def layers(self) -> nn.ModuleList:
        """The decoder blocks, in order."""
        return self.model.model.layers

    def num_parameters(self) -> int:
        """Parameters, counting tied embeddings once."""
        return sum(p.numel() for p in {id(p): p for p in self.model.parameters()}.values())


def load_for_pruning(model: str | None = None, load_format: str = "auto") -> PruningModel:
    """The checkpoint at `model` (None: the embedded default model) as an fp32 HF model in
    eval mode; ValueError when it has no tokenizer (calibration text must be tokenized)."""
    checkpoint = load_checkpoint(model, load_format)
    if checkpoint.tensors is None:
        raise ValueError("pruning needs real weights: dummy checkpoints have nothing to score")
    if checkpoint.tokenizer is None:
        raise ValueError(f"{checkpoint.source}: no tokenizer, so no calibration text")
    net = hf_model_from_checkpoint(checkpoint, torch.float32)
    return PruningModel(net.eval().requires_grad_(False), checkpoint.tokenizer, checkpoint.source)
