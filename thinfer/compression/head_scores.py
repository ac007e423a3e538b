"""Per-KV-head token scores for SnapKV and R-KV, and the per-head keep rule they share.

All functions work on one layer at a time (so an R-KV similarity matrix is one layer's
[Hkv, m, m], never all layers at once) and in float32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def window_attention(queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Attention probabilities of the last w queries over all n cached keys of one layer.

    queries [w, Hq, D] belong to the tokens in the last w slots (causal: query j sees slots
    <= n - w + j); keys [n, Hkv, D]. Returns [Hkv, G, w, n] (G query heads per KV head).
    """
    w, num_heads, head_dim = queries.shape
    n, num_kv_heads = keys.shape[0], keys.shape[1]
    group = num_heads // num_kv_heads
    grouped = queries.float().view(w, num_kv_heads, group, head_dim).permute(1, 2, 0, 3)
    logits = torch.matmul(grouped, keys.float().permute(1, 2, 0)[:, None]) * head_dim**-0.5
    query_slots = torch.arange(n - w, n, device=keys.device)
    future = torch.arange(n, device=keys.device)[None, :] > query_slots[:, None]
    return torch.softmax(logits.masked_fill(future, float("-inf")), dim=-1)


def max_pool(scores: torch.Tensor, kernel: int) -> torch.Tensor:
    """Max over a centered window of `kernel` neighbours along the last dim (same length)."""
    if kernel <= 1 or scores.shape[-1] == 0:
        return scores
    shape = scores.shape
    pooled = F.max_pool1d(scores.reshape(-1, 1, shape[-1]), kernel, 1, kernel // 2)
    return pooled.view(shape)


def snapkv_scores(
    queries: torch.Tensor, keys: torch.Tensor, num_old: int, kernel: int
) -> torch.Tensor:
    """SnapKV: window attention to the first `num_old` slots, averaged over the window's
    queries and each KV head's query heads, then max-pooled: [Hkv, num_old]."""
    probs = window_attention(queries, keys)[..., :num_old]
    return max_pool(probs.mean(dim=(1, 2)), kernel)


def rkv_scores(
    queries: torch.Tensor,
    keys: torch.Tensor,
    num_old: int,
    kernel: int,
    weight: float,
    threshold: float,
) -> torch.Tensor:
    """R-KV: `weight * I - (1 - weight) * R` over the first `num_old` slots: [Hkv, num_old].

    I (importance): window attention, max over each KV head's query heads, mean over the
    window's queries, max-pooled. R (redundancy): cosine similarity between the candidate
    keys with the diagonal zeroed; in each row the most recent key more similar than
    `threshold` is ignored (so the latest of a group of near-duplicates is not penalised
    for it); the row mean, then a softmax over the candidates.
    """
    probs = window_attention(queries, keys)[..., :num_old]
    importance = max_pool(probs.amax(dim=1).mean(dim=1), kernel)
    return weight * importance - (1.0 - weight) * key_redundancy(keys[:num_old], threshold)


def key_redundancy(keys: torch.Tensor, threshold: float) -> torch.Tensor:
    """R-KV's redundancy of each of m keys [m, Hkv, D]: [Hkv, m] (a softmax per head)."""
    m = keys.shape[0]
    if m == 0:
        return keys.new_zeros(keys.shape[1], 0, dtype=torch.float32)
    unit = F.normalize(keys.float().transpose(0, 1), dim=-1)  # [Hkv, m, D]
    similarity = torch.matmul(unit, unit.transpose(-1, -2))
    similarity.diagonal(dim1=-2, dim2=-1).zero_()
    near = similarity > threshold
    columns = torch.arange(m, device=keys.device)
    latest = torch.where(near, columns, -1).amax(dim=-1, keepdim=True)  # [Hkv, m, 1]
    similarity.masked_fill_((columns == latest) & near, 0.0)
    return torch.softmax(similarity.mean(dim=-1), dim=-1)


def keep_per_head(scores: torch.Tensor, count: int, kv_len: int) -> torch.Tensor:
    """Keep rule of the per-head methods: in each head, the `count` best-scored of the first
    `num_old = scores.shape[-1]` slots (ties: the earlier slot) plus every slot from
    `num_old` on, ascending. scores [..., num_old] -> indices [..., count + kv_len - num_old]."""
    num_old = scores.shape[-1]
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :count]
    chosen = order.sort(dim=-1).values
    recent = torch.arange(num_old, kv_len, device=scores.device)
    return torch.cat([chosen, recent.expand(*scores.shape[:-1], -1)], dim=-1)
