"""The method interface: a compression method is a small frozen dataclass of its own
hyperparameters, registered by name, whose one job is to score cached tokens.

A method never touches the engine, the cache or the model. It declares as data what it needs
(`Signals`: attention column sums, the last queries, hidden states, keys) and, given those in
a `ScoreContext`, returns one score per older slot. Which slots are kept, and when, is decided
by the schedules (`thinfer.compression.schedule`), the same rule for every method.

Everything a method sees is in *position order*: slot j of the context is the j-th oldest
cached token (of that layer and KV head, for per-head state), whatever physical slot holds it.
The last `num_recent` entries are the recent window, which is always kept; scores are asked
for the `num_old` entries before it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch

if TYPE_CHECKING:
    from thinfer.compression.config import CompressionConfig


@dataclass(frozen=True)
class Signals:
    """What a method needs from each step besides token ids.

    `column_sums`: the attention probability every cached key received from this step's
    queries, per layer and KV head (H2O). `query_window`: the rotated queries of the last
    this-many fed tokens of every layer (SnapKV, R-KV). `hidden_states`: the final hidden
    state of each fed token, scored on arrival by `Method.score_hidden` (DynTS). `keys`: the
    cached keys at scoring time.
    """

    column_sums: bool = False
    query_window: int = 0
    hidden_states: bool = False
    keys: bool = False


@dataclass
class ScoreContext:
    """What a method may read when scoring (position order, see the module docstring)."""

    kv_len: int
    num_recent: int
    num_generated: int
    prompt_len: int
    positions: torch.Tensor  # [n] or [layers, kv_heads, n] original token positions
    values: dict[str, torch.Tensor]  # per-slot state named in `Method.slot_values`
    token_ids: Callable[[torch.Tensor], torch.Tensor]  # token id at each given position
    keys: Callable[[int], torch.Tensor] | None = None  # layer -> [n, kv_heads, D]
    queries: torch.Tensor | None = None  # [layers, w, heads, D], oldest first
    num_layers: int = 0
    resources: Any = None  # what `Method.prepare` loaded (predictor, separator ids)
    uniform: bool = False  # scoring for the uniform schedule (which keeps exactly `count`)

    @property
    def num_old(self) -> int:
        """Slots older than the recent window: the ones a method scores."""
        return self.kv_len - self.num_recent


@dataclass(frozen=True)
class Method:
    """Base of all methods: a method's fields are its hyperparameters (validated in
    `check`); class attributes say what kind of state and signals it needs."""

    name: ClassVar[str] = ""
    per_head: ClassVar[bool] = False  # its scores differ per layer and KV head
    slot_values: ClassVar[tuple[str, ...]] = ()  # per-slot float state the stage keeps
    protects_prompt: ClassVar[bool] = False  # prompt slots are never evicted
    # Scores depend only on each slot's own data (no neighbours, no order): the stage then
    # scores every slot where it lies (num_recent 0, slot order), with no reordering.
    pointwise: ClassVar[bool] = False

    def signals(self) -> Signals:
        """The signals the method needs (none by default)."""
        return Signals()

    def check(self, config: CompressionConfig) -> None:
        """Raise ValueError naming the field when a value is out of range for `config`."""

    def prepare(self, context: PrepareContext) -> Any:
        """Load what the method needs from the model's side (a predictor file, separator
        ids); called at admission so a bad file fails its own request. Returns resources
        handed back in `ScoreContext.resources`."""
        return None

    def native_rule(self, config: CompressionConfig, ctx: RuleContext) -> tuple[int, int] | None:
        """The method's own schedule: (recent, older) slots to keep now, or None to wait.

        The default, once the cache holds `budget` slots: the last `config.window` (or half
        the budget) plus `budget - 1 - recent` older ones, so the cache holds `budget` once
        the new token is written.
        """
        budget = config.budget
        assert budget is not None
        if ctx.kv_len < budget:
            return None
        recent = min(config.window if config.window is not None else budget // 2, budget - 1)
        return recent, budget - 1 - recent

    def peak_slots(self, config: CompressionConfig, prompt_len: int, max_tokens: int) -> int:
        """The most KV slots a request can occupy (admission reserves this much).

        Prefill is never compressed; afterwards a bounded schedule stays within its budget.
        """
        full = prompt_len + max_tokens
        if config.budget is None:
            return full
        return min(full, max(prompt_len, config.budget))

    def score(self, ctx: ScoreContext) -> torch.Tensor:
        """Scores of the `ctx.num_old` older slots, higher = keep: [num_old] or, for per-head
        methods, [layers, kv_heads, num_old]. A slot scored -inf is never kept (the count
        shrinks), +inf always (the count grows), and ties go to the older slot."""
        raise NotImplementedError(f"{self.name} does not define score")

    def answer_start(self, output_tokens: list[int], checked: int) -> int | None:
        """Index into `output_tokens` from which every token is kept for good (an answer
        after a think-end marker), or None; the first `checked` tokens were seen before."""
        return None

    def score_hidden(self, resources: Any, hidden: torch.Tensor) -> torch.Tensor:
        """Scores [b] of the tokens whose final hidden states are hidden [b, d]."""
        raise NotImplementedError(f"{self.name} does not score hidden states")

    def batch_key(self) -> Any:
        """Rows whose key is equal share one `score_hidden` call in a step."""
        return dataclasses.astuple(self)


@dataclass(frozen=True)
class PrepareContext:
    """The model-side facts `Method.prepare` may use."""

    hidden_size: int
    dtype: torch.dtype
    device: torch.device
    tokenizer: Any = None


@dataclass(frozen=True)
class RuleContext:
    """What a schedule knows when deciding whether to compress."""

    kv_len: int
    num_generated: int
    prompt_len: int


METHODS: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make a method available by its `name` (the `kv_compression.method`
    value). Registering a name twice replaces the earlier class (tests register toys)."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    METHODS[cls.name] = cls
    return cls


def method_class(name: str) -> type[Method]:
    """The registered method called `name`; ValueError listing the known ones otherwise."""
    import thinfer.compression.methods  # noqa: F401  (registers the built-in methods)

    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(
            f"kv_compression.method: unknown {name!r}; available: {', '.join(METHODS)}"
        ) from None


def check_type(name: str, value: Any, types: tuple[type, ...]) -> None:
    """Wrong types raise ValueError naming the field (never a TypeError later)."""
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
        kinds = " or ".join("None" if t is type(None) else t.__name__ for t in types)
        raise ValueError(f"kv_compression.{name} must be {kinds}, got {value!r}")


def check_range(name: str, value: Any, ok: bool) -> None:
    """ValueError naming the field when `ok` is False."""
    if not ok:
        raise ValueError(
            f"kv_compression.{name} is out of range: {value!r} (see docs/compression.md)"
        )
