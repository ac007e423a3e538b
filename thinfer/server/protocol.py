"""Request bodies of the OpenAI-compatible API (pydantic), and their `SamplingParams`.

Bodies are validated strictly from JSON: `"max_tokens": "5"` is a type error, not 5. Unknown
fields are 400s naming the field. OpenAI fields that thinfer cannot honour (penalties, logit
bias, tools, echo, ...) are accepted only at their neutral value. vLLM-style extra fields:
`top_k`, `min_p`, `repetition_penalty`, `min_tokens`, `ignore_eos`, `stop_token_ids`,
`skip_special_tokens` and `kv_compression` (a dict for `CompressionConfig`).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from thinfer.compression.config import CompressionConfig
from thinfer.sampling_params import SamplingParams
from thinfer.server.errors import bad_request

MAX_N = 128
MAX_LOGPROBS = 20
# Bounds on the work one request may ask for (each a 400 beyond it, never a retryable 429).
MAX_PROMPTS = 256  # prompts in one completions request
MAX_SEQUENCES = 512  # prompts x n
MAX_STOP_STRINGS = 32  # each checked against the new text at every step
MAX_STOP_CHARS = 512
MAX_STOP_TOKEN_IDS = 1024
_INT64 = 2**63


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)


class StreamOptions(_Strict):
    """`stream_options`: `include_usage` adds a last chunk with the token counts."""

    include_usage: bool = False


class _SamplingFields(_Strict):
    """Fields shared by completions and chat completions."""

    model: str | None = None
    n: int = Field(1, ge=1, le=MAX_N)
    temperature: float | None = None
    top_p: float | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-_INT64, lt=_INT64)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # Accepted only at their neutral value.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    # vLLM-style extras.
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int = 0
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool = True
    kv_compression: dict[str, Any] | None = None

    def _check_bounds(self, prompts: int) -> None:
        if prompts > MAX_PROMPTS:
            raise bad_request(f"prompt: at most {MAX_PROMPTS} prompts per request", "prompt")
        if prompts * self.n > MAX_SEQUENCES:
            message = f"n: prompts x n must be at most {MAX_SEQUENCES}, got {prompts * self.n}"
            raise bad_request(message, "n")
        stops = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        if len(stops) > MAX_STOP_STRINGS or any(len(s) > MAX_STOP_CHARS for s in stops):
            message = f"stop: at most {MAX_STOP_STRINGS} strings of at most {MAX_STOP_CHARS} chars"
            raise bad_request(message, "stop")
        if len(self.stop_token_ids or []) > MAX_STOP_TOKEN_IDS:
            message = f"stop_token_ids: at most {MAX_STOP_TOKEN_IDS} ids"
            raise bad_request(message, "stop_token_ids")

    def _check_common(self) -> None:
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name) != 0:
                raise bad_request(f"{name} is not supported (only 0)", name)
        if self.logit_bias:
            raise bad_request("logit_bias is not supported", "logit_bias")
        if self.stream_options is not None and not self.stream:
            message = "stream_options is only allowed when stream is true"
            raise bad_request(message, "stream_options")

    def _sampling_params(self, max_tokens: int, logprobs: int | None) -> SamplingParams:
        try:
            compression = CompressionConfig.coerce(self.kv_compression)
        except (ValueError, TypeError) as e:  # a wrong type inside the dict raises TypeError
            message = str(e)
            if not message.startswith("kv_compression"):
                message = f"kv_compression: {message}"
            raise bad_request(message, "kv_compression") from e
        temperature = 1.0 if self.temperature is None else self.temperature  # < 1e-5: greedy
        values: dict[str, Any] = dict(
            n=self.n,
            temperature=temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=-1 if self.top_k is None else self.top_k,
            min_p=0.0 if self.min_p is None else self.min_p,
            repetition_penalty=1.0 if self.repetition_penalty is None else self.repetition_penalty,
            seed=self.seed,
            max_tokens=max_tokens,
            min_tokens=self.min_tokens,
            stop=self.stop,
            stop_token_ids=self.stop_token_ids or [],
            ignore_eos=self.ignore_eos,
            logprobs=logprobs,
            skip_special_tokens=self.skip_special_tokens,
            kv_compression=compression,
        )
        return SamplingParams(**values)

    @property
    def include_usage(self) -> bool:
        """True when the stream ends with a usage chunk."""
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_SamplingFields):
    """`POST /v1/completions`."""

    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = 16
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    def prompts(self) -> list[str | list[int]]:
        """The prompt(s) as a list: one string or one token-id list per entry."""
        prompt = self.prompt
        if isinstance(prompt, str):
            return [prompt]
        if not prompt:
            raise bad_request("prompt is empty", "prompt")
        if isinstance(prompt[0], int):
            return [prompt]  # type: ignore[list-item]
        return list(prompt)  # type: ignore[arg-type]

    def to_sampling_params(self) -> SamplingParams:
        """Validated SamplingParams (raises APIError 400, or ValueError naming the field)."""
        self._check_common()
        self._check_bounds(len(self.prompts()))
        if self.echo:
            raise bad_request("echo is not supported", "echo")
        if self.suffix:
            raise bad_request("suffix is not supported", "suffix")
        if self.best_of is not None and self.best_of != self.n:
            raise bad_request("best_of is not supported (only best_of == n)", "best_of")
        return self._sampling_params(
            16 if self.max_tokens is None else self.max_tokens, self.logprobs
        )


class TextPart(_Strict):
    """A text part of a message's content (the only kind thinfer reads)."""

    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    """One message: `role` and `content` (a string or a list of text parts)."""

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def to_dict(self) -> dict[str, str]:
        """`{"role", "content"}` for the chat template (text parts joined)."""
        content = self.content
        if isinstance(content, list):
            content = "".join(part.text for part in content)
        return {"role": self.role, "content": content or ""}


class ResponseFormat(_Strict):
    """`response_format`: only plain text is produced."""

    type: Literal["text"]


class ChatCompletionRequest(_SamplingFields):
    """`POST /v1/chat/completions`."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    response_format: ResponseFormat | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | None = None
    parallel_tool_calls: bool | None = None

    def message_dicts(self) -> list[dict[str, str]]:
        """The conversation as plain dicts."""
        return [m.to_dict() for m in self.messages]

    @property
    def requested_max_tokens(self) -> int | None:
        """`max_completion_tokens`, else `max_tokens`; None: up to the end of the context."""
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens
        return self.max_tokens

    def to_sampling_params(self) -> SamplingParams:
        """Validated SamplingParams; when no max is given, `max_tokens` is a placeholder that
        the engine thread replaces by the room left in the context."""
        self._check_common()
        self._check_bounds(1)
        if self.tools:
            raise bad_request("tools are not supported", "tools")
        if self.tool_choice not in (None, "none"):
            raise bad_request("tool_choice is not supported", "tool_choice")
        if self.top_logprobs is not None and not self.logprobs:
            raise bad_request("top_logprobs needs logprobs to be true", "top_logprobs")
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        requested = self.requested_max_tokens
        placeholder = max(1, self.min_tokens) if requested is None else requested
        try:
            return self._sampling_params(placeholder, logprobs)
        except ValueError as e:
            if requested is None or self.max_tokens is not None:
                raise
            raise ValueError(str(e).replace("max_tokens", "max_completion_tokens")) from e
