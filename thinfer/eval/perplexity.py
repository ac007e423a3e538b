"""Perplexity of a model on token windows, through thinfer's own forward pass.

Each window is scored on its own from its first token: a prefill of the whole window into a
private paged KV cache (the engine's cache and its requests are left alone) gives the logits
of every position, and tokens 1..L-1 are predicted. Several windows go through one forward
pass as a batch of prefills. The log-softmax is taken in float32 whatever the model's dtype.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from thinfer.attention.metadata import AttentionMetadata
from thinfer.engine.kv_cache import KVCache

if TYPE_CHECKING:
    from thinfer.llm import LLM
    from thinfer.models.llama import LlamaForCausalLM

LOGIT_ROWS = 1024  # rows of logits turned into log-probabilities at a time


def _check(llm: LLM, windows: list[list[int]], batch_size: int) -> int:
    """The common window length, after checking the inputs."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not windows:
        raise ValueError("no windows to score")
    length = len(windows[0])
    if length < 2 or any(len(w) != length for w in windows):
        raise ValueError(
            f"windows must all have the same length >= 2, got lengths "
            f"{sorted({len(w) for w in windows})}"
        )
    if llm.loaded.net.layout.world_size != 1:
        raise ValueError("perplexity runs one process's model: use tensor_parallel_size=1")
    context = llm.model_config.max_position_embeddings
    if length > context:
        raise ValueError(f"window of {length} tokens exceeds the model's context {context}")
    vocab = llm.model_config.vocab_size
    if any(t < 0 or t >= vocab for w in windows for t in w):
        raise ValueError(f"token ids must be in [0, {vocab})")
    return length


def _batch_nll(
    net: LlamaForCausalLM, cache: KVCache, batch: list[list[int]], blocks_per_window: int
) -> float:
    """Summed negative log-likelihood of tokens 1..L-1 of every window in `batch`."""
    device = cache.storage.device
    length, n = len(batch[0]), len(batch)
    block_size = cache.block_size
    positions = torch.arange(length, dtype=torch.long, device=device)
    # Window i holds blocks [i*blocks_per_window, (i+1)*blocks_per_window) in order.
    tables = torch.arange(n * blocks_per_window, dtype=torch.long, device=device)
    tables = tables.view(n, blocks_per_window)
    slots = (tables[:, :1] * block_size + positions[None]).reshape(-1)
    meta = AttentionMetadata(
        slot_mapping=slots,
        block_tables=tables,
        context_lens=torch.full((n,), length, dtype=torch.long, device=device),
        context_lens_list=[length] * n,
        query_lens_list=[length] * n,
        query_starts_list=[i * length for i in range(n)],
        num_decodes=0,
        block_size=block_size,
    )
    ids = torch.tensor(batch, dtype=torch.long, device=device)
    hidden = net(ids.reshape(-1), positions.repeat(n), cache.layer_caches(), meta)
    hidden = hidden.view(n, length, -1)
    total = 0.0
    for i in range(n):
        targets = ids[i, 1:]
        for start in range(0, length - 1, LOGIT_ROWS):
            end = min(length - 1, start + LOGIT_ROWS)
            logits = net.compute_logits(hidden[i, start:end]).float()
            logprobs = torch.log_softmax(logits, dim=-1)
            picked = logprobs.gather(1, targets[start:end, None])
            total -= picked.double().sum().item()
    return total


@torch.inference_mode()
def perplexity(llm: LLM, windows: list[list[int]], batch_size: int = 8) -> dict[str, float]:
    """Mean negative log-likelihood (nats per token) over tokens 1..L-1 of every window, each
    window scored independently from its first token, and `ppl = exp(nll)`.

    Returns {"nll", "ppl", "windows", "window", "tokens"} (tokens: predicted tokens).
    """
    length = _check(llm, windows, batch_size)
    net = llm.loaded.net
    batch_size = min(batch_size, len(windows))
    block_size = getattr(getattr(llm.engine, "config", None), "block_size", 16)
    blocks_per_window = -(-length // block_size)
    local = net.layout.local_config(llm.loaded.config)
    cache = KVCache(
        local, batch_size * blocks_per_window, block_size, llm.loaded.dtype, llm.loaded.device
    )
    cache.storage.zero_()  # slots past a window's end are never written: no garbage in them
    total = 0.0
    for start in range(0, len(windows), batch_size):
        total += _batch_nll(net, cache, windows[start : start + batch_size], blocks_per_window)
    tokens = len(windows) * (length - 1)
    nll = total / tokens
    return {
        "nll": nll,
        "ppl": math.exp(nll),
        "windows": len(windows),
        "window": length,
        "tokens": tokens,
    }
