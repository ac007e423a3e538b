"""`SamplingParams`: how one request is decoded (vLLM's names and defaults)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from thinfer.compression.config import CompressionConfig
from thinfer.outputs import RequestOutputKind

GREEDY_BELOW = 1e-5
# A positive logit is divided by the penalty, a negative one multiplied: outside this range a
# penalty overflows or zeroes the logits (1e-300 made every logit inf and sampling fail).
REPETITION_PENALTY_RANGE = (0.01, 100.0)


@dataclass
class SamplingParams:
    """Decoding settings of one request.

    `temperature == 0` means greedy. `top_k == -1` (or 0) disables top-k, `top_p == 1`
    disables nucleus sampling, `min_p == 0` disables min-p. `seed` makes the request's
    samples reproducible whatever else is batched with it; with `n > 1`, sample i uses
    `seed + i`. `stop` strings end the output and are not included in its text.
    `logprobs=k` returns, per generated token, the log-probability of the chosen token and of
    the k most likely ones (k=0: the chosen token only). `kv_compression` chooses this
    request's KV-cache compression (a `CompressionConfig` or a dict such as
    `{"method": "window", "budget": 1024}`); None uses the engine's default.
    `output_kind` says what the request's outputs carry (see `thinfer.outputs`): DELTA
    (intermediate outputs hold only what is new, the final one the full lists) or CUMULATIVE.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    max_tokens: int = 16
    min_tokens: int = 0
    stop: list[str] | str | None = None
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None
    skip_special_tokens: bool = True
    kv_compression: CompressionConfig | dict[str, Any] | None = None
    forced_tokens: list[int] = field(default_factory=list)  # replay: the first output tokens
    output_kind: RequestOutputKind = RequestOutputKind.DELTA

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        self.kv_compression = CompressionConfig.coerce(self.kv_compression)
        _check(isinstance(self.n, int) and self.n >= 1, "n", self.n, "an integer >= 1")
        _check(
            _is_number(self.temperature) and self.temperature >= 0,
            "temperature",
            self.temperature,
            ">= 0",
        )
        _check(_is_number(self.top_p) and 0 < self.top_p <= 1, "top_p", self.top_p, "in (0, 1]")
        _check(
            isinstance(self.top_k, int) and self.top_k >= -1,
            "top_k",
            self.top_k,
            "an integer >= -1 (-1 or 0 disables it)",
        )
        _check(_is_number(self.min_p) and 0 <= self.min_p <= 1, "min_p", self.min_p, "in [0, 1]")
        _check(
            _is_number(self.repetition_penalty)
            and REPETITION_PENALTY_RANGE[0]
            <= self.repetition_penalty
            <= REPETITION_PENALTY_RANGE[1],
            "repetition_penalty",
            self.repetition_penalty,
            f"in [{REPETITION_PENALTY_RANGE[0]}, {REPETITION_PENALTY_RANGE[1]}] (1 disables it)",
        )
        _check(
            isinstance(self.max_tokens, int) and self.max_tokens >= 1,
            "max_tokens",
            self.max_tokens,
            "an integer >= 1",
        )
        _check(
            isinstance(self.min_tokens, int) and 0 <= self.min_tokens <= self.max_tokens,
            "min_tokens",
            self.min_tokens,
            "an integer in [0, max_tokens]",
        )
        _check(
            self.seed is None or isinstance(self.seed, int), "seed", self.seed, "an integer or None"
        )
        _check(
            self.logprobs is None or (isinstance(self.logprobs, int) and self.logprobs >= 0),
            "logprobs",
            self.logprobs,
            "None or an integer >= 0",
        )
        _check(
            all(isinstance(s, str) and s for s in self.stop), "stop", self.stop, "non-empty strings"
        )
        self.forced_tokens = list(self.forced_tokens or [])
        _check(
            all(
                isinstance(t, int) and not isinstance(t, bool) and t >= 0
                for t in self.forced_tokens
            )
            and len(self.forced_tokens) <= self.max_tokens,
            "forced_tokens",
            f"{len(self.forced_tokens)} tokens",
            "non-negative token ids, at most max_tokens of them",
        )
        _check(
            all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids),
            "stop_token_ids",
            self.stop_token_ids,
            "non-negative integers",
        )
        if isinstance(self.output_kind, str):
            self.output_kind = RequestOutputKind(self.output_kind)
        _check(
            isinstance(self.output_kind, RequestOutputKind),
            "output_kind",
            self.output_kind,
            "a RequestOutputKind",
        )

    @property
    def greedy(self) -> bool:
        """True when decoding takes the argmax token: temperature below `GREEDY_BELOW`
        (as in vLLM; dividing logits by a tinier temperature would overflow them)."""
        return self.temperature < GREEDY_BELOW


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _check(ok: bool, name: str, value: object, expected: str) -> None:
    if not ok:
        raise ValueError(f"SamplingParams.{name} must be {expected}, got {value!r}")
