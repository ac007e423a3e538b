"""A worker rank: build this rank's engine, then do what the driver says until it stops.

Workers receive every call that changes engine state (add, abort, step) in the driver's
order and make the same call on their own engine, so their schedulers stay in step with
the driver's. A worker that fails reports why through the store (read by the driver
while it starts the ranks) and exits, which closes its sockets: the driver's next
collective fails at once instead of waiting.
"""

from __future__ import annotations

import logging
import sys
import traceback

import torch

from thinfer.distributed.groups import RankGroups, connect, join_store
from thinfer.distributed.spec import EngineSpec, build_rank_engine, rank_device, share_cpu_threads
from thinfer.engine.llm_engine import LLMEngine

logger = logging.getLogger("thinfer.distributed")


def ready_key(rank: int) -> str:
    """The store key where rank `rank` says it has built its engine ("" ) or why not."""
    return f"thinfer/ready/{rank}"


def worker_main(spec: EngineSpec, rank: int, world_size: int, port: int) -> None:
    """Entry point of a rank spawned by `thinfer.distributed.launch` on this node."""
    logging.basicConfig(level=logging.INFO, format=f"[rank {rank}] %(levelname)s %(message)s")
    if spec.device_type == "cpu":
        share_cpu_threads(world_size)
    device = rank_device(spec, rank)
    groups = connect(rank, world_size, join_store("127.0.0.1", port, world_size), device)
    sys.exit(run_worker(spec, groups, device))


def run_worker(spec: EngineSpec, groups: RankGroups, device: torch.device) -> int:
    """Build the engine, report, serve commands; returns the process exit code."""
    try:
        _, engine = build_rank_engine(spec, groups, device)
    except Exception as exc:  # noqa: BLE001 - reported to the driver, which raises it
        groups.store.set(ready_key(groups.rank), f"{type(exc).__name__}: {exc}")
        logger.error("could not build the engine:\n%s", traceback.format_exc())
        return 1
    groups.store.set(ready_key(groups.rank), "")
    try:
        serve_commands(engine, groups)
    except Exception:  # noqa: BLE001 - logged; exiting closes the sockets the driver waits on
        logger.error("rank %d failed:\n%s", groups.rank, traceback.format_exc())
        return 1
    return 0


def cpu_positions(engine: LLMEngine, request_id: str) -> list[torch.Tensor | None]:
    """`engine.kept_positions(request_id)` on the CPU, ready to be sent."""
    return [None if p is None else p.cpu() for p in engine.kept_positions(request_id)]


def serve_commands(engine: LLMEngine, groups: RankGroups) -> None:
    """Apply the driver's commands to `engine` until it says stop."""
    while True:
        command = groups.broadcast_object()
        kind = command[0]
        if kind == "step":
            engine.step()
        elif kind == "add":
            engine.add_request(*command[1:])
        elif kind == "abort":
            engine.abort_request(command[1])
        elif kind == "memory":
            groups.gather_objects(engine.memory_bytes())
        elif kind == "positions":
            groups.gather_objects(cpu_positions(engine, command[1]))
        elif kind == "stop":
            return
        else:
            raise RuntimeError(f"unknown command from the driver: {kind!r}")
