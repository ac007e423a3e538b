"""Batch-invariant linear layers: each output row is bitwise the same whatever the batch.

A library GEMM chooses its algorithm (GEMV or GEMM, blocking over K, threading) from the
shape, so one row of `x @ W^T` changes in its last bits when the number of rows M changes
(measured on the dev CPU: MKL's `F.linear` gives other bits for M <= 3 than for M >= 4;
oneDNN's packed kernel at M = 1 for K = 1536). The invariant paths here never let M reach
the library:

- CPU (`tiled_linear`): the rows are cut into tiles of exactly `TILE_ROWS` rows (the last
  padded with zeros), each copied into a fresh buffer and multiplied by the same call, so the
  library sees one shape only. What remains is that a row's result may depend on its place
  inside the tile; `row_invariance_self_test` checks that for the model's shapes at start-up
  (every row rolled through every position, bitwise), and the engine falls back to one-row
  tiles (the library's GEMV, one shape again) where it fails.
- CPU, native fp32 panels (`kernels/cpu/panel_products.c`): each output element is one
  fixed-order chain of fused multiply-adds over K, whatever the other rows and however many
  (the row tiling only decides which rows share a weight load), so the rows go in one call
  (`ANY_ROWS`); `rows_independent_self_test` checks that at start-up for the model's shapes.
- CUDA: the Triton kernel of `thinfer.kernels.invariant_matmul` (fixed BLOCK_K, no split-K).

The cost is the padding (a decode batch of 1 multiplies 16 rows, at decode a CPU layer reads
its weights either way) and, for prefill, one weight read per tile instead of one per call;
`thinfer bench matmul` and `thinfer bench determinism` measure it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from thinfer.kernels.cpu_panels import f32_panel_matmul

TILE_ROWS = 16
# Other tile sizes (fewer rows for small decode batches, more for large ones and prefill),
# each used only where `choose_tiles` finds a row's bits the same in it as in a TILE_ROWS tile.
TILE_LADDER = (1, 2, 4, 8, TILE_ROWS, 32, 64, 128)

# A ladder of this one size: the kernel's rows do not depend on M, one call on all rows.
ANY_ROWS = 0
# Row counts `rows_independent_self_test` tries: in and across the panel kernel's 12-row
# tiles and its remainders, and larger calls.
_ROW_COUNTS = (1, 2, 3, 5, 11, 12, 13, 16, 24, 25, 37, 64, 131)

Matmul = Callable[[torch.Tensor], torch.Tensor]


def plain_matmul(
    weight: torch.Tensor, packed: torch.Tensor | None = None, panels: torch.Tensor | None = None
) -> Matmul:
    """x -> x @ weight^T through the native fp32 panels or oneDNN's packed weights when
    given, else `F.linear`."""
    if panels is not None:
        return lambda x: f32_panel_matmul(x, panels, weight.shape[0], None)
    if packed is not None:
        return lambda x: torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
    return lambda x: F.linear(x, weight)


def tiled_linear(
    x: torch.Tensor,
    matmul: Matmul,
    out_features: int,
    bias: torch.Tensor | None = None,
    tile_rows: int | tuple[int, ...] = TILE_ROWS,
) -> torch.Tensor:
    """`matmul` (x -> x W^T) applied to x [M, K] in tiles of exactly `tile_rows` rows, or of
    the sizes of an ascending ladder (the largest while the rows left fill it, then the
    smallest that holds the rest, zero-padded), so the kernel only ever sees those shapes;
    bias added after, elementwise. The ladder (ANY_ROWS,): one call on all rows."""
    ladder = (tile_rows,) if isinstance(tile_rows, int) else tile_rows
    if ladder == (ANY_ROWS,):
        out = matmul(x.contiguous())
        return out + bias if bias is not None else out
    rows, in_features = x.shape
    out = torch.empty(rows, out_features, dtype=x.dtype, device=x.device)
    start = 0
    while start < rows:
        left = rows - start
        size = min((t for t in ladder if t >= left), default=ladder[-1])
        count = min(size, left)
        tile = torch.zeros(size, in_features, dtype=x.dtype, device=x.device)
        tile[:count] = x[start : start + count]
        out[start : start + count] = matmul(tile)[:count]
        start += count
    if bias is not None:
        out += bias
    return out


def row_invariance_self_test(
    matmul: Matmul,
    in_features: int,
    tile_rows: int,
    dtype: torch.dtype,
    seed: int = 0,
    shifts: tuple[int, ...] | None = None,
) -> bool:
    """True when, for tiles of `tile_rows` rows, each row's output is bitwise the same at
    every position of the tile (every roll, or the given `shifts`) and whatever the other
    rows hold (random data)."""
    generator = torch.Generator().manual_seed(seed)
    tile = torch.randn(tile_rows, in_features, generator=generator).to(dtype)
    reference = matmul(tile.clone())
    others = torch.randn(tile_rows, in_features, generator=generator).to(dtype)
    for shift in shifts if shifts is not None else range(1, tile_rows):
        rolled = matmul(torch.roll(tile, shift, dims=0).contiguous())
        if not torch.equal(torch.roll(reference, shift, dims=0), rolled):
            return False
    for row in (0, tile_rows - 1) if shifts is not None else range(tile_rows):
        mixed = others.clone()
        mixed[row] = tile[0]
        if not torch.equal(matmul(mixed)[row], reference[0]):
            return False
    return True


def rows_independent_self_test(
    matmul: Matmul, in_features: int, dtype: torch.dtype, seed: int = 3
) -> bool:
    """True when a row's output is bitwise the same alone and in calls of every count of
    _ROW_COUNTS rows, at its first, middle and last position, beside random rows."""
    generator = torch.Generator().manual_seed(seed)
    probe = torch.randn(1, in_features, generator=generator).to(dtype)
    alone = matmul(probe.clone())[0]
    for rows in _ROW_COUNTS:
        batch = torch.randn(rows, in_features, generator=generator).to(dtype)
        for position in {0, rows // 2, rows - 1}:
            batch[position] = probe[0]
            if not torch.equal(matmul(batch.clone())[position], alone):
                return False
            batch[position] = torch.randn(in_features, generator=generator).to(dtype)
    return True


def choose_tiles(
    matmul: Matmul, in_features: int, dtype: torch.dtype, rows_independent: bool = False
) -> tuple[int, ...]:
    """The tile sizes a weight can use. `rows_independent` (a kernel that computes each row
    on its own by construction, as the native panels): (ANY_ROWS,) when
    `rows_independent_self_test` confirms it. Otherwise TILE_ROWS and each other size of
    TILE_LADDER that passes the self-test (at a spread of positions) and gives a row the
    same bits as a TILE_ROWS tile does; (1,) (the library's GEMV, one shape) when TILE_ROWS
    itself fails. A library kernel that passes a spread of row counts is not trusted with
    all of them: it may switch algorithms at counts the test did not try."""
    if rows_independent and rows_independent_self_test(matmul, in_features, dtype):
        return (ANY_ROWS,)
    if not row_invariance_self_test(matmul, in_features, TILE_ROWS, dtype):
        return (1,)
    generator = torch.Generator().manual_seed(2)
    anchor_rows = torch.randn(TILE_ROWS, in_features, generator=generator).to(dtype)
    anchor = matmul(anchor_rows)
    ladder = []
    for size in TILE_LADDER:
        if size == TILE_ROWS:
            ladder.append(size)
            continue
        spread = tuple(sorted({s % size for s in (1, 3, 5, 7, 13, size // 2 + 1, size - 1)} - {0}))
        if not row_invariance_self_test(matmul, in_features, size, dtype, seed=1, shifts=spread):
            continue
        tile = torch.randn(max(size, TILE_ROWS), in_features, generator=generator).to(dtype)
        tile[: min(size, TILE_ROWS)] = anchor_rows[: min(size, TILE_ROWS)]
        shared = min(size, TILE_ROWS)
        if torch.equal(matmul(tile[:size].contiguous())[:shared], anchor[:shared]):
            ladder.append(size)
    return tuple(ladder)
