"""Turns a scheduled batch into flat tensors, runs the model, returns the rows to sample.

Steps of single-token decodes without attention capture go through the static, padded
decode path (`thinfer.engine.decode_graphs`, CUDA graphs) when the runner has one; every
other step runs eagerly on tensors built for exactly that batch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

from thinfer.attention.capture import AttentionCapture
from thinfer.attention.metadata import AttentionMetadata
from thinfer.engine.decode_graphs import DecodeGraphs
from thinfer.engine.kv_cache import KVCache
from thinfer.engine.scheduler import ScheduledSequence
from thinfer.models.llama import LlamaForCausalLM


class StepOutput(NamedTuple):
    """What one forward pass returns to the engine."""

    logits: torch.Tensor  # [num_sampling_seqs, vocab], in batch order
    hidden: torch.Tensor  # [num_sampling_seqs, hidden]: final hidden state of those rows
    capture: AttentionCapture | None  # attention signals for compression


CapturePlanner = Callable[[list[ScheduledSequence], list[int]], AttentionCapture | None]


def no_capture(batch: list[ScheduledSequence], query_starts: list[int]) -> None:
    """The planner of a runner without compression: no step records attention signals."""
    return None


class ModelRunner:
    """Owns the model and the cache tensors; one `execute` call per engine step.

    With `decode_graphs`, plain decode steps that fit its buffers run through it: steps
    where every sequence decodes one sampled token and `plan_capture` (the engine's
    compression stage) wants no attention signal.
    """

    def __init__(
        self,
        model: LlamaForCausalLM,
        kv_cache: KVCache,
        device: torch.device,
        decode_graphs: DecodeGraphs | None = None,
        plan_capture: CapturePlanner = no_capture,
    ) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.device = device
        self.layer_caches = kv_cache.layer_caches()
        self.decode_graphs = decode_graphs
        self.plan_capture = plan_capture

    def is_plain_decode(self, batch: list[ScheduledSequence]) -> bool:
        """True when every sequence decodes one sampled token and no attention signal is
        wanted from the step."""
        return all(item.num_tokens == 1 and item.samples for item in batch) and (
            self.plan_capture(batch, list(range(len(batch)))) is None
        )

    def runs_static(self, batch: list[ScheduledSequence]) -> bool:
        """True when this batch goes through the static decode path."""
        graphs = self.decode_graphs
        return graphs is not None and self.is_plain_decode(batch) and graphs.fits(batch)

    def prepare(
        self, batch: list[ScheduledSequence]
    ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, list[int]]:
        """Flat input ids, positions, attention metadata, and the row of each sampled token."""
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        query_starts: list[int] = []
        query_lens: list[int] = []
        context_lens: list[int] = []
        sample_rows: list[int] = []
        for item in batch:
            seq, n = item.seq, item.num_tokens
            start = seq.num_computed_tokens
            query_starts.append(len(input_ids))
            query_lens.append(n)
            input_ids.extend(seq.token_ids(start, start + n))
            positions.extend(range(start, start + n))
            slots.extend(self.kv_cache.slot_mapping(seq, n))
            context_lens.append(seq.kv_len + n)
            if item.samples:
                sample_rows.append(len(input_ids) - 1)
        num_decodes = 0
        while (
            num_decodes < len(batch) and query_lens[num_decodes] == 1 and batch[num_decodes].samples
        ):
            num_decodes += 1
        max_blocks = max(len(item.seq.block_table) for item in batch)
        tables = [
            item.seq.block_table + [0] * (max_blocks - len(item.seq.block_table)) for item in batch
        ]
        dev = self.device
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.long, device=dev),
            block_tables=torch.tensor(tables, dtype=torch.long, device=dev),
            context_lens=torch.tensor(context_lens, dtype=torch.long, device=dev),
            context_lens_list=context_lens,
            query_lens_list=query_lens,
            query_starts_list=query_starts,
            num_decodes=num_decodes,
            block_size=self.kv_cache.block_size,
            capture=self.plan_capture(batch, query_starts),
        )
        ids = torch.tensor(input_ids, dtype=torch.long, device=dev)
        pos = torch.tensor(positions, dtype=torch.long, device=dev)
        return ids, pos, meta, sample_rows

    @torch.inference_mode()
    def execute(self, batch: list[ScheduledSequence]) -> StepOutput:
        """Run one step: logits and final hidden states of the sampled rows, and the
        attention signals the compression stage asked for.

        Advances every scheduled sequence's `num_computed_tokens` and `kv_len`.
        """
        capture = None
        if self.runs_static(batch):
            last_hidden = self.decode_graphs.run(batch)  # type: ignore[union-attr]
        else:
            ids, pos, meta, sample_rows = self.prepare(batch)
            hidden = self.model(ids, pos, self.layer_caches, meta)
            rows = torch.tensor(sample_rows, dtype=torch.long, device=self.device)
            last_hidden = hidden.index_select(0, rows)
            capture = meta.capture
        for item in batch:
            item.seq.num_computed_tokens += item.num_tokens
            item.seq.kv_len += item.num_tokens
        return StepOutput(self.model.compute_logits(last_hidden), last_hidden, capture)
