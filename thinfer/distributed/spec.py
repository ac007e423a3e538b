"""`EngineSpec`: what every rank needs to build its part of one tensor-parallel engine.

The driver and the workers build their engines from the same spec, so their schedulers,
KV caches and compression settings are the same; only the shard of weights and KV heads
differs (`thinfer.models.shards`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from thinfer.compression import CompressionConfig
from thinfer.config import EngineConfig
from thinfer.distributed.groups import RankGroups
from thinfer.distributed.rank_exchange import RankExchange
from thinfer.engine.factory import LoadedModel, build_engine, load_model
from thinfer.engine.llm_engine import LLMEngine
from thinfer.models.collectives import ProcessGroupCollectives


@dataclass(frozen=True)
class EngineSpec:
    """The arguments of `LLM` that shape an engine (see `thinfer.llm.LLM`)."""

    model: str | None
    dtype: str | torch.dtype
    device_type: str  # "cpu" or "cuda": each rank takes its own device of that type
    load_format: str
    seed: int
    quantization: str | None
    config: EngineConfig
    kv_compression: CompressionConfig | dict[str, object] | None


def rank_device(spec: EngineSpec, local_rank: int) -> torch.device:
    """The device of a rank: its own GPU (by its index on the node), or the CPU."""
    if spec.device_type == "cuda":
        return torch.device("cuda", local_rank)
    return torch.device(spec.device_type)


def share_cpu_threads(world_size: int) -> None:
    """Give this rank its share of the node's cores: ranks on one CPU would otherwise each
    start a thread per core and fight over them."""
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))


def build_rank_engine(
    spec: EngineSpec,
    groups: RankGroups,
    device: torch.device,
    engine_class: type[LLMEngine] = LLMEngine,
) -> tuple[LoadedModel, LLMEngine]:
    """This rank's shard of the model (loaded shard by shard) and its engine."""
    loaded = load_model(
        spec.model,
        dtype=spec.dtype,
        device=device,
        load_format=spec.load_format,
        seed=spec.seed,
        quantization=spec.quantization,
        rank=groups.rank,
        collectives=ProcessGroupCollectives(groups.device),
    )
    exchange = RankExchange(groups, device)
    engine = build_engine(
        loaded,
        spec.config,
        kv_compression=spec.kv_compression,
        exchange=exchange,
        engine_class=engine_class,
    )
    return loaded, engine
