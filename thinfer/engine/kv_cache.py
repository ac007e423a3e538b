"""The paged KV cache: one preallocated tensor, fixed-size blocks, a free list.

All layers share a sequence's block table: block b holds slots [b*block_size, (b+1)*block_size)
of the sequence in every layer. The manager allocates and frees blocks and moves data (swap
out/in on preemption); it never decides *which* tokens to keep.
"""

from __future__ import annotations

import os
from collections import deque

import torch

from thinfer.compression.compaction import CompactionPlan
from thinfer.config import EngineConfig, ModelConfig
from thinfer.engine.sequence import Sequence


class KVCache:
    """Cache storage [layers, 2, num_blocks, block_size, kv_heads, head_dim] and its pool."""

    def __init__(
        self,
        model_cfg: ModelConfig,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.storage = torch.empty(
            (
                model_cfg.num_hidden_layers,
                2,
                num_blocks,
                block_size,
                model_cfg.num_key_value_heads,
                model_cfg.head_dim,
            ),
            dtype=dtype,
            device=device,
        )
        self._free: deque[int] = deque(range(num_blocks))
        self._reserved: list[int] = []  # taken out of the pool for good (`reserve_block`)
        # Storage is allocated uninitialized (cheap for large pools); blocks are zeroed the
        # first time they are handed out, so masked-out slots never hold NaN garbage that
        # would leak through attention (0 * NaN = NaN). Block 0 also pads block tables.
        self._zeroed_upto = 0
        self._zero_through(0)

    @property
    def num_usable_blocks(self) -> int:
        """Blocks sequences can ever hold: the pool minus the reserved blocks."""
        return self.num_blocks - len(self._reserved)

    @property
    def capacity_tokens(self) -> int:
        """Slots sequences can ever hold (reserved blocks excluded)."""
        return self.num_usable_blocks * self.block_size

    def reserve_block(self) -> int:
        """Take one zeroed block out of the pool for good (the engine's own scratch space,
        e.g. for the padded rows of static decode steps); it is never handed to a sequence
        and no longer counts in `capacity_tokens` or `num_used_blocks`."""
        if not self._free:
            raise RuntimeError("KV cache out of blocks: cannot reserve one")
        block = self._free.popleft()
        self._zero_through(block)
        self._reserved.append(block)
        return block

    @property
    def num_free_blocks(self) -> int:
        """Blocks not held by any sequence."""
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        """Blocks held by sequences."""
        return self.num_usable_blocks - len(self._free)

    @property
    def bytes_per_block(self) -> int:
        """Bytes of K and V of one block over all layers."""
        return self.storage[:, :, 0].numel() * self.storage.element_size()

    def layer_caches(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(K, V) views [num_blocks, block_size, kv_heads, head_dim] of each layer."""
        return [(layer[0], layer[1]) for layer in self.storage]

    def blocks_for(self, num_slots: int) -> int:
        """Blocks needed to hold `num_slots` slots."""
        return -(-num_slots // self.block_size)

    def num_new_blocks(self, seq: Sequence, num_new_slots: int) -> int:
        """Blocks `seq` must gain to append `num_new_slots` slots."""
        return max(0, self.blocks_for(seq.kv_len + num_new_slots) - len(seq.block_table))

    def can_append(self, seq: Sequence, num_new_slots: int, reserve: int = 0) -> bool:
        """True when the pool can give `seq` room for `num_new_slots` more slots."""
        return self.num_new_blocks(seq, num_new_slots) + reserve <= self.num_free_blocks

    def append_slots(self, seq: Sequence, num_new_slots: int) -> None:
        """Grow `seq`'s block table to hold `num_new_slots` more slots."""
        needed = self.num_new_blocks(seq, num_new_slots)
        if needed > self.num_free_blocks:
            raise RuntimeError(
                f"KV cache out of blocks: need {needed}, have {self.num_free_blocks}"
            )
        new_blocks = [self._free.popleft() for _ in range(needed)]
        if new_blocks:
            self._zero_through(max(new_blocks))
        seq.block_table.extend(new_blocks)

    def _zero_through(self, block: int) -> None:
        """Zero never-used blocks up to and including `block` (in chunks, amortized)."""
        if block < self._zeroed_upto:
            return
        end = min(self.num_blocks, max(block + 1, self._zeroed_upto + 64))
        self.storage[:, :, self._zeroed_upto : end].zero_()
        self._zeroed_upto = end

    def slot_mapping(self, seq: Sequence, num_new_slots: int) -> list[int]:
        """Flat slot indices of the next `num_new_slots` slots of `seq`."""
        table, size = seq.block_table, self.block_size
        return [
            table[s // size] * size + s % size
            for s in range(seq.kv_len, seq.kv_len + num_new_slots)
        ]

    def free(self, seq: Sequence) -> None:
        """Return all of `seq`'s blocks to the pool."""
        self._free.extend(seq.block_table)
        seq.block_table = []

    def release_tail(self, seq: Sequence) -> None:
        """Return blocks beyond what `seq.kv_len` slots need (after compaction)."""
        keep = self.blocks_for(seq.kv_len)
        self._free.extend(seq.block_table[keep:])
        del seq.block_table[keep:]

    def _flat_slots(self, seq: Sequence, first: int, count: int) -> torch.Tensor:
        """Flat slot index (block * block_size + offset) of slots [first, first + count)."""
        size = self.block_size
        table = torch.tensor(seq.block_table, dtype=torch.long, device=self.storage.device)
        slots = torch.arange(first, first + count, device=self.storage.device)
        return table[slots // size] * size + slots % size

    def layer_keys(self, seq: Sequence, layer: int) -> torch.Tensor:
        """A copy of `seq`'s cached keys of one layer, in slot order: [kv_len, kv_heads, D].

        Reads only the sequence's own blocks (the layer's K tensor is contiguous), so the
        cost is proportional to the sequence, never to the pool.
        """
        table = torch.tensor(seq.block_table, dtype=torch.long, device=self.storage.device)
        keys = self.storage[layer, 0].index_select(0, table)  # [blocks, block_size, H, D]
        return keys.flatten(0, 1)[: seq.kv_len]

    def read_keys(self, seq: Sequence, first_slot: int, count: int) -> torch.Tensor:
        """A copy of the keys of slots [first_slot, first_slot + count) of every layer:
        [layers, count, kv_heads, head_dim]."""
        flat = self.storage[:, 0].flatten(1, 2)  # [L, num_blocks * block_size, H, D] view
        return flat[:, self._flat_slots(seq, first_slot, count)]

    def write_keys(self, seq: Sequence, first_slot: int, keys: torch.Tensor) -> None:
        """Overwrite the keys of slots [first_slot, first_slot + m) of every layer with keys
        [layers, m, kv_heads, head_dim] (StreamingLLM re-rotates its sinks this way)."""
        flat = self.storage[:, 0].flatten(1, 2)
        flat[:, self._flat_slots(seq, first_slot, keys.shape[1])] = keys.to(self.storage.dtype)

    def compact(self, seq: Sequence, plan: CompactionPlan) -> None:
        """Apply a hole-filling plan (`thinfer.compression.compaction`): move slot src[j] to
        slot dst[j] (in every layer and head for a shared plan [m], in its own layer and KV
        head for a per-head plan [layers, kv_heads, m]), keep `plan.new_len` slots and free
        the blocks beyond. Moves at most as many slots as were evicted. Keys keep the
        rotation of their original absolute position."""
        num_layers, _, _, _, num_heads, head_dim = self.storage.shape
        if plan.new_len > seq.kv_len:
            raise ValueError(f"plan keeps {plan.new_len} slots, the sequence has {seq.kv_len}")
        if plan.per_head and tuple(plan.dst.shape[:2]) != (num_layers, num_heads):
            raise ValueError(
                f"a per-head plan must be [{num_layers}, {num_heads}, m], got "
                f"{tuple(plan.dst.shape)}"
            )
        if plan.dst.shape[-1]:
            device = self.storage.device
            flat = self._flat_slots(seq, 0, seq.kv_len)
            dst, src = flat[plan.dst.to(device)], flat[plan.src.to(device)]
            slots = self.storage.view(num_layers, 2, -1, num_heads, head_dim)
            if not plan.per_head:
                slots[:, :, dst] = slots[:, :, src]
            else:
                layer = torch.arange(num_layers, device=device)[:, None, None]
                head = torch.arange(num_heads, device=device)[None, :, None]
                slots[layer, :, dst, head] = slots[layer, :, src, head]
        seq.kv_len = plan.new_len
        self.release_tail(seq)

    def swap_out(self, seq: Sequence) -> None:
        """Preemption: copy `seq`'s blocks to host memory and free them (exact resume)."""
        table = torch.tensor(seq.block_table, dtype=torch.long, device=self.storage.device)
        seq.swapped_kv = self.storage[:, :, table].to("cpu", copy=True)
        self.free(seq)

    def can_swap_in(self, seq: Sequence, num_new_slots: int, reserve: int = 0) -> bool:
        """True when `seq`'s swapped blocks plus room for new slots fit in the pool."""
        return self.blocks_for(seq.kv_len + num_new_slots) + reserve <= self.num_free_blocks

    def swap_in(self, seq: Sequence) -> None:
        """Bring a swapped sequence's blocks back into (new) blocks of the pool."""
        assert seq.swapped_kv is not None and not seq.block_table
        count = seq.swapped_kv.shape[2]
        seq.block_table = [self._free.popleft() for _ in range(count)]
        self._zero_through(max(seq.block_table))
        table = torch.tensor(seq.block_table, dtype=torch.long, device=self.storage.device)
        self.storage[:, :, table] = seq.swapped_kv.to(self.storage.device)
        seq.swapped_kv = None


def auto_num_blocks(
    model_cfg: ModelConfig,
    config: EngineConfig,
    max_model_len: int,
    dtype: torch.dtype,
    device: torch.device,
) -> int:
    """Blocks that fit in `kv_cache_memory_fraction` of free memory, capped at what
    `max_num_seqs` sequences of `max_model_len` tokens need."""
    bytes_per_block = model_cfg.kv_elements_per_token * config.block_size * dtype.itemsize
    budget = int(available_memory_bytes(device) * config.kv_cache_memory_fraction)
    by_need = config.max_num_seqs * -(-max_model_len // config.block_size)
    num_blocks = min(budget // bytes_per_block, by_need)
    if num_blocks < 1:
        raise ValueError("not enough free memory for even one KV block")
    return num_blocks


def available_memory_bytes(device: torch.device) -> int:
    """Free memory on `device` (RAM available to this process on CPU)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
