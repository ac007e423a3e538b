"""Batch-invariant attention over the paged KV cache (the deterministic mode's backend).

Every query row, whether it decodes one token or sits anywhere in a prefill chunk, is
computed by the same calls with the same shapes, which depend only on that row's own
context length L: its keys are padded with zeros to Lp = ceil(L / `KEY_SPLIT`) *
`KEY_SPLIT` slots, and per KV head

    logits [R, G, Lp] = bmm(q [R, G, D], K^T expanded to [R, D, Lp]) * scale
    probs = softmax(logits masked beyond each row's L)             (one row-wise kernel)
    out [R, G, D]     = bmm(probs, V expanded to [R, Lp, D])

where G is the number of query heads sharing the KV head and K, V that head's keys and
values, contiguous [Lp, D] per row, zero beyond L. The R rows of one call are either rows of
one prefill chunk with the same Lp (K, V one sequence's, expanded) or single rows (decodes,
one-token chunks) of R sequences with the same Lp (K, V each row's own); a call of one row
uses the plain 2-D matmul (`bmm` of one row takes a path ~20x slower on the dev CPU). All
three compute a row by the same kernel, so its bits do not depend on R or on the kind of
call; `check_bmm_rows` checks that at start-up rather than assuming it, and the module's
tests check it too. The softmax reduces each row on its own, and
masked slots get probability exactly 0. So a row's output is bitwise the same alone,
beside other sequences, in a prefill chunk of any size, or as a decode.

Column sums (H2O's attention received) are summed in fixed point: each probability is
rounded to a multiple of 2^-`FIXED_POINT_BITS` and the sums are float64 integers, exact in any
order as long as a slot's total stays below 2^53 (2^23 query heads at probability 1), so a
prefill counts the same whether it came in one chunk or many.

Cost against `torch_paged`: no decode batching across sequences and one call per KV head;
measured by `thinfer bench determinism`.
"""

from __future__ import annotations

import torch

from thinfer.attention.invariant_layout import KEY_SPLIT, PaddedGather, padded_length, step_layout
from thinfer.attention.metadata import AttentionMetadata
from thinfer.kernels.placement import runs_triton

__all__ = ["KEY_SPLIT", "attend", "attend_chunk", "gather_padded", "paged_attention"]

FIXED_POINT_BITS = 30  # column sums count probability in units of 2^-30


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """Attention of the flat queries q [T, Hq, D] over the cache; returns [T, Hq, D], each row
    independent of the batch (see the module docstring). Column sums, when `meta.capture`
    asks for them, are float64 fixed-point sums [Hkv, context]."""
    out = torch.empty_like(q)
    layout = meta.plan(step_layout)  # built on the first layer's call, shared by the rest
    capture = meta.capture
    for chunk in layout.chunks:
        rows, sums = attend_chunk(
            q[chunk.start : chunk.start + chunk.count],
            chunk.keys.gather(k_cache),
            chunk.keys.gather(v_cache),
            chunk.context,
            scale,
            chunk.first_counted,
            layout.exclude_self,
        )
        out[chunk.start : chunk.start + chunk.count] = rows
        if sums is not None:
            capture.add_column_sums(chunk.index, sums)  # type: ignore[union-attr]
    for group in layout.singles:
        rows, units = attend(
            q[group.starts],
            group.keys.gather(k_cache),
            group.keys.gather(v_cache),
            group.lens,
            scale,
            group.counted,
            layout.exclude_self,
        )
        out[group.starts] = rows
        for j, i in enumerate(group.seqs):
            if group.first_counted[j] is not None:
                capture.add_column_sums(i, units[j, :, : group.contexts[j]])  # type: ignore[union-attr]
    return out


def gather_padded(cache: torch.Tensor, tables: torch.Tensor, contexts: list[int]) -> torch.Tensor:
    """The first contexts[b] slots of each sequence b (block tables [B, n]) as [Hkv, B, Lp, D],
    zero from contexts[b] on, with Lp the longest padded length: a fresh contiguous tensor."""
    return PaddedGather.build(tables, contexts, cache.shape[1]).gather(cache)


def attend_chunk(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    context: int,
    scale: float,
    first_counted_slot: int | None = None,
    exclude_self: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The n newest queries q [n, Hq, D] of one sequence over its `context` slots, padded
    keys/values [Hkv, 1, Lp, D] (query i in slot context - n + i, causal): (out [n, Hq, D],
    column sums [Hkv, context] or None). Rows sharing a padded length go in one call.

    Column sums are returned when `first_counted_slot` is given: the fixed-point sum of the
    probabilities each key received from the queries in slots >= it (without each query's
    own key with `exclude_self`)."""
    n = q.shape[0]
    lens = torch.arange(context - n + 1, context + 1, device=q.device)  # per row
    first_len = context - n + 1  # lens[i] == first_len + i, known on the host (no sync)
    out = torch.empty_like(q)
    sums = None
    if first_counted_slot is not None:
        sums = torch.zeros(keys.shape[0], context, dtype=torch.float64, device=q.device)
    first = 0
    while first < n:
        width = padded_length(first_len + first)
        last = min(n, first + width - (first_len + first) + 1)  # rows up to length `width`
        counted = None if sums is None else lens[first:last] - 1 >= first_counted_slot
        rows, units = attend(
            q[first:last], keys[:, :, :width], values[:, :, :width], lens[first:last], scale,
            counted, exclude_self,
        )  # fmt: skip
        out[first:last] = rows
        if sums is not None:
            covered = min(width, context)
            sums[:, :covered] += units.sum(0)[:, :covered]
        first = last
    return out, sums


def attend(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    lens: torch.Tensor,
    scale: float,
    counted: torch.Tensor | None = None,
    exclude_self: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows q [R, Hq, D] over keys/values [Hkv, B, Lp, D] (B == R: each row its own; B == 1:
    shared), row r seeing its first lens[r] slots (its own query in slot lens[r] - 1):
    (out [R, Hq, D], fixed-point probabilities [R, Hkv, Lp] summed over each KV head's query
    heads, zero for rows not `counted`; empty when `counted` is None).

    Rows with keys of their own run all KV heads in one batched call (the batch is then
    (head, row), each matrix still one row's); rows sharing keys run one call per KV head."""
    rows, num_heads, head_dim = q.shape
    num_kv_heads, width = keys.shape[0], keys.shape[2]
    group = num_heads // num_kv_heads
    grouped = q.view(rows, num_kv_heads, group, head_dim)
    stale = torch.arange(width, device=q.device)[None, :] >= lens[:, None]  # [R, Lp]
    kept = width if counted is not None else 0
    units = q.new_zeros(rows, num_kv_heads, kept, dtype=torch.float64)
    if runs_triton(q):  # every row of every head in one call: the kernel ignores the batch
        return _attend_all_heads(grouped, keys, values, stale, lens, scale, counted, exclude_self)
    if keys.shape[1] == rows and rows > 1:
        by_head = grouped.transpose(0, 1).reshape(num_kv_heads * rows, group, head_dim)
        flat_keys = keys.reshape(num_kv_heads * rows, width, head_dim)
        probs = _probs(by_head, flat_keys, stale.repeat(num_kv_heads, 1), scale)
        mixed = row_mix(probs, values.reshape(num_kv_heads * rows, width, head_dim))
        out = mixed.view(num_kv_heads, rows, group, head_dim).transpose(0, 1)
        if counted is not None:
            for head, head_probs in enumerate(probs.view(num_kv_heads, rows, group, width)):
                units[:, head] = _units(head_probs, lens, counted, exclude_self)
        return out.reshape(rows, num_heads, head_dim), units
    out = torch.empty_like(grouped)
    for head in range(num_kv_heads):
        probs = _probs(grouped[:, head].contiguous(), keys[head], stale, scale)
        out[:, head] = row_mix(probs, values[head])
        if counted is not None:
            units[:, head] = _units(probs, lens, counted, exclude_self)
    return out.view(rows, num_heads, head_dim), units


def _attend_all_heads(
    grouped: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    stale: torch.Tensor,
    lens: torch.Tensor,
    scale: float,
    counted: torch.Tensor | None,
    exclude_self: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`attend` through the Triton kernel (CUDA): one product per KV head for rows sharing
    keys (their query heads stacked, rows R x G), one per (KV head, row) for rows with keys
    of their own. Each output element is one fixed-order dot product whatever sits beside
    it in the call, so a row gets the bits it gets alone (tests/test_invariant_ops.py)."""
    rows, num_kv_heads, group, head_dim = grouped.shape
    width = keys.shape[2]
    shared = keys.shape[1] == 1
    batch = num_kv_heads if shared else num_kv_heads * rows
    queries = grouped.transpose(0, 1).reshape(batch, -1, head_dim)
    flat_keys = keys.reshape(batch, width, head_dim)
    logits = row_logits(queries, flat_keys).mul_(scale)  # [batch, (R x) G, Lp]
    logits = logits.view(num_kv_heads, rows, group, width)
    probs = torch.softmax(logits.masked_fill_(stale[None, :, None, :], float("-inf")), dim=-1)
    mixed = row_mix(probs.view(batch, -1, width), values.reshape(batch, width, head_dim))
    out = mixed.view(num_kv_heads, rows, group, head_dim).transpose(0, 1)
    kept = width if counted is not None else 0
    units = grouped.new_zeros(rows, num_kv_heads, kept, dtype=torch.float64)
    if counted is not None:
        for head in range(num_kv_heads):
            units[:, head] = _units(probs[head], lens, counted, exclude_self)
    return out.reshape(rows, num_kv_heads * group, head_dim), units


def _probs(
    queries: torch.Tensor, keys: torch.Tensor, stale: torch.Tensor, scale: float
) -> torch.Tensor:
    """Attention probabilities [R, G, Lp] of queries [R, G, D] over keys [B, Lp, D], zero
    where `stale` [R, Lp]."""
    logits = row_logits(queries, keys).mul_(scale)
    return torch.softmax(logits.masked_fill_(stale[:, None, :], float("-inf")), dim=-1)


def _units(
    probs: torch.Tensor, lens: torch.Tensor, counted: torch.Tensor, exclude_self: bool
) -> torch.Tensor:
    """One KV head's probabilities [R, G, Lp] -> fixed-point sums over its query heads
    [R, Lp]: rows not `counted` zero, each row's own slot zero with `exclude_self`."""
    units = torch.round(probs.double() * float(2**FIXED_POINT_BITS)).sum(1)
    if exclude_self:
        units[torch.arange(units.shape[0], device=units.device), lens - 1] = 0
    return units.masked_fill_(~counted[:, None], 0)


def row_logits(queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """queries [R, G, D] of one KV head against keys [B, Lp, D] (B == R or 1) -> [R, G, Lp],
    each row's bits independent of R and of B (see the module docstring). On CUDA through the
    Triton batch-invariant kernel: cuBLAS picks its batched algorithm from the batch count."""
    if runs_triton(queries):
        from thinfer.kernels.invariant_matmul import invariant_bmm

        return invariant_bmm(queries, keys)
    rows, _, head_dim = queries.shape
    if rows == 1:
        return torch.mm(queries[0], keys[0].t())[None]
    if keys.shape[0] == 1:
        return torch.bmm(queries, keys[0].t().expand(rows, head_dim, keys.shape[1]))
    return torch.bmm(queries, keys.transpose(1, 2))


def row_mix(probs: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """probs [R, G, Lp] over one KV head's values [B, Lp, D] (B == R or 1) -> [R, G, D] (on
    CUDA through the Triton batch-invariant kernel, as `row_logits`)."""
    if runs_triton(probs):
        from thinfer.kernels.invariant_matmul import invariant_bmm

        return invariant_bmm(probs, values.transpose(1, 2))
    return torch.bmm(probs, values.expand(probs.shape[0], *values.shape[1:]))


def check_bmm_rows(head_dim: int, group: int, dtype: torch.dtype, device: torch.device) -> None:
    """RuntimeError unless `row_logits` and `row_mix` give each row the same bits alone (a
    decode), among rows sharing keys (a prefill chunk) and among rows with keys of their own
    (a batch of decodes), for one and for several key splits."""
    generator = torch.Generator().manual_seed(0)
    rows = 7

    def draw(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator).to(device=device, dtype=dtype)

    def both(q: torch.Tensor, p: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple:
        return row_logits(q, k), row_mix(p, v)

    for width in (KEY_SPLIT, 2 * KEY_SPLIT):
        q, keys = draw(rows, group, head_dim), draw(rows, width, head_dim)
        values = draw(rows, width, head_dim)
        probs = torch.softmax(draw(rows, group, width).float(), -1).to(dtype)
        own, shared = both(q, probs, keys, values), both(q, probs, keys[:1], values[:1])
        for r in (0, 3, rows - 1):
            q_r, p_r = q[r : r + 1].contiguous(), probs[r : r + 1].contiguous()
            own_r = both(q_r, p_r, keys[r : r + 1], values[r : r + 1])
            shared_r = both(q_r, p_r, keys[:1], values[:1])
            pairs = zip(own_r + shared_r, own + shared, strict=True)
            if not all(torch.equal(alone[0], batch[r]) for alone, batch in pairs):
                raise RuntimeError(
                    f"deterministic mode: attention's matmuls on {device.type} {dtype} give "
                    "a row other bits alone than beside others, so attention cannot be made "
                    "batch-invariant on this build"
                )
