"""Decode steps on static buffers, padded to a batch-size bucket and replayed from CUDA graphs.

A step whose batch is only single-token decodes, none of which wants attention signals
(`meta.capture` is None), can run at fixed shapes: the batch is padded to the smallest bucket
>= its size (1, 2, 4, 8, then multiples of 8 up to max_num_seqs, as vLLM does) and its inputs
are copied into static device buffers that every step of that bucket reuses. On CUDA the
model's forward pass over a bucket is captured once in a CUDA graph and replayed afterwards, so
a step costs one graph launch instead of a dozen kernel launches per layer. Capture is lazy: the
first step of a bucket runs one warm-up pass (which compiles the Triton kernels for those
shapes) and captures; later steps only replay. `ModelRunner.execute` sends every other step
(prefills, mixed batches, batches above the largest bucket, capture) down the eager path.

Static buffers, shared by all buckets (a bucket uses their first `bucket` rows): token ids,
positions, slot mapping and context lengths [largest bucket], and block tables
[largest bucket, max_blocks_per_seq] with max_blocks_per_seq from max_model_len. The graphs'
intermediates live in one memory pool shared by all buckets (replays never overlap), so the
graphs together hold about one forward pass of the largest bucket used plus each graph's
output [bucket, hidden]: for a Llama-2-7B shape at bucket 64 an estimated 15 MB (not yet
measured), dominated by the decode partials [64, 32 heads, 8 chunks, 128] in fp32.

Only an attention backend that says it `supports_cuda_graphs` runs here (today the triton
backend): its decode path (`triton_paged.decode_attention`) reads the metadata's tensors only,
and its grid depends only on their shapes (a fixed split size), so nothing syncs with the host.
The metadata's host-side context lengths are left empty (their values change every step), so
anything that read them would fail loudly; each bucket's metadata is reused across steps, so
the path builds no per-step plan (`AttentionMetadata.plan`).

Padded rows are harmless: token 0 at position 0 writes its keys and values into slot 0 of a
scratch block reserved for the engine's lifetime (`KVCache.reserve_block`: never given to a
sequence, not counted in the capacity) and attends to that one slot; its outputs are
dropped. Rows are independent in every op, so padding changes a real row at most by the
last-bit differences of a matmul of another height. A block table entry past a row's context
is never read, so stale entries left by an earlier step are harmless and the tables are
rewritten only up to the step's widest table.
"""

from __future__ import annotations

import bisect
from collections import Counter

import torch

from thinfer.attention.metadata import AttentionMetadata
from thinfer.config import EngineConfig
from thinfer.engine.kv_cache import KVCache
from thinfer.engine.scheduler import ScheduledSequence
from thinfer.models.llama import LlamaForCausalLM

_SMALL_BUCKETS = (1, 2, 4)
BUCKET_STRIDE = 8


def decode_buckets(max_num_seqs: int) -> list[int]:
    """Batch sizes a static decode step is padded to: 1, 2, 4, then multiples of 8 below
    `max_num_seqs`, then `max_num_seqs` itself."""
    if max_num_seqs <= 0:
        raise ValueError(f"max_num_seqs must be positive, got {max_num_seqs}")
    small = [size for size in _SMALL_BUCKETS if size < max_num_seqs]
    return small + list(range(BUCKET_STRIDE, max_num_seqs, BUCKET_STRIDE)) + [max_num_seqs]


def cuda_graphs_apply(config: EngineConfig, model: LlamaForCausalLM, device: torch.device) -> bool:
    """True when decode steps replay CUDA graphs: `config.cuda_graphs` is on, the model's
    attention backend supports CUDA graphs (the triton backend), and the device is CUDA."""
    return (
        config.cuda_graphs
        and device.type == "cuda"
        and model.attention_backend.supports_cuda_graphs
    )


class DecodeGraphs:
    """Static-buffer decode steps for one model and KV cache; with `use_cuda_graphs` each
    bucket's forward pass is a captured CUDA graph, without it (CPU tests) the same padded
    static step runs eagerly.

    Holds one KV block of `kv_cache` as the padded rows' scratch space from construction on.
    """

    def __init__(
        self,
        model: LlamaForCausalLM,
        kv_cache: KVCache,
        max_num_seqs: int,
        max_model_len: int,
        use_cuda_graphs: bool,
    ) -> None:
        device = kv_cache.storage.device
        if not model.attention_backend.supports_cuda_graphs:
            raise ValueError(
                "static decode steps need an attention backend that supports CUDA graphs, "
                "such as the triton attention backend (the model runs "
                f"{model.attention_backend.name!r})"
            )
        if use_cuda_graphs and device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, the KV cache is on {device.type!r}")
        if kv_cache.num_free_blocks < 2:
            raise ValueError(
                "CUDA graphs hold one KV block as scratch for padded rows; the KV cache has "
                f"{kv_cache.num_free_blocks} free block(s), too few (turn cuda_graphs off)"
            )
        self.model = model
        self.kv_cache = kv_cache
        self.layer_caches = kv_cache.layer_caches()
        self.buckets = decode_buckets(max_num_seqs)
        self.max_blocks_per_seq = kv_cache.blocks_for(max_model_len)
        self.use_cuda_graphs = use_cuda_graphs
        self.bucket_steps: Counter[int] = Counter()  # steps run per bucket
        self.scratch_block = kv_cache.reserve_block()
        rows = self.buckets[-1]
        # Rows: token ids, positions, slot mapping, context lengths.
        self._vectors = torch.zeros(4, rows, dtype=torch.long, device=device)
        self._block_tables = torch.zeros(
            rows, self.max_blocks_per_seq, dtype=torch.long, device=device
        )
        self._metas: dict[int, AttentionMetadata] = {}
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._pool = torch.cuda.graph_pool_handle() if use_cuda_graphs else None

    @property
    def captured_buckets(self) -> list[int]:
        """Buckets whose CUDA graph has been captured."""
        return sorted(self._graphs)

    def fits(self, batch: list[ScheduledSequence]) -> bool:
        """True when the batch fits the static buffers (a bucket and the table width)."""
        return len(batch) <= self.buckets[-1] and all(
            len(item.seq.block_table) <= self.max_blocks_per_seq for item in batch
        )

    def bucket_for(self, batch_size: int) -> int:
        """The smallest bucket holding `batch_size` rows."""
        return self.buckets[bisect.bisect_left(self.buckets, batch_size)]

    def run(self, batch: list[ScheduledSequence]) -> torch.Tensor:
        """Final hidden states [len(batch), hidden] of a step of single-token decodes that
        `fits`, rows in batch order. Writes the step's keys and values into the cache like an
        eager step; does not advance the sequences."""
        bucket = self.bucket_for(len(batch))
        if self.use_cuda_graphs and bucket not in self._graphs:
            self._capture(bucket)
        self._fill(batch, bucket)
        self.bucket_steps[bucket] += 1
        if not self.use_cuda_graphs:
            return self._forward(bucket)[: len(batch)]
        graph, hidden = self._graphs[bucket]
        graph.replay()
        return hidden[: len(batch)].clone()  # the next replay overwrites the graph's output

    def _fill(self, batch: list[ScheduledSequence], bucket: int) -> None:
        """Copy the batch's inputs into the first `bucket` rows; pad with scratch rows."""
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        context_lens: list[int] = []
        tables: list[list[int]] = []
        for item in batch:
            seq = item.seq
            position = seq.num_computed_tokens
            ids.extend(seq.token_ids(position, position + 1))
            positions.append(position)
            slots.extend(self.kv_cache.slot_mapping(seq, 1))
            context_lens.append(seq.kv_len + 1)
            tables.append(seq.block_table)
        padding = bucket - len(batch)
        ids += [0] * padding
        positions += [0] * padding
        slots += [self.scratch_block * self.kv_cache.block_size] * padding
        context_lens += [1] * padding
        tables += [[self.scratch_block]] * padding
        width = max(map(len, tables))
        rows = [table + [0] * (width - len(table)) for table in tables]
        self._vectors[:, :bucket].copy_(torch.tensor([ids, positions, slots, context_lens]))
        self._block_tables[:bucket, :width].copy_(torch.tensor(rows))

    def _forward(self, bucket: int) -> torch.Tensor:
        """The model over the first `bucket` rows of the static buffers."""
        ids, positions = self._vectors[0, :bucket], self._vectors[1, :bucket]
        return self.model(ids, positions, self.layer_caches, self._meta(bucket))

    def _meta(self, bucket: int) -> AttentionMetadata:
        """Metadata over the static buffers; built once per bucket."""
        meta = self._metas.get(bucket)
        if meta is None:
            meta = AttentionMetadata(
                slot_mapping=self._vectors[2, :bucket],
                block_tables=self._block_tables[:bucket],
                context_lens=self._vectors[3, :bucket],
                context_lens_list=[],  # values live on the device only (see module docstring)
                query_lens_list=[1] * bucket,
                query_starts_list=list(range(bucket)),
                num_decodes=bucket,
                block_size=self.kv_cache.block_size,
                capture=None,
            )
            self._metas[bucket] = meta
        return meta

    def _capture(self, bucket: int) -> None:
        """Warm up on padded rows only (compiles the kernels), then capture the bucket."""
        self._fill([], bucket)
        current = torch.cuda.current_stream()
        side = torch.cuda.Stream()
        side.wait_stream(current)
        with torch.cuda.stream(side):
            self._forward(bucket)
        current.wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
            hidden = self._forward(bucket)
        self._graphs[bucket] = (graph, hidden)


def build_decode_graphs(
    config: EngineConfig, model: LlamaForCausalLM, kv_cache: KVCache, max_model_len: int
) -> DecodeGraphs | None:
    """The engine's CUDA-graph decode path, or None where graphs do not apply."""
    if not cuda_graphs_apply(config, model, kv_cache.storage.device):
        return None
    return DecodeGraphs(model, kv_cache, config.max_num_seqs, max_model_len, use_cuda_graphs=True)
