"""`CompressionConfig`: which KV-cache compression a request uses, and its budget.

Two triggers: "native" follows each method's original schedule; "uniform" applies the same
rule to every method (when the cache reaches `budget` slots, keep the `window` most recent
plus `floor(ratio * (L - window))` older ones chosen by the method's score) so methods can be
compared at equal memory.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

METHODS = ("full", "window", "streamingllm", "sepllm", "h2o", "snapkv", "rkv", "dynts")
PER_HEAD_METHODS = ("h2o", "snapkv", "rkv")
TRIGGERS = ("native", "uniform")


@dataclass(frozen=True)
class CompressionConfig:
    """Per-request compression settings (validated on construction)."""

    method: str = "full"
    budget: int | None = None
    window: int | None = None
    ratio: float = 0.3
    sink_tokens: int = 4
    trigger: str = "native"
    predictor: str | None = None
    think_end_token_ids: tuple[int, ...] | None = None
    separators: int | None = None
    interval: int = 128
    observation_window: int = 8
    pool_kernel: int = 7
    redundancy_lambda: float = 0.1
    redundancy_threshold: float = 0.5
    reassign_positions: bool = False

    def __post_init__(self) -> None:
        self._check_types()
        if self.method not in METHODS:
            raise ValueError(
                f"kv_compression.method: unknown {self.method!r}; available: {', '.join(METHODS)}"
            )
        if self.trigger not in TRIGGERS:
            raise ValueError(
                f"kv_compression.trigger must be one of {TRIGGERS}, got {self.trigger!r}"
            )
        if self.think_end_token_ids is not None:
            ids = tuple(self.think_end_token_ids)
            if not ids or not all(isinstance(t, int) and t >= 0 for t in ids):
                raise ValueError("kv_compression.think_end_token_ids must be non-negative ints")
            object.__setattr__(self, "think_end_token_ids", ids)
        if self.method == "full":
            return
        if self.method == "dynts" and not self.predictor:
            raise ValueError("kv_compression.predictor: DynTS needs the path of a predictor head")
        if not isinstance(self.budget, int) or isinstance(self.budget, bool) or self.budget < 2:
            raise ValueError(f"kv_compression.budget must be an integer >= 2, got {self.budget!r}")
        if self.window is not None and not 0 <= self.window < self.budget:
            raise ValueError(
                f"kv_compression.window must be in [0, budget={self.budget}), got {self.window!r}"
            )
        if not 0.0 <= self.ratio < 1.0:
            raise ValueError(f"kv_compression.ratio must be in [0, 1), got {self.ratio!r}")
        if self.separators is not None and not 0 <= self.separators < self.budget:
            raise ValueError(
                f"kv_compression.separators must be in [0, budget), got {self.separators!r}"
            )
        self._check_per_head_fields()
        if self.reassign_positions and self.method != "streamingllm":
            raise ValueError("kv_compression.reassign_positions is a StreamingLLM option")
        if self.method in ("streamingllm", "sepllm") and not 0 <= self.sink_tokens < self.budget:
            raise ValueError(
                f"kv_compression.sink_tokens must be in [0, budget), got {self.sink_tokens!r}"
            )

    def _check_types(self) -> None:
        """Wrong types raise ValueError naming the field (never a TypeError later)."""
        expected: dict[str, tuple[type, ...]] = {
            "method": (str,),
            "trigger": (str,),
            "budget": (int, type(None)),
            "window": (int, type(None)),
            "sink_tokens": (int,),
            "separators": (int, type(None)),
            "interval": (int,),
            "observation_window": (int,),
            "pool_kernel": (int,),
            "predictor": (str, type(None)),
            "reassign_positions": (bool,),
            "ratio": (int, float),
            "redundancy_lambda": (int, float),
            "redundancy_threshold": (int, float),
        }
        for name, types in expected.items():
            value = getattr(self, name)
            is_bool = isinstance(value, bool)
            if not isinstance(value, types) or (is_bool and bool not in types):
                kinds = " or ".join("None" if t is type(None) else t.__name__ for t in types)
                raise ValueError(f"kv_compression.{name} must be {kinds}, got {value!r}")

    def _check_per_head_fields(self) -> None:
        limit = self.budget if self.method in ("snapkv", "rkv") else float("inf")
        checks = [
            ("interval", self.interval, isinstance(self.interval, int) and self.interval >= 1),
            (
                "observation_window",
                self.observation_window,
                isinstance(self.observation_window, int) and 1 <= self.observation_window < limit,
            ),
            (
                "pool_kernel",
                self.pool_kernel,
                isinstance(self.pool_kernel, int) and self.pool_kernel > 0 and self.pool_kernel % 2,
            ),
            ("redundancy_lambda", self.redundancy_lambda, 0.0 <= self.redundancy_lambda <= 1.0),
            (
                "redundancy_threshold",
                self.redundancy_threshold,
                -1.0 <= self.redundancy_threshold <= 1.0,
            ),
        ]
        for name, value, ok in checks:
            if not ok:
                raise ValueError(
                    f"kv_compression.{name} is out of range: {value!r} (see docs/compression.md)"
                )

    @property
    def recent_window(self) -> int:
        """W: recent tokens the uniform trigger always keeps (default budget // 4)."""
        return self.window if self.window is not None else (self.budget or 0) // 4

    @classmethod
    def coerce(cls, value: CompressionConfig | dict[str, Any] | None) -> CompressionConfig | None:
        """Accept a config, a plain dict (as in a JSON request body) or None."""
        if value is None or isinstance(value, CompressionConfig):
            return value
        if not isinstance(value, dict):
            raise ValueError(f"kv_compression must be a dict or CompressionConfig, got {value!r}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(f"kv_compression: unknown field(s) {', '.join(unknown)}")
        return cls(**value)

    def to_dict(self) -> dict[str, Any]:
        """Plain dictionary (for reports and JSON)."""
        return asdict(self)
