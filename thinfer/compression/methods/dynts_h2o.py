"""DynTS+H2O (thinfer's variant, not in the DynTS paper): the predictor's score blended with
the attention each token has received so far.

The learned head sees a token once, on arrival, and cannot know which later question will
need it; accumulated attention (H2O's signal) sees what the text has actually been using.
Each cached slot carries both values; at compression the older slots are ranked by each
(ranks scaled to [0, 1], equal values sharing one) and scored by
`mix * rank(predicted) + (1 - mix) * rank(attention)`. `mix` = 1 ranks as DynTS does, 0 as
H2O does. Everything else is DynTS's: prompt and answer tokens are protected, the same keep
rule and schedule. Per-head scoring (the default) ranks attention per layer and KV head
against one predicted score per token; shared scoring uses the head-averaged attention.
The published DynTS (`"dynts"`) is unchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from thinfer.compression.method import ScoreContext, Signals, check_type, register
from thinfer.compression.methods.dynts import DynTS

if TYPE_CHECKING:
    from thinfer.compression.config import CompressionConfig


def scaled_ranks(values: torch.Tensor) -> torch.Tensor:
    """How many entries along the last dim are strictly lower than each one, scaled by
    count - 1 to [0, 1]: equal values share a rank, so the keep rule's tie-break (the older
    slot) still decides between them."""
    count = values.shape[-1]
    ordered = values.sort(dim=-1).values.contiguous()
    below = torch.searchsorted(ordered, values.contiguous())
    return below.float() / max(count - 1, 1)


@register
@dataclass(frozen=True)
class DynTSH2O(DynTS):
    """Score: a rank blend of the head's prediction and the accumulated attention received."""

    name = "dynts-h2o"
    pointwise = False  # a rank depends on the other older slots
    per_head = True
    slot_values = ("predicted", "attention")  # "predicted" first: the stage writes it there
    mix: float = 0.5

    def check(self, config: CompressionConfig) -> None:
        super().check(config)
        check_type("mix", self.mix, (int, float))
        if not (math.isfinite(self.mix) and 0.0 <= self.mix <= 1.0):
            raise ValueError(f"kv_compression.mix must be in [0, 1], got {self.mix!r}")

    def signals(self) -> Signals:
        return Signals(hidden_states=True, column_sums=True)

    def score(self, ctx: ScoreContext) -> torch.Tensor:
        old = ctx.num_old
        attention = ctx.values["attention"][..., :old]
        predicted = ctx.values["predicted"][..., :old].expand(attention.shape)
        return self.mix * scaled_ranks(predicted) + (1.0 - self.mix) * scaled_ranks(attention)
