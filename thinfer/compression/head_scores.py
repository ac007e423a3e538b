"""Per-KV-head token scores for SnapKV and R-KV (keys and queries in position order).

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

    As in R-KV's reference code: I (importance) takes the raw logits of the window's queries
    (the last w of the n keys' tokens), the max over each KV head's query heads, a softmax
    over the `num_old` older keys only, the mean over the queries, then max-pooling.
    R (redundancy) is computed over all n keys (`key_redundancy`), then cut to the older ones.
    """
    w, num_heads, head_dim = queries.shape
    num_kv_heads = keys.shape[1]
    grouped = queries.float().view(w, num_kv_heads, num_heads // num_kv_heads, head_dim)
    grouped = grouped.permute(1, 2, 0, 3)  # [Hkv, G, w, D]
    logits = torch.matmul(grouped, keys[:num_old].float().permute(1, 2, 0)[:, None])
    logits = logits.amax(dim=1) * head_dim**-0.5  # [Hkv, w, num_old]
    importance = max_pool(torch.softmax(logits, dim=-1).mean(dim=1), kernel)
    redundancy = key_redundancy(keys, threshold)[:, :num_old]
    return weight * importance - (1.0 - weight) * redundancy


def key_redundancy(keys: torch.Tensor, threshold: float) -> torch.Tensor:
    """R-KV's redundancy of each of n keys [n, Hkv, D] (oldest first): [Hkv, n].

    Cosine similarity between keys with the diagonal zeroed; in each row, the column of the
    latest key more similar than `threshold` is zeroed (column 0 when there is none); then
    the mean over rows (the *column* mean: among near-duplicates a < b < c, c's column loses
    the most, so the latest copy gets the lowest redundancy and survives) and a softmax.
    """
    n = keys.shape[0]
    if n == 0:
        return keys.new_zeros(keys.shape[1], 0, dtype=torch.float32)
    unit = keys.float().transpose(0, 1)
    unit = unit / (unit.norm(dim=-1, keepdim=True) + 1e-8)  # [Hkv, n, D]
    similarity = torch.matmul(unit, unit.transpose(-1, -2))
    similarity.diagonal(dim1=-2, dim2=-1).zero_()
    columns = torch.arange(n, device=keys.device)
    latest = torch.where(similarity > threshold, columns, 0).amax(dim=-1, keepdim=True)
    similarity.scatter_(-1, latest, 0.0)
    return torch.softmax(similarity.mean(dim=-2), dim=-1)
