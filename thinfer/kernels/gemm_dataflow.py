"""FlashDecoding++'s heuristic dataflow: which kernel computes a linear layer, per layer shape
(N, K) and number of rows M, read from a table measured once per device.

`thinfer bench gemm-dataflow` times cuBLAS (`F.linear`), the flat GEMM and the GEMV of
`flat_gemm.py` at each shape of a model and each M bucket, and writes the winners as a
`DataflowTable` (JSON). The engine loads one (`gemm_dataflow=` on `LLM`, `--gemm-dataflow`
on the command line) and every `Linear` asks it for its choice at each call; a shape or an M
the table does not cover runs cuBLAS, so a table never makes anything slower than it
measured.

File format (version 1):
`{"format": "thinfer-gemm-dataflow", "version": 1, "device": "NVIDIA H200", "dtype":
"bfloat16", "shapes": [{"n": 4096, "k": 4096, "choices": [{"max_m": 1, "impl": "gemv",
"block_n": 32, "block_k": 256, "split_k": 2, "num_warps": 4, "num_stages": 2}, ...]}]}`;
a call with M rows takes the first choice (in increasing `max_m`) with M <= max_m.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

TABLE_FORMAT = "thinfer-gemm-dataflow"
TABLE_VERSION = 1
IMPLS = ("cublas", "flat", "gemv")
M_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


@dataclasses.dataclass(frozen=True)
class GemmChoice:
    """One kernel with its launch settings (ignored by cuBLAS)."""

    impl: str = "cublas"
    block_n: int = 64
    block_k: int = 128
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self) -> None:
        if self.impl not in IMPLS:
            raise ValueError(f"impl: unknown kernel {self.impl!r}; use one of {', '.join(IMPLS)}")
        for name in ("block_n", "block_k", "split_k", "num_warps", "num_stages"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in ("block_n", "block_k"):
            value = getattr(self, name)
            if value < 16 or value & (value - 1):
                raise ValueError(f"{name} must be a power of two >= 16, got {value}")

    def run(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """y = x [M, K] @ weight [N, K]^T (+ bias) with this kernel."""
        if self.impl == "cublas":
            return F.linear(x, weight, bias)
        from thinfer.kernels import flat_gemm  # triton: imported only where a kernel runs

        if self.impl == "gemv":
            return flat_gemm.gemv(
                x, weight, bias, self.block_n, self.block_k, self.split_k, self.num_warps
            )
        return flat_gemm.flat_gemm(
            x, weight, bias, self.block_n, self.block_k, self.split_k, self.num_warps,
            self.num_stages,
        )  # fmt: skip


CUBLAS = GemmChoice()


@dataclasses.dataclass(frozen=True)
class DataflowTable:
    """Per (N, K): the choices in increasing `max_m`; `device` and `dtype` they were measured
    on."""

    device: str
    dtype: str
    shapes: dict[tuple[int, int], tuple[tuple[int, GemmChoice], ...]]

    def choose(self, n: int, k: int, m: int) -> GemmChoice:
        """The kernel for an M-row call of a layer with weight [N, K] (cuBLAS if not covered)."""
        for max_m, choice in self.shapes.get((n, k), ()):
            if m <= max_m:
                return choice
        return CUBLAS

    def to_json(self) -> dict[str, Any]:
        """The file's content (see the module docstring)."""
        shapes = []
        for (n, k), rows in sorted(self.shapes.items()):
            choices = [{"max_m": max_m} | dataclasses.asdict(c) for max_m, c in rows]
            shapes.append({"n": n, "k": k, "choices": choices})
        return {
            "format": TABLE_FORMAT,
            "version": TABLE_VERSION,
            "device": self.device,
            "dtype": self.dtype,
            "shapes": shapes,
        }

    def save(self, path: str | Path) -> None:
        """Write the table as JSON."""
        Path(path).write_text(json.dumps(self.to_json(), indent=1) + "\n", encoding="utf-8")


def table_from_json(data: object, source: str = "table") -> DataflowTable:
    """A `DataflowTable` from parsed JSON; ValueError naming `source` and the bad field."""

    def fail(what: str) -> ValueError:
        return ValueError(f"{source}: not a gemm dataflow table: {what}")

    if not isinstance(data, dict) or data.get("format") != TABLE_FORMAT:
        raise fail(f'"format" must be {TABLE_FORMAT!r}')
    if data.get("version") != TABLE_VERSION:
        raise fail(f'"version" {data.get("version")!r} is not {TABLE_VERSION}')
    for field in ("device", "dtype"):
        if not isinstance(data.get(field), str):
            raise fail(f'"{field}" must be a string')
    if not isinstance(data.get("shapes"), list):
        raise fail('"shapes" must be a list')
    shapes: dict[tuple[int, int], tuple[tuple[int, GemmChoice], ...]] = {}
    for i, entry in enumerate(data["shapes"]):
        where = f"shapes[{i}]"
        if not isinstance(entry, dict) or not all(
            isinstance(entry.get(key), int) and entry[key] > 0 for key in ("n", "k")
        ):
            raise fail(f'{where}: "n" and "k" must be positive integers')
        if (entry["n"], entry["k"]) in shapes:
            raise fail(f"{where}: shape ({entry['n']}, {entry['k']}) appears twice")
        rows = []
        for j, choice in enumerate(entry.get("choices") or []):
            if not isinstance(choice, dict) or not isinstance(choice.get("max_m"), int):
                raise fail(f'{where}.choices[{j}]: "max_m" must be an integer')
            fields = {key: value for key, value in choice.items() if key != "max_m"}
            try:
                rows.append((choice["max_m"], GemmChoice(**fields)))
            except (TypeError, ValueError) as exc:
                raise fail(f"{where}.choices[{j}]: {exc}") from exc
        if [m for m, _ in rows] != sorted({m for m, _ in rows}):
            raise fail(f'{where}: "max_m" must increase from one choice to the next')
        shapes[(entry["n"], entry["k"])] = tuple(rows)
    return DataflowTable(data["device"], data["dtype"], shapes)


def device_name(device: torch.device) -> str:
    """The name a table records for `device`: the GPU's name, or "cpu"."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


def load_table(path: str | Path, device: torch.device) -> DataflowTable:
    """Read a table for `device`; ValueError if unreadable, malformed, or measured elsewhere."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise ValueError(f"gemm_dataflow: cannot read {path}: {exc.strerror or exc}") from exc
    except json.JSONDecodeError as exc:
        raise ValueError(f"gemm_dataflow: {path} is not JSON: {exc}") from exc
    table = table_from_json(data, str(path))
    here = device_name(device)
    if table.device != here:
        raise ValueError(
            f"gemm_dataflow: {path} was measured on {table.device!r}, this device is {here!r}; "
            "measure one here with `thinfer bench gemm-dataflow`"
        )
    return table
