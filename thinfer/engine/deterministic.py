"""Turning a loaded model into a batch-invariant one, for `EngineConfig(deterministic=True)`.

In the deterministic mode a request's output (token ids and every logprob, bitwise) depends
only on the request: never on its batch mates, their number, arrival order, how its prefill
was chunked, preemption or `max_num_seqs`. Every computation whose result for one row could
change with the batch is replaced by one that sees a single shape per row:

- linear layers and lm_head: `thinfer.models.invariant_linear` (the native fp32 panels in one
  call, or fixed row tiles of a library kernel, on the CPU; the Triton kernel of
  `thinfer.kernels.invariant_matmul` on CUDA);
- on a CPU where the native kernels load (fp32, `fused_ops` left at "auto"): attention
  through the native decode kernel, every row a decode of its own
  (`thinfer.attention.native_invariant`), and the native layer ops, each row on its own;
  plain decode steps then take the native decoder stack, the same kernels in one call;
- elsewhere (CUDA, half dtypes, `fused_ops=False`): `thinfer.attention.invariant_paged`
  (each row alone, keys padded to a fixed split, decode and prefill rows computed alike),
  SiLU and RMSNorm from `thinfer.models.invariant_ops` (exact ops and `exp` only; one
  fixed-size program per row);
- column sums for compression: fixed-point, exact in any order (`invariant_paged`);
- sampling and the DynTS predictor: one row per call (`LLMEngine`, `CompressionStage`).

The properties these rest on (a library matmul's rows do not depend on their place in a
fixed-shape call, `exp` is pointwise) are checked here at start-up, for this device and
dtype, instead of assumed; a failed check is a RuntimeError naming it.
"""

from __future__ import annotations

import torch

from thinfer.attention.backend import INVARIANT_BACKEND, NATIVE_INVARIANT_BACKEND, AttentionBackend
from thinfer.attention.invariant_paged import check_bmm_rows
from thinfer.attention.native_invariant import check_native_rows
from thinfer.config import EngineConfig
from thinfer.kernels.cpu_native import native_library
from thinfer.models.fused import LayerOps, NativeLayerOps
from thinfer.models.invariant_ops import (
    INVARIANT_OPS,
    check_exp_is_pointwise,
    check_norm_rows,
    check_silu_rows,
)
from thinfer.models.linear import set_batch_invariant
from thinfer.models.llama import LlamaForCausalLM


def check_deterministic_config(config: EngineConfig) -> None:
    """ValueError for settings the deterministic mode would have to override: an explicit
    Triton attention backend, forced fused ops, or a GEMM dataflow table."""
    if not config.deterministic:
        return
    conflicts = []
    if config.attention_backend == "triton":
        conflicts.append("attention_backend='triton'")
    if config.fused_ops is True:
        conflicts.append("fused_ops=True")
    if config.gemm_dataflow is not None:
        conflicts.append("gemm_dataflow")
    if conflicts:
        raise ValueError(
            f"deterministic=True runs its own batch-invariant kernels and cannot be combined "
            f"with {', '.join(conflicts)} (leave them at their defaults)"
        )


def make_batch_invariant(
    net: LlamaForCausalLM, fused_ops: str | bool = "auto"
) -> tuple[AttentionBackend, LayerOps]:
    """Switch `net`'s linear layers to their batch-invariant path, check this device's
    kernels (RuntimeError if one is not invariant), and return the attention backend and
    layer ops the deterministic mode runs: the native ones on an fp32 CPU model where they
    load and `fused_ops` is "auto", the torch ones otherwise. ValueError for a quantized
    model."""
    weight = next(net.parameters())
    cfg = net.config
    # Both paths need it: the native one still takes its column sums through invariant_paged.
    check_bmm_rows(
        cfg.head_dim,
        cfg.num_attention_heads // cfg.num_key_value_heads,
        weight.dtype,
        weight.device,
    )
    if _native_applies(weight, fused_ops):
        ops = NativeLayerOps()
        check_norm_rows(cfg.hidden_size, weight.dtype, weight.device, ops)
        check_silu_rows(cfg.intermediate_size, weight.dtype, weight.device, ops)
        check_native_rows(cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim)
        set_batch_invariant(net, True)
        return NATIVE_INVARIANT_BACKEND, ops
    check_exp_is_pointwise(weight.device, torch.float32)
    check_norm_rows(cfg.hidden_size, weight.dtype, weight.device)
    set_batch_invariant(net, True)
    return INVARIANT_BACKEND, INVARIANT_OPS


def _native_applies(weight: torch.Tensor, fused_ops: str | bool) -> bool:
    """The native row-wise kernels serve the mode: fp32 on a CPU where they load."""
    return (
        fused_ops == "auto"
        and weight.device.type == "cpu"
        and weight.dtype == torch.float32
        and native_library() is not None
    )


def make_batch_variant(net: LlamaForCausalLM) -> None:
    """Return `net`'s linear layers to their fast paths (an engine built without the mode
    on a model an earlier deterministic engine used)."""
    set_batch_invariant(net, False)
