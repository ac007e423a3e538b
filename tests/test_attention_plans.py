"""Attention backends own their per-step plans and declare their capabilities.

The shared `AttentionMetadata` carries only the batch layout; the torch backend's decode
length groups and the triton backend's prefill layout are built by the backend itself, once
per step, through `AttentionMetadata.plan`. `decode_graphs` asks the backend whether it
supports CUDA graphs instead of comparing names.
"""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import torch

from thinfer.attention import torch_paged
from thinfer.attention.backend import TORCH_BACKEND, AttentionBackend, select_backend
from thinfer.attention.capture import AttentionCapture
from thinfer.attention.metadata import AttentionMetadata
from thinfer.attention.torch_paged import GROUP_OVERHEAD_SLOTS, plan_decode_groups
from thinfer.config import EngineConfig
from thinfer.engine.decode_graphs import cuda_graphs_apply

BLOCK_SIZE = 4


def make_meta(
    context_lens: list[int], query_lens: list[int], capture: AttentionCapture | None = None
) -> AttentionMetadata:
    """Sequence s owns blocks [s * width, (s + 1) * width) of a cache wide enough for all."""
    width = max(-(-c // BLOCK_SIZE) for c in context_lens)
    tables = torch.arange(len(context_lens) * width).view(len(context_lens), width)
    slots, starts = [], []
    for s, (context_len, n) in enumerate(zip(context_lens, query_lens, strict=True)):
        starts.append(len(slots))
        for pos in range(context_len - n, context_len):
            slots.append(int(tables[s, pos // BLOCK_SIZE]) * BLOCK_SIZE + pos % BLOCK_SIZE)
    return AttentionMetadata(
        slot_mapping=torch.tensor(slots),
        block_tables=tables,
        context_lens=torch.tensor(context_lens),
        context_lens_list=context_lens,
        query_lens_list=query_lens,
        query_starts_list=starts,
        num_decodes=sum(1 for n in query_lens if n == 1),
        block_size=BLOCK_SIZE,
        capture=capture,
    )


def test_metadata_holds_no_backend_plan_fields():
    names = {f.name for f in dataclasses.fields(AttentionMetadata)}
    assert not names & {"decode_groups", "prefill_layout"}


def test_plan_is_built_once_per_metadata_and_private_to_its_builder():
    meta = make_meta([5, 9], [1, 1])
    calls: list[int] = []

    def count_seqs(m: AttentionMetadata) -> int:
        calls.append(1)
        return m.num_seqs

    def count_decodes(m: AttentionMetadata) -> int:
        return m.num_decodes * 10

    assert meta.plan(count_seqs) == 2 and meta.plan(count_seqs) == 2
    assert meta.plan(count_decodes) == 20
    assert len(calls) == 1
    assert make_meta([5, 9], [1, 1]).plan(count_seqs) == 2 and len(calls) == 2  # a new step


def test_plan_decode_groups_splits_where_padding_costs_more_than_a_call():
    assert plan_decode_groups([]) == []
    assert plan_decode_groups([100, 100, 100]) == [(0, 3)]
    short, long = [8] * 4, [8 + GROUP_OVERHEAD_SLOTS] * 4  # padding 4 short rows: 4 x 256
    assert plan_decode_groups(short + long) == [(0, 4), (4, 8)]
    assert len(plan_decode_groups([2**i for i in range(16)])) == torch_paged.MAX_DECODE_GROUPS


def test_torch_backend_plans_its_decode_groups_once_per_step(monkeypatch):
    """Two layers' calls on one step's metadata: the groups are planned once, from the
    decodes' context lengths, and the output is the ungrouped attention's. (The groups serve
    the torch decodes; the native CPU kernel, off here, takes all decodes in one call and
    gives the same output.)"""
    planned: list[list[int]] = []
    native_applies = torch_paged.native_decode_applies
    monkeypatch.setattr(torch_paged, "native_decode_applies", lambda q, k_cache: False)

    def recording(context_lens: list[int]) -> list[tuple[int, int]]:
        planned.append(list(context_lens))
        return plan_decode_groups(context_lens)

    monkeypatch.setattr(torch_paged, "plan_decode_groups", recording)
    meta_args = context_lens, query_lens = [3, 5, 600, 7], [1, 1, 1, 4]
    meta = make_meta(*meta_args)
    gen = torch.Generator().manual_seed(0)
    num_blocks = meta.block_tables.numel()
    k_cache, v_cache = (torch.randn(num_blocks, BLOCK_SIZE, 2, 8, generator=gen) for _ in "kv")
    q = torch.randn(len(meta.slot_mapping), 4, 8, generator=gen)
    outs = [torch_paged.paged_attention(q, k_cache, v_cache, meta, 0.3) for _ in range(2)]
    assert planned == [[3, 5, 600]]
    assert meta.plan(torch_paged.decode_groups) == [(0, 2), (2, 3)]
    assert torch.equal(outs[0], outs[1])
    whole = torch_paged.decode_attention(
        q[:3], k_cache, v_cache, meta.block_tables[:3], meta.context_lens[:3], 600, 0.3
    )
    torch.testing.assert_close(outs[0][:3], whole)
    if native_applies(q, k_cache):
        monkeypatch.setattr(torch_paged, "native_decode_applies", native_applies)
        native = torch_paged.paged_attention(q, k_cache, v_cache, make_meta(*meta_args), 0.3)
        torch.testing.assert_close(native, outs[0], rtol=1e-5, atol=1e-5)


def test_triton_prefill_layout_is_the_backends_plan():
    """Starts relative to the first prefill row, lengths zeroed where a capture computes the
    sequence through the torch functions instead."""
    from thinfer.attention import triton_paged

    capture = AttentionCapture({}, {2})
    meta = make_meta([4, 6, 10, 9], [1, 1, 3, 5], capture)
    starts, lens, longest = meta.plan(triton_paged.prefill_layout)
    assert starts.tolist() == [0, 3] and lens.tolist() == [0, 5] and longest == 5
    assert meta.plan(triton_paged.prefill_layout)[0] is starts


def test_cuda_graphs_follow_the_backend_capability():
    cuda = torch.device("cuda")
    assert not TORCH_BACKEND.supports_cuda_graphs
    assert select_backend("triton", cuda).supports_cuda_graphs
    capable = AttentionBackend(
        "custom", torch_paged.store_kv, torch_paged.paged_attention, supports_cuda_graphs=True
    )
    model = SimpleNamespace(attention_backend=capable)
    assert cuda_graphs_apply(EngineConfig(), model, cuda)  # type: ignore[arg-type]
    model.attention_backend = dataclasses.replace(capable, supports_cuda_graphs=False)
    assert not cuda_graphs_apply(EngineConfig(), model, cuda)  # type: ignore[arg-type]
