"""DynTS at inference: keep the decision-critical thinking tokens by predicted importance.

Every cached slot carries a score. Prompt tokens, the think-end marker and every answer token
after it score +inf (never evicted); a thinking token gets the predictor's score when it is
fed in. When the cache reaches the budget B: keep the last W slots, and of the older ones the
top floor(r * (L - W)) by score (at least all +inf ones), in original order, the same slots in
every layer and head. Memory then grows back to B: a saw-tooth between about r*(B-W)+W and B.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from thinfer.compression.config import CompressionConfig
from thinfer.compression.policies import CompressionPolicy
from thinfer.compression.predictor import ImportancePredictor, load_predictor

if TYPE_CHECKING:
    from thinfer.engine.kv_cache import KVCache
    from thinfer.engine.sequence import Sequence

PROTECTED = math.inf


class DynTSPolicy(CompressionPolicy):
    """Per-sequence DynTS state: one score per cached slot, aligned with the slots."""

    needs_hidden_states = True

    def __init__(self, config: CompressionConfig) -> None:
        super().__init__(config)
        self.scores: list[float] = []
        self.positions: list[int] = []  # original token position of each cached slot
        self.answer_from: int | None = None  # position of the first think-end marker token
        self._predictor: ImportancePredictor | None = None

    def prepare(self, hidden_size: int, dtype: torch.dtype, device: torch.device) -> None:
        """Load the configured head (cached per path) and check it fits the model."""
        assert self.config.predictor is not None
        try:
            predictor = load_predictor(self.config.predictor, dtype, str(device))
        except ValueError as e:
            raise ValueError(f"kv_compression.predictor: {e}") from e
        if predictor.hidden_size != hidden_size:
            raise ValueError(
                f"kv_compression.predictor: the DynTS head expects hidden size "
                f"{predictor.hidden_size}, the model has {hidden_size}"
            )
        self._predictor = predictor

    def predictor_for(self, hidden: torch.Tensor) -> ImportancePredictor:
        """The configured head, on the hidden states' dtype and device."""
        if self._predictor is None:
            self.prepare(hidden.shape[-1], hidden.dtype, hidden.device)
        assert self._predictor is not None
        return self._predictor

    def observe(self, seq: Sequence, hidden: torch.Tensor) -> None:
        """Score the tokens cached since the last call; `hidden` belongs to the newest one."""
        newest = seq.num_computed_tokens - 1
        prompt_len = len(seq.prompt_token_ids)
        for position in range(len(self.positions) and self.positions[-1] + 1, newest + 1):
            self._note_marker(seq, position)
            if position < prompt_len or self._is_answer(position):
                score = PROTECTED
            elif position == newest:
                score = float(self.predictor_for(hidden)(hidden))
            else:
                score = PROTECTED  # no hidden state seen for it: keep it, never guess
            self.positions.append(position)
            self.scores.append(score)

    def _note_marker(self, seq: Sequence, position: int) -> None:
        marker = self.config.think_end_token_ids
        if not marker or self.answer_from is not None:
            return
        start = position - len(marker) + 1
        if (
            start >= len(seq.prompt_token_ids)
            and tuple(seq.token_ids(start, position + 1)) == marker
        ):
            self.answer_from = start
            for slot, slot_position in enumerate(self.positions):
                if slot_position >= start:
                    self.scores[slot] = PROTECTED

    def _is_answer(self, position: int) -> bool:
        return self.answer_from is not None and position >= self.answer_from

    def peak_slots(self, prompt_len: int, max_tokens: int) -> int:
        """The prompt is never evicted and the W most recent tokens always stay, so the cache
        can sit at prompt + W + 1 even when that exceeds B. Answer tokens are never evicted
        either, and an answer's length is unknown: with a think-end marker configured,
        admission counts the full length (memory is still freed while the request runs)."""
        full = prompt_len + max_tokens
        if self.config.think_end_token_ids:
            return full
        assert self.config.budget is not None
        return min(full, max(self.config.budget, prompt_len + self.config.recent_window + 1))

    def select(self, seq: Sequence, cache: KVCache | None = None) -> torch.Tensor | None:
        budget = self.config.budget
        assert budget is not None and len(self.scores) == seq.kv_len
        kv_len = seq.kv_len
        if kv_len < budget:
            return None
        window = min(self.config.recent_window, kv_len)
        num_old = kv_len - window
        old_scores = torch.tensor(self.scores[:num_old], dtype=torch.float64)
        num_protected = int(torch.isinf(old_scores).sum())
        count = max(math.floor(self.config.ratio * num_old), num_protected)
        chosen = (
            torch.topk(old_scores, count).indices.sort().values
            if count
            else torch.empty(0, dtype=torch.long)
        )
        keep = torch.cat([chosen, torch.arange(num_old, kv_len)])
        kept = keep.tolist()
        self.scores = [self.scores[i] for i in kept]
        self.positions = [self.positions[i] for i in kept]
        return keep
