"""`CompressionConfig`: which KV-cache compression a request uses, under which schedule.

Fields shared by every method: `method`, `budget`, `trigger` (the schedule), `window`,
`ratio`, `scoring`. Every other field belongs to the chosen method's own dataclass
(`thinfer.compression.methods`); a field of another method, or an unknown one, is a
ValueError naming it.

Schedules: "native" follows each method's original trigger and interval; "uniform" applies
one rule to every method (when the cache reaches `budget` slots, keep the `window` most recent
plus the top `floor(ratio * (L - window))` older ones by the method's score), so methods can
be compared at equal memory. Scoring: "per_head" (each layer and KV head keeps its own slots;
H2O, SnapKV and R-KV by default) or "shared" (one score per token, the mean over layers and
heads, one kept set for all: how the DynTS paper ran these baselines). Methods that score
tokens, not heads, are always "shared".
"""

from __future__ import annotations

import dataclasses
from typing import Any

from thinfer.compression.method import Method, check_type, method_class

TRIGGERS = ("native", "uniform")
SCORINGS = ("per_head", "shared")
COMMON_FIELDS = ("method", "budget", "trigger", "window", "ratio", "scoring")
# The DynTS paper's recent window: W = 2000 of B = 5000 (R1-Llama and R1-Qwen; 1000-1500 of
# B = 3000): 2/5 of the budget. The uniform schedule is that paper's rule, so it uses it too.
UNIFORM_WINDOW_FRACTION = 0.4


class CompressionConfig:
    """Per-request compression settings, validated on construction (immutable).

    `CompressionConfig("h2o", budget=256, window=32)`; method fields go in as keywords:
    `CompressionConfig("snapkv", budget=256, interval=64)`. `params` is the method's own
    dataclass instance; its fields are also readable as attributes of the config.
    """

    __slots__ = ("method", "budget", "trigger", "window", "ratio", "scoring", "params")

    method: str
    budget: int | None
    trigger: str
    window: int | None
    ratio: float
    scoring: str
    params: Method

    def __init__(
        self,
        method: str = "full",
        budget: int | None = None,
        trigger: str = "native",
        window: int | None = None,
        ratio: float = 0.3,
        scoring: str | None = None,
        **method_fields: Any,
    ) -> None:
        check_type("method", method, (str,))
        cls = method_class(method)
        own = {f.name for f in dataclasses.fields(cls)}
        stray = sorted(set(method_fields) - own)
        if stray:
            raise ValueError(_stray_message(method, stray, own))
        check_type("trigger", trigger, (str,))
        check_type("budget", budget, (int, type(None)))
        check_type("window", window, (int, type(None)))
        check_type("ratio", ratio, (int, float))
        check_type("scoring", scoring, (str, type(None)))
        if trigger not in TRIGGERS:
            raise ValueError(f"kv_compression.trigger must be one of {TRIGGERS}, got {trigger!r}")
        default_scoring = "per_head" if cls.per_head else "shared"
        scoring = scoring or default_scoring
        if scoring not in SCORINGS or (scoring == "per_head" and not cls.per_head):
            allowed = SCORINGS if cls.per_head else ("shared",)
            raise ValueError(
                f"kv_compression.scoring must be one of {allowed} for {method}, got {scoring!r}"
            )
        for name, value in zip(COMMON_FIELDS, (method, budget, trigger, window, float(ratio))):
            object.__setattr__(self, name, value)
        object.__setattr__(self, "scoring", scoring)
        try:
            params = cls(**method_fields)
        except TypeError as e:  # a required field is missing
            raise ValueError(f"kv_compression: {method}: {e}") from None
        object.__setattr__(self, "params", params)
        if method != "full":
            self._check_common()
        params.check(self)

    def _check_common(self) -> None:
        budget = self.budget
        if not isinstance(budget, int) or isinstance(budget, bool) or budget < 2:
            raise ValueError(f"kv_compression.budget must be an integer >= 2, got {budget!r}")
        if self.window is not None and not 0 <= self.window < budget:
            raise ValueError(
                f"kv_compression.window must be in [0, budget={budget}), got {self.window!r}"
            )
        if not 0.0 <= self.ratio < 1.0:
            raise ValueError(f"kv_compression.ratio must be in [0, 1), got {self.ratio!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("CompressionConfig is immutable")

    def __reduce__(self) -> tuple[Any, tuple[dict[str, Any]]]:
        """Pickled as its dict (sent to tensor-parallel ranks), validated again on load."""
        return _from_dict, (self.to_dict(),)

    def __getattr__(self, name: str) -> Any:
        params = object.__getattribute__(self, "params")
        if name in {f.name for f in dataclasses.fields(params)}:
            return getattr(params, name)
        raise AttributeError(f"{type(self).__name__} of {self.method!r} has no field {name!r}")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CompressionConfig) and self.to_dict() == other.to_dict()

    def __hash__(self) -> int:
        return hash(tuple(sorted((k, repr(v)) for k, v in self.to_dict().items())))

    def __repr__(self) -> str:
        body = ", ".join(f"{k}={v!r}" for k, v in self.to_dict().items())
        return f"CompressionConfig({body})"

    @property
    def per_head(self) -> bool:
        """True when each layer and KV head keeps its own slots."""
        return self.scoring == "per_head"

    @property
    def recent_window(self) -> int:
        """W: recent tokens the uniform schedule always keeps (default 2/5 of the budget)."""
        if self.window is not None:
            return self.window
        return int(UNIFORM_WINDOW_FRACTION * (self.budget or 0))

    @classmethod
    def coerce(cls, value: CompressionConfig | dict[str, Any] | None) -> CompressionConfig | None:
        """Accept a config, a plain dict (as in a JSON request body) or None."""
        if value is None or isinstance(value, CompressionConfig):
            return value
        if not isinstance(value, dict):
            raise ValueError(f"kv_compression must be a dict or CompressionConfig, got {value!r}")
        bad_keys = [k for k in value if not isinstance(k, str)]
        if bad_keys:
            raise ValueError(f"kv_compression: field names must be strings, got {bad_keys[0]!r}")
        return cls(**value)

    def to_dict(self) -> dict[str, Any]:
        """Plain dictionary of every field, common and the method's (for reports and JSON)."""
        common = {name: getattr(self, name) for name in COMMON_FIELDS}
        return {**common, **dataclasses.asdict(self.params)}


def _stray_message(method: str, stray: list[str], own: set[str]) -> str:
    from thinfer.compression.method import METHODS

    owners = {
        name: [m for m, c in METHODS.items() if name in {f.name for f in dataclasses.fields(c)}]
        for name in stray
    }
    parts = []
    for name in stray:
        if owners[name]:
            parts.append(f"{name!r} belongs to {', '.join(owners[name])}, not {method}")
        else:
            parts.append(f"unknown field {name!r}")
    fields = ", ".join(COMMON_FIELDS + tuple(sorted(own))) or "none"
    return f"kv_compression: {'; '.join(parts)} (fields of {method}: {fields})"


def scoring_field(method: str, scoring: str) -> dict[str, str]:
    """`{"scoring": scoring}` for a method that scores per head and is asked to score
    `shared`; {} otherwise (token-scoring methods are always shared, per_head is the
    default). Lets tools apply one `--scoring` to a list of methods."""
    if scoring not in SCORINGS:
        raise ValueError(f"--scoring must be one of {SCORINGS}, got {scoring!r}")
    return {"scoring": scoring} if scoring == "shared" and method_class(method).per_head else {}


BUILTIN_ORDER = (
    "full", "window", "streamingllm", "sepllm", "h2o", "snapkv", "rkv", "dynts", "dynts-h2o",
)  # fmt: skip


def needs_predictor(method: str) -> bool:
    """True for a method scored by a DynTS importance head (it has a `predictor` field):
    tools then ask for `--predictor` and pass the think-end marker."""
    return "predictor" in {f.name for f in dataclasses.fields(method_class(method))}


def all_method_names() -> tuple[str, ...]:
    """Every registered method name: the built-ins in their usual order, then the others."""
    from thinfer.compression.method import METHODS

    method_class("full")  # registers the built-ins
    return BUILTIN_ORDER + tuple(name for name in METHODS if name not in BUILTIN_ORDER)


def _from_dict(fields: dict[str, Any]) -> CompressionConfig:
    """Unpickle a `CompressionConfig` (see `CompressionConfig.__reduce__`)."""
    return CompressionConfig(**fields)
