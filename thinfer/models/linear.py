"""Linear layers that can switch to a faster CPU kernel once their weights are final.

On CPU in float32, oneDNN (mkldnn) runs a matmul against weights that were reordered once
into its blocked layout about twice as fast as `F.linear` at decode batch sizes (measured on
the dev machine: lm_head of SmolLM2 at 16 rows 23 ms -> 10 ms). `pack_linears(model)` does the
reordering after loading; up to NATIVE_FP32_MAX_ROWS rows the native GEMV
(`thinfer.kernels.cpu_qgemm.f32_matmul`) is faster still and runs instead where it builds.
Where the AVX-512 build of the native kernels loaded, `pack` lays the weight out in panels
of 16 rows instead (`thinfer.kernels.cpu_panels`, no oneDNN copy) and every row count runs
there: measured on a 2-core Zen 5 EPYC on a par with or ahead of oneDNN from 1 to 512 rows
(a [3072, 576] product at 16 rows 0.130 against 0.146 ms, the GEMV 0.220).
Results differ from `F.linear` only by float32 summation order.

On a GPU, a dataflow table (`thinfer.kernels.gemm_dataflow`, set by `set_gemm_dataflow`)
can route a layer's calls to the flat GEMM or the GEMV of `thinfer.kernels.flat_gemm` per
number of rows; shapes and batch sizes it does not cover stay on cuBLAS.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from thinfer.kernels.cpu_native import native_library
from thinfer.kernels.cpu_panels import f32_panel_matmul, pack_f32_panels, panels_available
from thinfer.kernels.cpu_qgemm import f32_matmul
from thinfer.kernels.gemm_dataflow import DataflowTable, load_table
from thinfer.kernels.placement import runs_triton
from thinfer.models.int4 import Int4Weight, int4_supported
from thinfer.models.int8 import Int8Weight, int8_supported
from thinfer.models.invariant_linear import choose_tiles, plain_matmul, tiled_linear

QUANTIZATIONS = ("int4", "int8")
# Up to this many rows a packed CPU fp32 layer runs the native GEMV (`f32_matmul`: measured
# on the dev machine over 30 SmolLM2 layers, 38 against oneDNN's 66 ms at 1 row, 70 against
# 82 at 16); above it, oneDNN's blocked GEMM.
NATIVE_FP32_MAX_ROWS = 16


class Linear(nn.Module):
    """y = x W^T (+ b) with frozen weights [out, in] and an optional packed copy."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None
        self._packed: torch.Tensor | None = None
        # Packed CPU fp32 layers where the AVX-512 kernels run: the weight in panels (`pack`).
        self._panels: torch.Tensor | None = None
        # Packed CPU fp32 layers: small batches on the native GEMV (`pack`).
        self._native_fp32 = False
        # The kernel per batch size (`set_gemm_dataflow`); None: the paths below.
        self.dataflow: DataflowTable | None = None
        # Quantized weights (`quantize_linears`); None: fp32.
        self.quantized: Int4Weight | Int8Weight | None = None
        # Batch-invariant mode (`set_batch_invariant`): the CPU tile ladder, or () for the
        # Triton kernel on CUDA; None: the paths below, whose results depend on the batch.
        self.invariant_tiles: tuple[int, ...] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the layer to x [..., in_features]."""
        if self.invariant_tiles is not None:
            return self._invariant(x)
        if self.dataflow is not None and x.dim() == 2:
            out_features, in_features = self.weight.shape
            choice = self.dataflow.choose(out_features, in_features, x.shape[0])
            if choice.impl != "cublas":
                return choice.run(x, self.weight, self.bias)
        if self.quantized is not None and x.dim() == 2 and x.dtype == torch.float32:
            return self.quantized.matmul(x, self.bias)
        if self._panels is not None and x.dim() == 2:
            return f32_panel_matmul(x, self._panels, self.weight.shape[0], self.bias)
        if self._packed is not None and x.dim() == 2:
            if self._native_fp32 and x.shape[0] <= NATIVE_FP32_MAX_ROWS:
                return f32_matmul(x, self.weight, self.bias)
            return torch.ops.mkldnn._linear_pointwise(
                x.contiguous(), self._packed, self.bias, "none", [], ""
            )
        return F.linear(x, self.weight, self.bias)

    def _invariant(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in] through the batch-invariant path (`set_batch_invariant`)."""
        rows = x.reshape(-1, x.shape[-1])
        if self.invariant_tiles == ():
            from thinfer.kernels.invariant_matmul import invariant_linear

            out = invariant_linear(rows, self.weight, self.bias)
        else:
            matmul = plain_matmul(self.weight, self._packed, self._panels)
            out = tiled_linear(rows, matmul, self.weight.shape[0], self.bias, self.invariant_tiles)
        return out.view(*x.shape[:-1], self.weight.shape[0])

    def pack(self) -> bool:
        """Lay the weights out for the fast CPU fp32 kernel when one applies (the native
        panels where the AVX-512 build runs, else oneDNN's layout); returns True if packed."""
        self._packed = self._panels = None
        self._native_fp32 = False
        if not _can_pack(self.weight):
            return False
        if panels_available() and self.weight.dim() == 2:
            self._panels = pack_f32_panels(self.weight)
            return True
        try:
            packed = torch.ops.mkldnn._reorder_linear_weight(self.weight.detach())
            probe = torch.ones(1, self.weight.shape[1], dtype=self.weight.dtype)
            torch.ops.mkldnn._linear_pointwise(probe, packed, self.bias, "none", [], "")
        except (RuntimeError, AttributeError):
            return False
        self._packed = packed
        self._native_fp32 = (
            native_library() is not None
            and self.weight.is_contiguous()
            and self.weight.shape[1] % 8 == 0
        )
        return True

    def unpack(self) -> None:
        """Drop the packed and quantized copies (call after changing `weight`)."""
        self._packed = self._panels = None
        self._native_fp32 = False
        self.quantized = None


def _can_pack(weight: torch.Tensor) -> bool:
    return (
        weight.device.type == "cpu"
        and weight.dtype == torch.float32
        and torch.backends.mkldnn.is_available()
    )


def pack_linears(model: nn.Module) -> int:
    """Pack every `Linear` of `model` for the fast CPU kernel; returns how many were packed."""
    return sum(module.pack() for module in model.modules() if isinstance(module, Linear))


def unpack_linears(model: nn.Module) -> None:
    """Return every `Linear` of `model` to plain `F.linear` (e.g. before editing weights)."""
    for module in model.modules():
        if isinstance(module, Linear):
            module.unpack()


def gemm_table(path: str | None, device: torch.device) -> DataflowTable | None:
    """The dataflow table at `path` for `device` (None for None); ValueError if it cannot be
    used here (see `load_table`), or if it picks Triton kernels where they cannot run."""
    if path is None:
        return None
    table = load_table(path, device)
    if device.type != "cuda" and any(
        choice.impl != "cublas" for rows in table.shapes.values() for _, choice in rows
    ):
        from thinfer.attention.triton_paged import kernels_interpreted

        if not kernels_interpreted():
            raise ValueError(
                f"gemm_dataflow: {path} picks Triton kernels, which need a CUDA device "
                "(on CPU only through Triton's interpreter: TRITON_INTERPRET=1)"
            )
    return table


def set_gemm_dataflow(model: nn.Module, table: DataflowTable | None) -> None:
    """Let every `Linear` of `model` take its kernel from `table` (None: cuBLAS / oneDNN)."""
    for module in model.modules():
        if isinstance(module, Linear):
            module.dataflow = table


def quantize_linears(model: nn.Module, method: str) -> int:
    """Quantize the `Linear`s of `model`: under "int4", int4 where the kernel takes the shape
    and int8 elsewhere and for `lm_head` (see `thinfer.models.int4`); under "int8", int8
    everywhere. Returns how many were quantized. ValueError for an unknown method, a weight
    not in fp32 or not on the CPU."""
    if method not in QUANTIZATIONS:
        raise ValueError(f"quantization: unknown method {method!r}; use one of {QUANTIZATIONS}")
    count = 0
    for name, module in model.named_modules():
        if not isinstance(module, Linear):
            continue
        weight = module.weight.detach()
        if weight.device.type != "cpu" or weight.dtype != torch.float32:
            raise ValueError(
                f"quantization {method!r} runs fp32 models on the CPU, got {weight.dtype} on "
                f"{weight.device.type}"
            )
        output_layer = name.split(".")[-1] == "lm_head"
        if method == "int4" and not output_layer and int4_supported(weight):
            module.quantized = Int4Weight(weight)
        elif int8_supported(weight):
            module.quantized = Int8Weight(weight)
        else:
            continue
        module._packed = module._panels = None  # the quantized path replaces the fp32 copy
        count += 1
    return count


def set_batch_invariant(model: nn.Module, enabled: bool) -> dict[str, tuple[int, ...]]:
    """Run every `Linear` of `model` through the batch-invariant path (`enabled`), or back
    through the fast ones. On CUDA that is the Triton kernel with the tile plan `tune_tiles`
    verified and timed for the weight's shape; on the CPU, row tiles of the sizes
    `choose_tiles` verified for it (either once per process and shape).
    Returns the tile sizes chosen per shape ("NxK": sizes; () for the Triton kernel).
    ValueError for quantized layers or a dataflow table (their kernels are not invariant)."""
    chosen: dict[str, tuple[int, ...]] = {}
    for name, module in model.named_modules():
        if not isinstance(module, Linear):
            continue
        if not enabled:
            module.invariant_tiles = None
            continue
        if module.quantized is not None or module.dataflow is not None:
            what = "quantized weights" if module.quantized is not None else "a gemm dataflow table"
            raise ValueError(f"deterministic mode cannot run {name} with {what}")
        out_features, in_features = module.weight.shape
        key = f"{out_features}x{in_features}"
        if key not in chosen:
            chosen[key] = _invariant_tiles(module)
        module.invariant_tiles = chosen[key]
    return chosen


# Self-test outcomes per (out, in, dtype, packed): a property of the kernel for a shape, so it
# is measured once per process, not at every engine build.
_TILES_BY_SHAPE: dict[tuple[int, int, torch.dtype, bool, bool], tuple[int, ...]] = {}


def _invariant_tiles(module: Linear) -> tuple[int, ...]:
    weight = module.weight.detach()
    if runs_triton(weight):
        from thinfer.kernels.invariant_matmul import registered_plan
        from thinfer.kernels.invariant_tiles import tune_tiles

        if registered_plan(weight) is None:  # once per process and shape
            tune_tiles(weight)
        return ()
    key = (*weight.shape, weight.dtype, module._packed is not None, module._panels is not None)
    if key not in _TILES_BY_SHAPE:
        matmul = plain_matmul(weight, module._packed, module._panels)
        by_design = module._panels is not None  # each row its own chain of FMAs
        _TILES_BY_SHAPE[key] = choose_tiles(matmul, weight.shape[1], weight.dtype, by_design)  # type: ignore[index]
    return _TILES_BY_SHAPE[key]  # type: ignore[index]
