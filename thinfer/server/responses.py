"""OpenAI response bodies and stream chunks, built from `RequestOutput`s.

One HTTP request may hold several prompts (completions), each with `n` samples: the choice
of prompt i, sample j has index `i * n + j`, as in OpenAI's API. `finish_reason` is "stop",
"length", or "abort" (the request was aborted, e.g. at shutdown).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from thinfer.outputs import CompletionOutput, RequestOutput

Kind = Literal["completion", "chat"]
TokenText = Callable[[int], str]


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    """OpenAI's `usage` object."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _finite(value: float) -> float:
    return value if math.isfinite(value) else -9999.0


def _top(entries: dict[int, float], k: int) -> list[tuple[int, float]]:
    return sorted(entries.items(), key=lambda kv: -kv[1])[:k]


def completion_logprobs(
    token_ids: list[int],
    logprobs: list[dict[int, float]],
    k: int,
    token_text: TokenText,
    offset: int = 0,
) -> dict[str, Any]:
    """The legacy completions `logprobs` object for these tokens (text offsets from `offset`)."""
    tokens, token_logprobs, tops, offsets = [], [], [], []
    for token, entries in zip(token_ids, logprobs):
        text = token_text(token)
        tokens.append(text)
        token_logprobs.append(_finite(entries.get(token, -math.inf)))
        tops.append({token_text(t): _finite(lp) for t, lp in _top(entries, k)} if k else None)
        offsets.append(offset)
        offset += len(text)
    return {
        "tokens": tokens,
        "token_logprobs": token_logprobs,
        "top_logprobs": tops,
        "text_offset": offsets,
    }


def chat_logprobs(
    token_ids: list[int], logprobs: list[dict[int, float]], k: int, token_text: TokenText
) -> dict[str, Any]:
    """The chat `logprobs` object: `{"content": [{token, logprob, bytes, top_logprobs}]}`."""

    def entry(token: int, lp: float) -> dict[str, Any]:
        text = token_text(token)
        return {"token": text, "logprob": _finite(lp), "bytes": list(text.encode("utf-8"))}

    content = []
    for token, entries in zip(token_ids, logprobs):
        item = entry(token, entries.get(token, -math.inf))
        item["top_logprobs"] = [entry(t, lp) for t, lp in _top(entries, k)]
        content.append(item)
    return {"content": content}


@dataclass
class ResponseBuilder:
    """Builds the full response, or the stream chunks, of one HTTP request.

    `logprobs_k` is None when no logprobs were asked; `request_ids` are the engine requests
    in prompt order.
    """

    kind: Kind
    response_id: str
    model: str
    request_ids: list[str]
    n: int
    logprobs_k: int | None
    token_text: TokenText
    created: int = field(default_factory=lambda: int(time.time()))
    _finals: dict[str, RequestOutput] = field(default_factory=dict)
    _finished: set[int] = field(default_factory=set)
    _offsets: dict[int, int] = field(default_factory=dict)

    def _index(self, out: RequestOutput, completion: CompletionOutput) -> int:
        return self.request_ids.index(out.request_id) * self.n + completion.index

    def _logprobs(
        self, tokens: list[int], entries: list[dict[int, float]] | None, index: int
    ) -> Any:
        """The logprobs object of `tokens` (their `entries`), None when none were asked."""
        if self.logprobs_k is None or entries is None:
            return None
        if self.kind == "chat":
            return chat_logprobs(tokens, entries, self.logprobs_k, self.token_text)
        result = completion_logprobs(
            tokens, entries, self.logprobs_k, self.token_text, self._offsets.get(index, 0)
        )
        if result["tokens"]:
            self._offsets[index] = result["text_offset"][-1] + len(result["tokens"][-1])
        return result

    def usage(self) -> dict[str, int]:
        """Token counts of everything that finished (prompts counted once, not per sample)."""
        prompt = sum(len(out.prompt_token_ids) for out in self._finals.values())
        completion = sum(len(c.token_ids) for out in self._finals.values() for c in out.outputs)
        return usage(prompt, completion)

    def record(self, out: RequestOutput) -> None:
        """Remember a final output (for the full response and for usage)."""
        if out.finished:
            self._finals[out.request_id] = out

    # ----- full responses ---------------------------------------------------------------
    def response(self) -> dict[str, Any]:
        """The non-streamed response body, once every request finished."""
        choices = []
        for out in (self._finals[rid] for rid in self.request_ids):
            for c in out.outputs:
                index = self._index(out, c)
                logprobs = self._logprobs(c.token_ids, c.logprobs, index)
                if self.kind == "chat":
                    message = {"role": "assistant", "content": c.text}
                    choice = {"index": index, "message": message}
                else:
                    choice = {"index": index, "text": c.text}
                choice.update(logprobs=logprobs, finish_reason=c.finish_reason)
                choices.append(choice)
        choices.sort(key=lambda ch: ch["index"])
        obj = "chat.completion" if self.kind == "chat" else "text_completion"
        return {**self._head(obj), "choices": choices, "usage": self.usage()}

    # ----- stream chunks ----------------------------------------------------------------
    def _head(self, obj: str) -> dict[str, Any]:
        return {"id": self.response_id, "object": obj, "created": self.created, "model": self.model}

    def _chunk(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        obj = "chat.completion.chunk" if self.kind == "chat" else "text_completion"
        return {**self._head(obj), "choices": choices}

    def first_chunks(self) -> list[dict[str, Any]]:
        """Chat streams open with the assistant role for every choice."""
        if self.kind != "chat":
            return []
        total = len(self.request_ids) * self.n
        delta = {"role": "assistant", "content": ""}
        return [
            self._chunk([{"index": i, "delta": delta, "logprobs": None, "finish_reason": None}])
            for i in range(total)
        ]

    def chunks(self, out: RequestOutput) -> list[dict[str, Any]]:
        """The chunks for what `out` adds: new text, and finish reasons not yet sent."""
        self.record(out)
        result = []
        for c in out.outputs:
            index = self._index(out, c)
            if index in self._finished:
                continue
            carries_logprobs = self.logprobs_k is not None and bool(c.delta_token_ids)
            if not (c.delta_text or c.finish_reason or carries_logprobs):
                continue  # e.g. text held back while it may still become a stop string
            if c.finish_reason is not None:
                self._finished.add(index)
            logprobs = self._logprobs(c.delta_token_ids, c.delta_logprobs, index)
            if self.kind == "chat":
                delta = {"content": c.delta_text} if c.delta_text else {}
                choice: dict[str, Any] = {"index": index, "delta": delta}
            else:
                choice = {"index": index, "text": c.delta_text}
            choice.update(logprobs=logprobs, finish_reason=c.finish_reason)
            result.append(self._chunk([choice]))
        return result

    def usage_chunk(self) -> dict[str, Any]:
        """The last chunk when `stream_options.include_usage`: no choices, the usage."""
        return {**self._chunk([]), "usage": self.usage()}
