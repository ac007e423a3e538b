"""Starting the ranks of a tensor-parallel engine.

On one node thinfer spawns the workers itself (`start_tensor_parallel`, with
torch.multiprocessing's spawn) and serves a TCP store on 127.0.0.1 for their rendezvous.
Across nodes torchrun starts one process per GPU with the same command line and the env://
variables (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT); `join_torchrun` gives rank 0 the
driver engine and turns every other rank into a worker.
"""

from __future__ import annotations

import os
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from thinfer.distributed.driver import DriverEngine
from thinfer.distributed.groups import CONNECT_TIMEOUT, connect, local_store
from thinfer.distributed.spec import (
    EngineSpec,
    build_rank_engine,
    rank_device,
    share_cpu_threads,
)
from thinfer.distributed.worker import ready_key, run_worker, worker_main
from thinfer.engine.factory import LoadedModel
from thinfer.loading import load_checkpoint
from thinfer.models.shards import plan_shards


def launch(spec: EngineSpec, world_size: int) -> tuple[LoadedModel, DriverEngine]:
    """Rank 0's shard and driver engine of `world_size` ranks: spawned here, or the ranks of
    the torchrun job this process belongs to. On torchrun's other ranks this serves the
    driver, then exits the process (SystemExit) when the driver closes. ValueError, before
    any rank starts, for a model that cannot be split `world_size` ways."""
    plan_shards(load_checkpoint(spec.model, spec.load_format).config, world_size)
    job = torchrun_rank()
    if job is None:
        return start_tensor_parallel(spec, world_size)
    if job[1] != world_size:
        raise ValueError(
            f"tensor_parallel_size {world_size} differs from torchrun's WORLD_SIZE {job[1]}"
        )
    started = join_torchrun(spec)
    if started is None:
        raise SystemExit(0)  # a worker whose driver closed: nothing left for this process
    return started


def start_tensor_parallel(spec: EngineSpec, world_size: int) -> tuple[LoadedModel, DriverEngine]:
    """Spawn ranks 1..world_size-1 on this node and return rank 0's shard and driver engine.
    Raises the first rank's build error (e.g. a bad checkpoint) after stopping them all."""
    if spec.device_type == "cuda" and torch.cuda.device_count() < world_size:
        raise ValueError(
            f"tensor_parallel_size {world_size} needs {world_size} GPUs on this node, "
            f"found {torch.cuda.device_count()}"
        )
    store = local_store(world_size)
    context = mp.get_context("spawn")
    processes = [
        context.Process(
            target=worker_main,
            args=(spec, rank, world_size, store.port),
            name=f"thinfer-tp-rank{rank}",
            daemon=True,
        )
        for rank in range(1, world_size)
    ]
    for process in processes:
        process.start()
    try:
        if spec.device_type == "cpu":
            share_cpu_threads(world_size)
        device = rank_device(spec, 0)
        groups = connect(0, world_size, store, device)
        try:  # the driver's own error (e.g. a bad checkpoint) is the one raised
            loaded, engine = build_rank_engine(spec, groups, device, DriverEngine)
        except RuntimeError:  # a collective failed: a worker's report says why
            _raise_worker_error(store, processes)
            raise
        _raise_worker_error(store, processes)
    except BaseException:
        for process in processes:
            process.terminate()
        raise
    assert isinstance(engine, DriverEngine)
    engine.attach(groups, processes)
    return loaded, engine


def _raise_worker_error(store: dist.Store, processes: list[mp.Process]) -> None:
    """Wait for every worker's report; RuntimeError naming the first rank that failed."""
    deadline = time.monotonic() + CONNECT_TIMEOUT.total_seconds()
    for rank, process in enumerate(processes, start=1):
        key = ready_key(rank)
        while not store.check([key]):
            if not process.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(
                    f"tensor-parallel rank {rank} exited (code {process.exitcode}) before "
                    "building its engine; see its log"
                )
            time.sleep(0.05)
        error = store.get(key).decode()
        if error:
            raise RuntimeError(f"tensor-parallel rank {rank} could not start: {error}")


def torchrun_rank() -> tuple[int, int] | None:
    """(rank, world size) when this process was started by torchrun (env:// variables
    set), else None."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])


def join_torchrun(spec: EngineSpec) -> tuple[LoadedModel, DriverEngine] | None:
    """Join the torchrun job this process belongs to: rank 0 gets its shard and the driver
    engine; any other rank serves the driver's commands until it stops, then gets None."""
    rank, world_size = torchrun_rank() or (0, 1)
    store, rank, world_size = next(dist.rendezvous("env://", rank, world_size))
    store = dist.PrefixStore(f"thinfer/{os.environ.get('TORCHELASTIC_RUN_ID', 'job')}", store)
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    device = rank_device(spec, local_rank)
    if spec.device_type == "cpu":
        share_cpu_threads(int(os.environ.get("LOCAL_WORLD_SIZE", world_size)))
    groups = connect(rank, world_size, store, device)
    if rank != 0:
        code = run_worker(spec, groups, device)
        if code:
            raise SystemExit(code)
        return None
    loaded, engine = build_rank_engine(spec, groups, device, DriverEngine)
    assert isinstance(engine, DriverEngine)
    engine.attach(groups, [])
    return loaded, engine
