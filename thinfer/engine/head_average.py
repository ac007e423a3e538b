"""`HeadAverage`: per-head compression scores folded into one score per slot.

Shared scoring ranks slots by the mean of a score over every layer's KV heads (over all
tensor-parallel ranks). A FLAP-pruned layer narrower than the cache has zero padding heads
(see `thinfer.models.llama.Attention`); they exist in the cache but not in the model, so
they are left out of the sum and of the count.
"""

from __future__ import annotations

import torch

from thinfer.config import ModelConfig
from thinfer.engine.exchange import StepExchange


class HeadAverage:
    """Sums and means over the real KV heads of scores [layers, this rank's KV heads, n]."""

    def __init__(self, model_config: ModelConfig, exchange: StepExchange) -> None:
        self.exchange = exchange
        widths = model_config.layer_num_key_value_heads
        heads = model_config.num_key_value_heads
        self.real_heads = (
            None if widths is None else torch.tensor(widths)[:, None] > torch.arange(heads)
        )
        self.num_real_heads = sum(widths) if widths else model_config.num_hidden_layers * heads

    def sum(self, scores: torch.Tensor) -> torch.Tensor:
        """This rank's real heads' sum [n]."""
        if self.real_heads is not None:
            scores = scores * self.real_heads[..., None].to(scores)
        return scores.sum(dim=(0, 1))

    def total(self, scores: torch.Tensor) -> torch.Tensor:
        """The sum over every rank's real heads [n]."""
        return self.exchange.sum_over_ranks(self.sum(scores))

    def mean(self, scores: torch.Tensor) -> torch.Tensor:
        """The mean over the layers and every rank's real heads [n]."""
        return self.total(scores) / self.num_real_heads
