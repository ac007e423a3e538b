"""Who runs this step: continuous batching under a token budget, with chunked prefill.

Each step, running sequences are served first (first come, first served): a decoding
sequence costs one token, a sequence still prefilling costs its next chunk. Then waiting
sequences are admitted while the token budget, `max_num_seqs` and free KV blocks allow; a long
prompt is split into chunks across steps. When a running sequence needs a block and none is
free, the most recently admitted running sequence is preempted: its blocks are swapped out to
host memory and it goes back to the front of the queue, so its output is unchanged when it
resumes.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from thinfer.config import EngineConfig
from thinfer.engine.kv_cache import KVCache
from thinfer.engine.sequence import Sequence, SequenceStatus


@dataclass
class ScheduledSequence:
    """A sequence and how many of its uncomputed tokens run this step.

    `samples` is fixed when scheduled: True when the chunk reaches the end of the sequence,
    so a token is sampled after this step.
    """

    seq: Sequence
    num_tokens: int
    samples: bool = False

    def __post_init__(self) -> None:
        self.samples = self.seq.num_computed_tokens + self.num_tokens == self.seq.num_tokens


class Scheduler:
    """Queues of waiting and running sequences, and the per-step batch decision."""

    def __init__(self, config: EngineConfig, kv_cache: KVCache) -> None:
        self.config = config
        self.kv_cache = kv_cache
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        # Keep a few blocks free when admitting, so running decodes do not preempt at once.
        self.admission_reserve = max(1, kv_cache.num_blocks // 100)

    def add(self, seq: Sequence) -> None:
        """Queue a new sequence."""
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    @property
    def has_unfinished(self) -> bool:
        """True while any sequence waits or runs."""
        return bool(self.waiting or self.running)

    def schedule(self) -> list[ScheduledSequence]:
        """Choose this step's batch; decoding sequences come first in the result."""
        budget = self.config.max_num_batched_tokens
        scheduled: list[ScheduledSequence] = []
        index = 0
        while index < len(self.running) and budget > 0:
            seq = self.running[index]
            num_tokens = min(seq.num_uncomputed_tokens, budget)
            if not self._make_room(seq, num_tokens):
                break  # seq itself was preempted; it was the last running one
            self.kv_cache.append_slots(seq, num_tokens)
            scheduled.append(ScheduledSequence(seq, num_tokens))
            budget -= num_tokens
            index += 1
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            num_tokens = min(seq.num_uncomputed_tokens, budget)
            reserve = self.admission_reserve if self.running else 0
            if seq.status is SequenceStatus.SWAPPED:
                if not self.kv_cache.can_swap_in(seq, num_tokens, reserve):
                    break
                self.kv_cache.swap_in(seq)
            elif not self.kv_cache.can_append(seq, num_tokens, reserve):
                break
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            self.kv_cache.append_slots(seq, num_tokens)
            scheduled.append(ScheduledSequence(seq, num_tokens))
            budget -= num_tokens
        # Decodes first, shortest cache first: attention pads a group of decodes to its
        # longest member, so neighbours of similar length waste less (see
        # torch_paged.plan_decode_groups).
        scheduled.sort(key=lambda s: (s.num_tokens != 1 or not s.samples, s.seq.kv_len))
        return scheduled

    def _make_room(self, seq: Sequence, num_tokens: int) -> bool:
        """Preempt from the back of `running` until `seq` can append; False if seq went."""
        while not self.kv_cache.can_append(seq, num_tokens):
            victim = self.running.pop()
            self._preempt(victim)
            if victim is seq:
                return False
        return True

    def _preempt(self, seq: Sequence) -> None:
        self.kv_cache.swap_out(seq)
        seq.status = SequenceStatus.SWAPPED
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def finish(self, seq: Sequence) -> None:
        """Remove a finished or aborted sequence and free its blocks."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.kv_cache.free(seq)
        seq.swapped_kv = None
        seq.status = SequenceStatus.FINISHED
