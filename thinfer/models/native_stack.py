"""A decode step of the whole decoder in one native call (`kernels/cpu/decoder_stack.c`).

On a CPU, a decode step of a small model spends a large part of its time in Python between
the kernels: a dozen calls per layer (norms, three products, RoPE, KV store, attention,
SiLU), each with its module dispatch and argument checks. `NativeDecoderStack` describes
every layer's weights, norms and KV caches to the C side once (ctypes structures holding
raw pointers, with the tensors they point into kept alive here), and a step then costs one
call. It runs the same kernels in the same order on the same values as the per-layer path
with the native layer ops (`thinfer.models.fused.NativeLayerOps`), so its hidden states are
bitwise the same.

It applies (`NativeDecoderStack.build` returns None otherwise, with the reason in
`unsupported_reason`) to a single-process fp32 CPU model whose layers all run native
kernels: fp32 layers packed in panels or for the native GEMV, or int4 / int8 weights on the
native kernels; no padded KV heads, no dataflow-table layers, and batch-invariant layers only
as the deterministic mode runs fp32 panels (one call on all rows). A step takes it
(`applies`) when every sequence decodes one token, no compression signal is recorded, and
the batch is small enough for every product's native kernel (panels: any; the fp32 GEMV:
up to `NATIVE_FP32_MAX_ROWS` rows; row-major q4/q8: below `WHOLE_WEIGHT_MIN_ROWS`).
The model owns the stack (`LlamaForCausalLM.set_native_decoder`); it holds pointers into
the weights, so anything that replaces them must rebuild it (the model's own weight loaders
and its layer-ops / backend setters drop it).
"""

from __future__ import annotations

import ctypes
from typing import TYPE_CHECKING

import torch

from thinfer.attention.metadata import AttentionMetadata
from thinfer.kernels.cpu_native import native_library
from thinfer.kernels.cpu_qgemm import WHOLE_WEIGHT_MIN_ROWS
from thinfer.models.int4 import Int4Weight
from thinfer.models.int8 import Int8Weight
from thinfer.models.invariant_linear import ANY_ROWS
from thinfer.models.linear import NATIVE_FP32_MAX_ROWS, Linear

if TYPE_CHECKING:
    from thinfer.models.llama import LlamaForCausalLM

# As the enum of decoder_stack.c.
PRODUCT_KINDS = {
    "f32": 0,
    "q4_rows": 1,
    "q8_rows": 2,
    "q4_panels": 3,
    "q8_panels": 4,
    "f32_panels": 5,
}
_i64, _ptr, _f32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_float
UNLIMITED_ROWS = 1 << 62  # a kernel that takes any batch (the panel products)


class _Product(ctypes.Structure):
    _fields_ = [
        ("kind", _i64),
        ("n", _i64),
        ("k", _i64),
        ("weight", _ptr),
        ("extra", _ptr),
        ("bias", _ptr),
    ]


class _Layer(ctypes.Structure):
    _fields_ = [
        ("q_heads", _i64),
        ("kv_heads", _i64),
        ("ffn", _i64),
        ("input_norm", _ptr),
        ("post_norm", _ptr),
        ("qkv", _Product),
        ("o", _Product),
        ("gate_up", _Product),
        ("down", _Product),
        ("k_cache", _ptr),
        ("v_cache", _ptr),
    ]


class _Stack(ctypes.Structure):
    _fields_ = [
        ("num_layers", _i64),
        ("hidden", _i64),
        ("head_dim", _i64),
        ("block_size", _i64),
        ("eps", _f32),
        ("scale", _f32),
        ("cos", _ptr),
        ("sin", _ptr),
        ("final_norm", _ptr),
        ("layers", ctypes.POINTER(_Layer)),
    ]


class Unsupported(Exception):
    """Why a model cannot run on the native stack."""


def _fp32(tensor: torch.Tensor, what: str) -> torch.Tensor:
    if tensor.dtype != torch.float32 or tensor.device.type != "cpu":
        raise Unsupported(f"{what} is {tensor.dtype} on {tensor.device.type}, not fp32 on the CPU")
    if not tensor.is_contiguous():
        raise Unsupported(f"{what} is not contiguous")
    return tensor


def _product(linear: Linear, name: str, keep: list[torch.Tensor]) -> tuple[_Product, int]:
    """The C description of one layer's product and the most rows its kernel takes."""
    if linear.dataflow is not None:
        raise Unsupported(f"{name} runs a dataflow-table kernel")
    tiles = linear.invariant_tiles  # the deterministic mode's panels in one call: same kernel
    if tiles is not None and (tiles != (ANY_ROWS,) or linear._panels is None):
        raise Unsupported(f"{name} runs a batch-invariant tiled kernel")
    n, k = linear.weight.shape
    bias = None if linear.bias is None else _fp32(linear.bias.detach(), f"{name}.bias")
    quantized = linear.quantized
    if isinstance(quantized, Int4Weight) and quantized._native is not None:
        blocks = quantized._native
        if blocks.panels is not None:
            tensors, kind, rows = [blocks.panels.codes, blocks.panels.factors], "q4_panels", None
        else:
            tensors, kind = [blocks.codes, blocks.scales_mins], "q4_rows"
            rows = WHOLE_WEIGHT_MIN_ROWS - 1
    elif isinstance(quantized, Int8Weight) and quantized.backend == "native":
        if quantized._panels is not None:
            tensors, kind, rows = [quantized._panels, quantized._scales], "q8_panels", None
        else:
            tensors, kind = [quantized._codes, quantized._scales], "q8_rows"
            rows = WHOLE_WEIGHT_MIN_ROWS - 1
    elif quantized is None and linear._panels is not None:
        tensors, kind, rows = [linear._panels], "f32_panels", None
    elif quantized is None and linear._native_fp32:
        tensors, kind = [_fp32(linear.weight.detach(), f"{name}.weight")], "f32"
        rows = NATIVE_FP32_MAX_ROWS
    else:
        raise Unsupported(f"{name} does not run a native kernel")
    keep.extend(tensors + ([] if bias is None else [bias]))
    pointers = [tensor.data_ptr() for tensor in tensors] + [None]
    bias_pointer = None if bias is None else bias.data_ptr()
    product = _Product(PRODUCT_KINDS[kind], n, k, pointers[0], pointers[1], bias_pointer)
    return product, UNLIMITED_ROWS if rows is None else rows


class NativeDecoderStack:
    """One model's layers described to `decoder_stack.c`; `run` does a decode step."""

    def __init__(self, model: LlamaForCausalLM) -> None:
        """Raises `Unsupported` (with the reason) for a model it cannot run."""
        library = native_library()
        if library is None:
            raise Unsupported("the native CPU kernels are unavailable here")
        if model.collectives.world_size > 1:
            raise Unsupported("tensor parallelism joins the ranks between layers")
        self._function = library.decoder_stack
        self._keep: list[torch.Tensor] = []
        rotary = model.rotary_emb
        cos, sin = _fp32(rotary.cos, "the RoPE table"), _fp32(rotary.sin, "the RoPE table")
        final_norm = _fp32(model.norm.weight.detach(), "norm.weight")
        self._keep += [cos, sin, final_norm]
        layers = (_Layer * len(model.layers))()
        self.max_rows = UNLIMITED_ROWS
        eps = {model.norm.eps}
        for index, layer in enumerate(model.layers):
            attention, mlp = layer.self_attn, layer.mlp
            if attention.padded_kv_heads:
                raise Unsupported(f"layer {index} pads its KV heads (a FLAP-pruned model)")
            entry = layers[index]
            entry.q_heads, entry.kv_heads = attention.num_heads, attention.num_kv_heads
            entry.ffn = mlp.down_proj.weight.shape[1]
            norms = (
                layer.input_layernorm.weight.detach(),
                layer.post_attention_layernorm.weight.detach(),
            )
            for norm_name, norm in zip(("input_norm", "post_norm"), norms, strict=True):
                setattr(entry, norm_name, _fp32(norm, f"layer {index} norm").data_ptr())
                self._keep.append(norm)
            eps |= {layer.input_layernorm.eps, layer.post_attention_layernorm.eps}
            for slot, linear in (
                ("qkv", attention.qkv_proj),
                ("o", attention.o_proj),
                ("gate_up", mlp.gate_up_proj),
                ("down", mlp.down_proj),
            ):
                product, rows = _product(linear, f"layer {index} {slot}", self._keep)
                setattr(entry, slot, product)
                self.max_rows = min(self.max_rows, rows)
        if len(eps) != 1:
            raise Unsupported(f"the norms differ in eps: {sorted(eps)}")
        first = model.layers[0].self_attn
        self._layers = layers
        self._stack = _Stack(
            len(model.layers),
            model.config.hidden_size,
            first.head_dim,
            0,
            eps.pop(),
            first.scale,
            cos.data_ptr(),
            sin.data_ptr(),
            final_norm.data_ptr(),
            ctypes.cast(layers, ctypes.POINTER(_Layer)),
        )
        self._caches: list[tuple[torch.Tensor, torch.Tensor]] | None = None

    def applies(self, meta: AttentionMetadata, tokens: int) -> bool:
        """True when this step can run here: every sequence decodes one token, no attention
        signal is recorded, and the batch fits every product's native kernel."""
        return (
            meta.capture is None
            and meta.num_decodes == tokens == meta.num_seqs
            and tokens <= self.max_rows
        )

    def _point_at(self, kv_caches: list[tuple[torch.Tensor, torch.Tensor]], block: int) -> None:
        """Point the layers at these KV caches (once per cache list, not per step)."""
        if len(kv_caches) != len(self._layers):
            raise ValueError(f"{len(kv_caches)} KV caches for {len(self._layers)} layers")
        for entry, (k_cache, v_cache) in zip(self._layers, kv_caches, strict=True):
            entry.k_cache = _fp32(k_cache, "a KV cache").data_ptr()
            entry.v_cache = _fp32(v_cache, "a KV cache").data_ptr()
        self._stack.block_size = block
        self._caches = kv_caches

    def run(
        self,
        embeddings: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        """The final normed hidden states [T, hidden] of a decode step whose tokens'
        embeddings are `embeddings` [T, hidden] (overwritten), writing every layer's keys
        and values into `kv_caches`."""
        if kv_caches is not self._caches:
            self._point_at(kv_caches, meta.block_size)
        hidden = embeddings.contiguous()
        positions = positions.contiguous()
        tables = meta.block_tables.contiguous()
        slots, lengths = meta.slot_mapping.contiguous(), meta.context_lens.contiguous()
        self._function(
            ctypes.byref(self._stack),
            hidden.shape[0],
            hidden.data_ptr(),
            positions.data_ptr(),
            slots.data_ptr(),
            tables.data_ptr(),
            tables.shape[1],
            lengths.data_ptr(),
        )
        return hidden
