"""DynTS training features of one trace: final hidden states and importance labels.

One pass of thinfer's own model over the whole trace, prefilled in chunks into a private KV
cache, gives both. The hidden state of token t is the vector after the last norm (what the
engine feeds the predictor when t is processed). The label of key position j is the mean,
over all layers, all query heads and all answer queries (positions >= answer_start), of the
attention probability to j, each query's attention to itself counted as zero (the mean still
divides by answer queries x layers x heads). The labels are column sums taken from the
step's own attention (`AttentionCapture`), at most `COLUMN_SUM_CHUNK` queries at a time, so a
16k-token trace never needs its full attention matrix.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from thinfer.attention.capture import AttentionCapture
from thinfer.attention.metadata import AttentionMetadata
from thinfer.engine.kv_cache import KVCache
from thinfer.models.llama import LlamaForCausalLM

DEFAULT_CHUNK = 512  # tokens prefilled per forward pass
BLOCK_SIZE = 16


class TraceFeatures(NamedTuple):
    """What training needs from one trace (float32, on the CPU)."""

    hidden: torch.Tensor  # [T, hidden]: final hidden state of every token
    labels: torch.Tensor  # [T]: importance of every key position for the answer


def _check(model: LlamaForCausalLM, token_ids: list[int], answer_start: int, chunk: int) -> None:
    total = len(token_ids)
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    if not 0 < answer_start < total:
        raise ValueError(
            f"answer_start must be inside the trace (0 < answer_start < {total}), "
            f"got {answer_start}: no answer tokens to take labels from"
        )
    context = model.config.max_position_embeddings
    if total > context:
        raise ValueError(f"trace of {total} tokens exceeds the model's context {context}")


@torch.inference_mode()
def trace_features(
    model: LlamaForCausalLM,
    token_ids: list[int],
    answer_start: int,
    chunk: int = DEFAULT_CHUNK,
) -> TraceFeatures:
    """Hidden states of all tokens and the importance label of every position of one trace.

    `answer_start` is the position of the first answer token (after the think-end marker).
    The result does not depend on `chunk` beyond float rounding.
    """
    _check(model, token_ids, answer_start, chunk)
    cfg = model.config
    param = next(model.parameters())
    device = param.device
    total = len(token_ids)
    cache = KVCache(cfg, -(-total // BLOCK_SIZE), BLOCK_SIZE, param.dtype, device)
    layer_caches = cache.layer_caches()
    # Blocks in order: slot s of the trace is flat slot s of the cache.
    block_table = torch.arange(cache.num_blocks, dtype=torch.long, device=device)[None]
    ids = torch.tensor(token_ids, dtype=torch.long, device=device)
    hidden_parts = []
    label_sums = torch.zeros(total, dtype=torch.float32, device=device)
    for start in range(0, total, chunk):
        end = min(total, start + chunk)
        capture = None
        if end > answer_start:  # this chunk holds answer queries
            capture = AttentionCapture({}, {0}, {0: answer_start}, exclude_self=True)
        slots = torch.arange(start, end, dtype=torch.long, device=device)
        meta = AttentionMetadata(
            slot_mapping=slots,
            block_tables=block_table,
            context_lens=torch.tensor([end], dtype=torch.long, device=device),
            context_lens_list=[end],
            query_lens_list=[end - start],
            query_starts_list=[0],
            num_decodes=0,
            block_size=BLOCK_SIZE,
            capture=capture,
        )
        hidden = model(ids[start:end], slots, layer_caches, meta)
        hidden_parts.append(hidden.float().cpu())
        if capture is not None:
            sums = capture.column_sums(0)  # [layers, kv_heads, end]
            assert sums is not None
            label_sums[:end] += sums.sum((0, 1))
    count = cfg.num_hidden_layers * cfg.num_attention_heads * (total - answer_start)
    return TraceFeatures(torch.cat(hidden_parts), (label_sums / count).cpu())
