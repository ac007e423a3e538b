"""R-KV: SnapKV's schedule and window with R-KV's score, `lambda * I - (1 - lambda) * R`
(importance minus key redundancy; see `thinfer.compression.head_scores.rkv_scores`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from thinfer.compression.head_scores import rkv_scores
from thinfer.compression.method import check_range, check_type, register
from thinfer.compression.methods.snapkv import SnapKV

if TYPE_CHECKING:
    from thinfer.compression.config import CompressionConfig


@register
@dataclass(frozen=True)
class RKV(SnapKV):
    """Score: importance minus redundancy, per layer and KV head."""

    name = "rkv"
    redundancy_lambda: float = 0.1
    redundancy_threshold: float = 0.5

    def check(self, config: CompressionConfig) -> None:
        super().check(config)
        weight, threshold = self.redundancy_lambda, self.redundancy_threshold
        check_type("redundancy_lambda", weight, (int, float))
        check_type("redundancy_threshold", threshold, (int, float))
        check_range("redundancy_lambda", weight, 0.0 <= weight <= 1.0)
        check_range("redundancy_threshold", threshold, -1.0 <= threshold <= 1.0)

    def layer_scores(self, queries: torch.Tensor, keys: torch.Tensor, num_old: int) -> torch.Tensor:
        return rkv_scores(
            queries.to(keys.device),
            keys,
            num_old,
            self.pool_kernel,
            self.redundancy_lambda,
            self.redundancy_threshold,
        )
