"""The compression stage: the one place where the engine applies KV-cache compression.

Per step it (1) plans the attention signals the batch's methods declared (`plan_capture`),
(2) after the forward pass records the new slots and the signals into each sequence's
`SlotState` (`observe`: column sums, recent queries, and one predictor call per head file for
all rows of the step that score hidden states, with no host sync per sequence), and (3) after
a token is sampled lets the sequence's schedule decide, scores in position order, applies the
single keep rule and compacts the cache by hole filling (`compress`). Methods never see the
engine; the model and the attention backends never see a method.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import torch

from thinfer.attention.capture import AttentionCapture
from thinfer.compression.compaction import plan_compaction
from thinfer.compression.config import CompressionConfig
from thinfer.compression.method import Method, PrepareContext
from thinfer.compression.selection import SequenceView, select_slots
from thinfer.compression.slot_state import SlotState
from thinfer.config import ModelConfig
from thinfer.engine.exchange import StepExchange
from thinfer.engine.head_average import HeadAverage
from thinfer.engine.kv_cache import KVCache
from thinfer.engine.scheduler import ScheduledSequence
from thinfer.engine.sequence import Sequence
from thinfer.loading.tokenizer import Tokenizer
from thinfer.models.llama import LlamaForCausalLM
from thinfer.models.rope import RotaryEmbedding, rotate
from thinfer.models.shards import ShardLayout, full_layout


@dataclass
class SequenceCompression:
    """One sequence's compression: its config, its method's resources and per-slot state."""

    config: CompressionConfig
    resources: Any
    state: SlotState
    queries: torch.Tensor | None = None  # [layers, <= w, heads, D], the last fed tokens
    answer_from: int | None = None  # first position kept for good after the prompt
    checked_tokens: int = 0  # output tokens already searched for an answer start
    sink_keys: torch.Tensor | None = None  # pristine sink keys (StreamingLLM reassignment)

    @property
    def method(self) -> Method:
        """The method's hyperparameters (and scoring code)."""
        return self.config.params


class CompressionStage:
    """Applies each sequence's compression; owns nothing but a cache of method resources.

    `deterministic`: decisions that depend only on the request, whatever its batch: per-slot
    values kept in float64, where the fixed-point column sums of the invariant attention
    backend add up exactly (shared scoring sums them over layers and heads instead of
    averaging: the same order of slots, still exact), and the predictor called one row at a
    time (one shape, so its matmuls cannot change with the batch).

    Under tensor parallelism (`exchange`, `layout`) a rank holds its own KV heads' state:
    per-head methods decide per rank (one budget, so one length: checked); shared ones sum
    scores over the ranks' heads and keep the driver's mask (docs/distributed.md).
    """

    def __init__(
        self,
        model_config: ModelConfig,
        kv_cache: KVCache,
        rotary: RotaryEmbedding,
        prepare_context: PrepareContext,
        deterministic: bool = False,
        exchange: StepExchange | None = None,
        layout: ShardLayout | None = None,
    ) -> None:
        self.deterministic = deterministic
        self.model_config = model_config
        self.exchange = exchange or StepExchange()
        self.layout = layout or full_layout(model_config)
        self.kv_cache = kv_cache
        self.rotary = rotary
        self.prepare_context = prepare_context
        self.head_average = HeadAverage(model_config, self.exchange)
        self.seconds = 0.0  # time inside `compress` (select + compact) since the last reset

    @classmethod
    def for_model(
        cls,
        model: LlamaForCausalLM,
        kv_cache: KVCache,
        tokenizer: Tokenizer | None,
        deterministic: bool,
        exchange: StepExchange,
    ) -> CompressionStage:
        """The stage of an engine over `model` (whole, or one rank's shard)."""
        weight = next(model.parameters())
        prepare = PrepareContext(model.config.hidden_size, weight.dtype, weight.device, tokenizer)
        return cls(
            model.config,
            kv_cache,
            model.rotary_emb,
            prepare,
            deterministic,
            exchange,
            model.layout,
        )

    # ----- admission ----------------------------------------------------------------------
    def resources(self, config: CompressionConfig) -> Any:
        """What the config's method needs (its `prepare`; DynTS heads are cached per file by
        `load_predictor`); raises ValueError for a bad file, so the request fails at
        admission, or for a per-head method where KV heads are replicated across ranks."""
        if self.layout.kv_replicas > 1 and (config.per_head or config.params.signals().keys):
            raise ValueError(
                f"kv_compression {config.method!r} ({config.scoring} scoring) scores each KV "
                f"head from its queries, but with tensor_parallel_size "
                f"{self.layout.world_size} above the model's "
                f"{self.model_config.num_key_value_heads} KV heads each head is replicated "
                "and its queries split across ranks; use a tensor_parallel_size that divides "
                "the KV heads, or a method scored from attention sums or hidden states"
            )
        return config.params.prepare(self.prepare_context)

    def attach(self, seq: Sequence, config: CompressionConfig | None) -> None:
        """Give `seq` its compression state (nothing for the full cache)."""
        if config is None or config.method == "full":
            seq.compression = None
            return
        prefix = (self.model_config.num_hidden_layers, self.layout.num_kv_heads)
        state = SlotState(
            prefix if config.per_head else (),
            config.params.slot_values,
            self.kv_cache.storage.device,
            torch.float64 if self.deterministic else torch.float32,
        )
        seq.compression = SequenceCompression(config, self.resources(config), state)

    # ----- signals ------------------------------------------------------------------------
    def plan_capture(
        self, batch: list[ScheduledSequence], query_starts: list[int]
    ) -> AttentionCapture | None:
        """The attention signals this batch's methods need, or None."""
        query_rows: dict[int, tuple[int, int]] = {}
        column_sums: set[int] = set()
        for index, item in enumerate(batch):
            comp = item.seq.compression
            if comp is None:
                continue
            signals = comp.method.signals()
            end = query_starts[index] + item.num_tokens
            if signals.query_window:
                query_rows[index] = (end - min(item.num_tokens, signals.query_window), end)
            if signals.column_sums:
                column_sums.add(index)
        if not query_rows and not column_sums:
            return None
        return AttentionCapture(query_rows, column_sums)

    def observe(
        self,
        batch: list[ScheduledSequence],
        capture: AttentionCapture | None,
        hidden: torch.Tensor,
    ) -> None:
        """Record the slots this step wrote and the signals it produced. `hidden` holds the
        final hidden states of the sampling rows, in batch order."""
        hidden_rows: dict[Any, list[tuple[int, SequenceCompression]]] = defaultdict(list)
        row = 0
        for index, item in enumerate(batch):
            comp = item.seq.compression
            if comp is not None:
                self._append_slots(item.seq, comp, item.num_tokens)
                if capture is not None:
                    self._record(comp, capture, index)
                if item.samples and comp.method.signals().hidden_states:
                    hidden_rows[comp.method.batch_key()].append((row, comp))
            row += item.samples
        groups = [  # shared decisions are the driver's: other ranks need no scores
            kept
            for rows in hidden_rows.values()
            if (kept := [r for r in rows if self.exchange.is_driver or r[1].config.per_head])
        ]
        if self.deterministic:  # one row per call: the predictor sees one shape only
            groups = [[row] for rows in groups for row in rows]
        with torch.inference_mode():
            self._score_hidden(hidden, groups)

    @staticmethod
    def _score_hidden(
        hidden: torch.Tensor, groups: list[list[tuple[int, SequenceCompression]]]
    ) -> None:
        """One `score_hidden` call per group of rows sharing a head; no host sync."""
        for rows in groups:
            comp = rows[0][1]
            index = torch.tensor([r for r, _ in rows], device=hidden.device)
            scores = comp.method.score_hidden(comp.resources, hidden.index_select(0, index))
            for (_, comp), score in zip(rows, scores, strict=True):
                predicted = comp.state.value(comp.method.slot_values[0])
                predicted[..., -1] = score

    def _append_slots(self, seq: Sequence, comp: SequenceCompression, count: int) -> None:
        state, method = comp.state, comp.method
        assert state.length + count == seq.kv_len, "slot state out of step with the cache"
        first = seq.num_computed_tokens - count
        prompt_len = len(seq.prompt_token_ids)
        if comp.answer_from is None:
            outputs = seq.output_token_ids
            start = method.answer_start(outputs, comp.checked_tokens)
            comp.checked_tokens = len(outputs)
            if start is not None:
                comp.answer_from = prompt_len + start
                state.protect(comp.answer_from)
        protect_below = prompt_len if method.protects_prompt else 0
        state.append_range(first, count, protect_below, comp.answer_from)

    def _record(self, comp: SequenceCompression, capture: AttentionCapture, index: int) -> None:
        sums = capture.column_sums(index)
        if sums is not None:  # [layers, kv_heads, kv_len]
            received = comp.state.value("attention")
            if comp.config.per_head:
                received += sums
            elif self.deterministic:  # exact; ranks the slots as the mean does
                received += self.head_average.total(sums)
            else:
                received += self.head_average.mean(sums)
        queries = capture.queries(index)
        if queries is not None:
            if comp.queries is not None:
                queries = torch.cat([comp.queries, queries], dim=1)
            comp.queries = queries[:, -comp.method.signals().query_window :].clone()

    # ----- eviction -----------------------------------------------------------------------
    def compress(self, seq: Sequence) -> None:
        """Evict what the sequence's schedule says to, before its new token is written."""
        comp = seq.compression
        if comp is None:
            return
        started = time.perf_counter()
        self._compress(seq, comp)
        self.seconds += time.perf_counter() - started

    def _compress(self, seq: Sequence, comp: SequenceCompression) -> None:
        view = SequenceView(
            seq.kv_len,
            len(seq.output_token_ids),
            len(seq.prompt_token_ids),
            lambda: seq.all_token_ids,
        )
        wants_keys = comp.method.signals().keys

        def decide() -> tuple[torch.Tensor, int] | None:
            return select_slots(
                comp.config,
                comp.state,
                view,
                resources=comp.resources,
                layer_keys=(lambda i: self.kv_cache.layer_keys(seq, i)) if wants_keys else None,
                queries=comp.queries,
                num_layers=self.model_config.num_hidden_layers,
                head_mean=self.head_average.mean,
            )

        if comp.config.per_head:  # each rank for its own heads, to one common length
            chosen = decide()
            self.exchange.check_same(-1 if chosen is None else chosen[1], "compacted length")
        else:
            chosen = self.exchange.shared_keep(decide)
        if chosen is None:
            return
        plan = plan_compaction(*chosen)
        self.kv_cache.compact(seq, plan)
        comp.state.apply(plan)
        self._rotate_sinks(seq, comp)

    def _rotate_sinks(self, seq: Sequence, comp: SequenceCompression) -> None:
        """StreamingLLM with reassigned positions: re-rotate the sinks (slots 0..s-1, never
        moved by hole filling) forward by the number of evicted tokens, from pristine keys."""
        sinks = min(getattr(comp.method, "sinks_to_rotate", 0), seq.kv_len)
        if sinks == 0:
            return
        if comp.sink_keys is None:  # first compaction: the sinks still hold their own keys
            comp.sink_keys = self.kv_cache.read_keys(seq, 0, sinks).clone()
        shift = seq.num_computed_tokens - seq.kv_len  # tokens evicted so far
        angles = self.rotary.angles(torch.tensor([shift], device=comp.sink_keys.device))
        self.kv_cache.write_keys(seq, 0, rotate(comp.sink_keys, angles))
