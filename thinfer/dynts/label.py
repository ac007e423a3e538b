"""`thinfer dynts label`: hidden states and importance labels of every trace, computed once
and cached in a features file (see `thinfer.dynts.feature_file`)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

import torch
from tqdm import tqdm

from thinfer.dynts.feature_file import FORMAT, VERSION, thinking_mask
from thinfer.dynts.features import DEFAULT_CHUNK, trace_features
from thinfer.dynts.traces import Trace
from thinfer.models.llama import LlamaForCausalLM

NO_MARKER = "no think-end marker"
NO_ANSWER = "no answer after the marker"
TOO_LONG = "longer than the model's context"
NO_THINKING = "no thinking tokens"

HIDDEN_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def skip_reason(trace: Trace, think_end: Sequence[int], context: int) -> str | None:
    """Why `trace` cannot be labelled, or None when it can."""
    answer_start = trace.answer_start(think_end)
    if answer_start is None:
        return NO_MARKER
    total = len(trace.token_ids)
    if answer_start >= total:
        return NO_ANSWER
    if total > context:
        return TOO_LONG
    prompt_len = len(trace.prompt_token_ids)
    if not bool(thinking_mask(total, prompt_len, answer_start, len(think_end)).any()):
        return NO_THINKING
    return None


def label_traces(
    model: LlamaForCausalLM,
    traces: list[Trace],
    think_end: Sequence[int],
    chunk: int = DEFAULT_CHUNK,
    hidden_dtype: torch.dtype = torch.float32,
    model_name: str = "",
    progress: bool = True,
) -> dict[str, Any]:
    """The features dict of all usable traces (skipped ones counted by reason)."""
    if not think_end:
        raise ValueError("the think-end marker has no token ids")
    cfg = model.config
    skipped: Counter[str] = Counter()
    entries = []
    for trace in tqdm(traces, desc="label", unit="trace", disable=not progress):
        reason = skip_reason(trace, think_end, cfg.max_position_embeddings)
        if reason is not None:
            skipped[reason] += 1
            continue
        answer_start = trace.answer_start(think_end)
        assert answer_start is not None
        ids = trace.token_ids
        features = trace_features(model, ids, answer_start, chunk)
        prompt_len = len(trace.prompt_token_ids)
        entries.append(
            {
                "id": trace.id,
                "prompt_len": prompt_len,
                "answer_start": answer_start,
                "hidden": features.hidden.to(hidden_dtype),
                "labels": features.labels,
                "thinking_mask": thinking_mask(len(ids), prompt_len, answer_start, len(think_end)),
            }
        )
    return {
        "format": FORMAT,
        "version": VERSION,
        "model": model_name,
        "hidden_size": cfg.hidden_size,
        "num_layers": cfg.num_hidden_layers,
        "num_heads": cfg.num_attention_heads,
        "think_end_token_ids": list(think_end),
        "skipped": dict(skipped),
        "traces": entries,
    }
