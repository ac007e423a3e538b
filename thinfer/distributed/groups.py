"""The process groups of one tensor-parallel engine, and Python objects sent over them.

Each engine makes its own groups over a TCP store instead of torch's global default group,
so a process may hold several engines one after another (tests do) and a torchrun job's
own group is left alone. `control` (gloo, CPU) carries commands and decisions; `device`
carries the model's tensors: the same gloo group on the CPU, NCCL on GPUs.
"""

from __future__ import annotations

import datetime
import pickle
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

# Workers wait on the control group between commands, however long a server stays idle;
# a dead peer is noticed at once anyway (its sockets close), so this only bounds a hang.
IDLE_TIMEOUT = datetime.timedelta(days=30)
CONNECT_TIMEOUT = datetime.timedelta(minutes=10)


@dataclass
class RankGroups:
    """This process's rank in a tensor-parallel engine of `world_size` ranks."""

    rank: int
    world_size: int
    store: dist.Store
    control: dist.ProcessGroup
    device: dist.ProcessGroup

    def broadcast_object(self, obj: Any = None) -> Any:
        """Send `obj` from rank 0 to all ranks (the others pass nothing); returns it."""
        if self.rank == 0:
            data = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8)
            size = torch.tensor([data.numel()], dtype=torch.long)
        else:
            size = torch.zeros(1, dtype=torch.long)
        self.control.broadcast(size, 0).wait()
        if self.rank != 0:
            data = torch.empty(int(size), dtype=torch.uint8)
        self.control.broadcast(data, 0).wait()
        return obj if self.rank == 0 else pickle.loads(data.numpy().tobytes())

    def gather_objects(self, obj: Any) -> list[Any]:
        """Every rank's `obj`, in rank order, on every rank."""
        data = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8)
        sizes = [torch.zeros(1, dtype=torch.long) for _ in range(self.world_size)]
        self.control.allgather([sizes], [torch.tensor([data.numel()])]).wait()
        longest = max(int(size) for size in sizes)
        padded = torch.zeros(longest, dtype=torch.uint8)
        padded[: data.numel()] = data
        parts = [torch.empty(longest, dtype=torch.uint8) for _ in range(self.world_size)]
        self.control.allgather([parts], [padded]).wait()
        return [
            pickle.loads(part[: int(size)].numpy().tobytes())
            for part, size in zip(parts, sizes, strict=True)
        ]

    def reduce_ints(self, values: list[int], op: dist.ReduceOp) -> list[int]:
        """Integers reduced by `op` (MIN, MAX, SUM) over the ranks."""
        tensor = torch.tensor(values, dtype=torch.long)
        options = dist.AllreduceOptions()
        options.reduceOp = op
        self.control.allreduce([tensor], options).wait()
        return [int(v) for v in tensor]


def connect(rank: int, world_size: int, store: dist.Store, device: torch.device) -> RankGroups:
    """The groups of rank `rank` over `store` (every rank calls this with the same store)."""
    control = dist.ProcessGroupGloo(
        dist.PrefixStore("control", store), rank, world_size, IDLE_TIMEOUT
    )
    if device.type == "cuda":
        torch.cuda.set_device(device)
        tensors: dist.ProcessGroup = dist.ProcessGroupNCCL(
            dist.PrefixStore("nccl", store), rank, world_size
        )
    else:
        tensors = control
    return RankGroups(rank, world_size, store, control, tensors)


def local_store(world_size: int) -> dist.TCPStore:
    """A store on this machine for `world_size` ranks, served by the calling rank 0 (its
    `port` is what the spawned ranks connect to)."""
    return dist.TCPStore(
        "127.0.0.1", 0, world_size, True, timeout=CONNECT_TIMEOUT, wait_for_workers=False
    )


def join_store(host: str, port: int, world_size: int) -> dist.TCPStore:
    """Connect to the store of rank 0 at host:port."""
    return dist.TCPStore(host, port, world_size, False, timeout=CONNECT_TIMEOUT)
