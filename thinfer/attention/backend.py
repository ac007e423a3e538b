"""Attention backends: the pair of functions a model layer calls to write its keys and values
into the paged cache and to attend over it.

"torch" (`thinfer.attention.torch_paged`) runs anywhere and is the ground truth; "triton"
(`thinfer.attention.triton_paged`) runs the Triton kernels on CUDA. "auto" picks triton on a
CUDA device when triton imports, torch otherwise. Both honour the same contract, so a backend
can be swapped without touching the model, the engine or the compression policies.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from thinfer.attention import invariant_paged, native_invariant, torch_paged
from thinfer.attention.metadata import AttentionMetadata
from thinfer.config import ATTENTION_BACKENDS

StoreKV = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], None]
PagedAttention = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, AttentionMetadata, float], torch.Tensor
]


@dataclass(frozen=True)
class AttentionBackend:
    """`store_kv(k, v, k_cache, v_cache, slot_mapping)` and
    `paged_attention(q, k_cache, v_cache, meta, scale) -> out`, as in `torch_paged`.

    `supports_cuda_graphs`: a step of single-token decodes without capture reads only the
    metadata's tensors (never its host-side lists or a per-step plan) and launches work whose
    shapes depend only on theirs, so it can be captured in a CUDA graph and replayed on
    refilled buffers (`thinfer.engine.decode_graphs`).
    """

    name: str
    store_kv: StoreKV
    paged_attention: PagedAttention
    supports_cuda_graphs: bool = False


TORCH_BACKEND = AttentionBackend("torch", torch_paged.store_kv, torch_paged.paged_attention)
# The deterministic mode's backend: every row computed alone (`invariant_paged`).
INVARIANT_BACKEND = AttentionBackend(
    "invariant", torch_paged.store_kv, invariant_paged.paged_attention
)
# ... and where the CPU's native kernels load: every row through the native decode kernel.
NATIVE_INVARIANT_BACKEND = AttentionBackend(
    "invariant-native", torch_paged.store_kv, native_invariant.paged_attention
)


def _triton_backend(device: torch.device) -> AttentionBackend:
    try:
        from thinfer.attention import triton_paged
    except ImportError as e:
        raise ValueError(
            f"attention backend 'triton' needs triton, which cannot be imported: {e}"
        ) from e
    if device.type != "cuda" and not triton_paged.kernels_interpreted():
        raise ValueError(
            f"attention backend 'triton' needs a CUDA device, got {device.type!r} (on CPU the "
            "kernels run only through Triton's interpreter: TRITON_INTERPRET=1)"
        )
    return AttentionBackend(
        "triton", triton_paged.store_kv, triton_paged.paged_attention, supports_cuda_graphs=True
    )


def select_backend(name: str, device: torch.device) -> AttentionBackend:
    """The backend called `name` ("auto", "torch" or "triton") for a model on `device`.

    Raises ValueError for an unknown name, and for "triton" when triton cannot be imported
    or the device is not CUDA (unless Triton interprets the kernels, as CPU tests do).
    """
    if name not in ATTENTION_BACKENDS:
        raise ValueError(
            f"attention backend: unknown value {name!r}; use {', '.join(ATTENTION_BACKENDS)}"
        )
    if name == "torch" or (name == "auto" and device.type != "cuda"):
        return TORCH_BACKEND
    if name == "auto":
        try:
            return _triton_backend(device)
        except ValueError:
            return TORCH_BACKEND
    return _triton_backend(device)
