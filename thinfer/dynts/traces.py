"""Reasoning traces as token ids: the unit DynTS labels, trains on and replays.

A trace is `prompt` followed by a `completion` = thinking, the think-end marker, the answer.
On disk: JSONL, one trace per line, either as token ids

    {"id": "p1", "prompt_token_ids": [...], "completion_token_ids": [...], "answer": "42"}

or as text (tokenized with the model's tokenizer when read)

    {"id": "p1", "prompt": "...", "completion": "... </think> The answer is 42.", "answer": "42"}

`answer` (the reference final answer, optional) travels along for grading. The marker is
found by its token ids (`think_end_token_ids`, e.g. the ids of "</think>" for the model).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from thinfer.loading.tokenizer import Tokenizer

DEFAULT_THINK_END = "</think>"


@dataclass
class Trace:
    """One trace as token ids."""

    id: str
    prompt_token_ids: list[int]
    completion_token_ids: list[int]
    answer: str | None = None

    @property
    def token_ids(self) -> list[int]:
        """Prompt followed by completion."""
        return self.prompt_token_ids + self.completion_token_ids

    def answer_start(self, think_end_token_ids: Sequence[int]) -> int | None:
        """Absolute position of the first token after the first think-end marker in the
        completion, or None when the completion has no marker."""
        marker = list(think_end_token_ids)
        ids = self.completion_token_ids
        for i in range(len(ids) - len(marker) + 1):
            if ids[i : i + len(marker)] == marker:
                return len(self.prompt_token_ids) + i + len(marker)
        return None

    def to_json(self) -> dict[str, Any]:
        """The token-id form written to JSONL."""
        return asdict(self)


def think_end_ids(tokenizer: Tokenizer, marker: str = DEFAULT_THINK_END) -> list[int]:
    """Token ids of the think-end marker for this tokenizer (a special token or a few
    ordinary ones)."""
    ids = tokenizer.encode(marker, add_special_tokens=False)
    if not ids:
        raise ValueError(f"the think-end marker {marker!r} encodes to no tokens")
    return ids


def trace_from_record(record: dict[str, Any], tokenizer: Tokenizer | None, line: int) -> Trace:
    """Parse one JSONL record (token-id or text form); ValueError names the line and field."""
    where = f"trace line {line}"
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object")
    trace_id = str(record.get("id", line))
    answer = record.get("answer")
    if answer is not None and not isinstance(answer, str | int | float):
        raise ValueError(f"{where}: answer must be a string or a number")
    ids = {}
    for part in ("prompt", "completion"):
        if f"{part}_token_ids" in record:
            value = record[f"{part}_token_ids"]
            if not isinstance(value, list) or not all(
                isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in value
            ):
                raise ValueError(f"{where}: {part}_token_ids must be a list of token ids")
            ids[part] = value
        elif isinstance(record.get(part), str):
            if tokenizer is None:
                raise ValueError(f"{where}: text traces need the model's tokenizer")
            ids[part] = tokenizer.encode(record[part])
        else:
            raise ValueError(f"{where}: needs {part!r} (text) or {part}_token_ids")
    if not ids["prompt"] or not ids["completion"]:
        raise ValueError(f"{where}: prompt and completion must not be empty")
    return Trace(
        trace_id, ids["prompt"], ids["completion"], None if answer is None else str(answer)
    )


def read_jsonl(path: str, kind: str) -> Iterator[tuple[int, Any]]:
    """(line number, parsed value) of every non-blank line of a JSONL file; ValueError naming
    the `kind` of record ("trace", "problem") and the line that is not JSON."""
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: {kind} line {number} is not JSON ({e.msg})") from e


def read_traces(path: str, tokenizer: Tokenizer | None = None) -> list[Trace]:
    """All traces of a JSONL file (blank lines skipped)."""
    traces = [trace_from_record(r, tokenizer, n) for n, r in read_jsonl(path, "trace")]
    if not traces:
        raise ValueError(f"{path}: no traces")
    return traces


def write_traces(path: str, traces: Iterable[Trace]) -> None:
    """Write traces in the token-id form."""
    with open(path, "w", encoding="utf-8") as f:
        for trace in traces:
            f.write(json.dumps(trace.to_json()) + "\n")
