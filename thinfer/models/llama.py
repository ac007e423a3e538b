"""The Llama-family decoder (Llama 2/3, Mistral, Qwen2, SmolLM2) over a flat token batch.

Projections are fused (q/k/v into one matrix, gate/up into another) so each layer runs three
large matmuls; `load_weights` maps HF tensor names onto the fused parameters. The small ops
between them (residual add + norm, RoPE, SiLU-multiply) come from `thinfer.models.fused`:
plain torch, or fused Triton kernels (`set_layer_ops`; the engine's `fused_ops` switch).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from thinfer.attention.backend import TORCH_BACKEND, AttentionBackend
from thinfer.attention.metadata import AttentionMetadata
from thinfer.config import ModelConfig
from thinfer.models.collectives import SINGLE_PROCESS, Collectives
from thinfer.models.fused import TORCH_OPS, LayerOps, Rotate
from thinfer.models.linear import Linear, unpack_linears
from thinfer.models.llama_names import expected_tensor_names, parameter_for
from thinfer.models.native_stack import NativeDecoderStack, Unsupported
from thinfer.models.norm import RMSNorm
from thinfer.models.rope import RotaryEmbedding
from thinfer.models.shards import ShardLayout, full_layout, layer_layout, shard_tensor
from thinfer.models.vocab_parallel import VocabParallelEmbedding


class Attention(nn.Module):
    """Self-attention with GQA over this rank's heads (`layout`); keys are rotated before
    they are cached. `backend` writes and reads the paged cache (see
    `LlamaForCausalLM.set_attention_backend`). Under tensor parallelism o_proj is
    row-parallel: its partial outputs are summed over the ranks.

    A layer narrower than the cache (`cache_kv_heads`, a FLAP-pruned model's widest layer)
    pads its keys, values and queries with zero heads: the padded KV heads stay zero in the
    cache, their outputs are dropped before o_proj, so the cache stays one rectangular
    tensor for every kernel and compression method."""

    def __init__(
        self,
        cfg: ModelConfig,
        layer_index: int,
        layout: ShardLayout,
        collectives: Collectives = SINGLE_PROCESS,
        cache_kv_heads: int | None = None,
    ) -> None:
        super().__init__()
        self.layer_index = layer_index
        self.num_heads = layout.num_heads
        self.num_kv_heads = layout.num_kv_heads
        self.padded_kv_heads = (cache_kv_heads or self.num_kv_heads) - self.num_kv_heads
        self.head_dim = cfg.head_dim
        self.collectives = collectives
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.scale = self.head_dim**-0.5
        self.qkv_proj = Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, cfg.attention_bias)
        self.o_proj = Linear(self.q_size, cfg.hidden_size, cfg.output_bias)
        self.backend: AttentionBackend = TORCH_BACKEND

    def forward(
        self,
        x: torch.Tensor,
        rotate: Rotate,
        kv_cache: tuple[torch.Tensor, torch.Tensor],
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        """x [T, hidden] -> [T, hidden], writing this step's keys/values into the cache."""
        tokens = x.shape[0]
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(tokens, self.num_heads, self.head_dim)
        k = k.view(tokens, self.num_kv_heads, self.head_dim)
        v = v.view(tokens, self.num_kv_heads, self.head_dim)
        q, k = rotate(q, k)
        if self.padded_kv_heads:
            pad = self.padded_kv_heads
            k, v = F.pad(k, (0, 0, 0, pad)), F.pad(v, (0, 0, 0, pad))
            q = F.pad(q, (0, 0, 0, pad * (self.num_heads // self.num_kv_heads)))
        if meta.capture is not None:
            meta.capture.record_queries(q)
        self.backend.store_kv(k, v, kv_cache[0], kv_cache[1], meta.slot_mapping)
        out = self.backend.paged_attention(q, kv_cache[0], kv_cache[1], meta, self.scale)
        if self.padded_kv_heads:  # drop the padding heads' outputs
            out = out.reshape(tokens, -1)[:, : self.q_size]
        return self.collectives.all_reduce(self.o_proj(out.reshape(tokens, self.q_size)))


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x)) over this rank's channels; under
    tensor parallelism down_proj's partial outputs are summed over the ranks."""

    def __init__(
        self, cfg: ModelConfig, width: int, collectives: Collectives = SINGLE_PROCESS
    ) -> None:
        super().__init__()
        self.gate_up_proj = Linear(cfg.hidden_size, 2 * width)
        self.down_proj = Linear(width, cfg.hidden_size, cfg.output_bias)
        self.ops: LayerOps = TORCH_OPS
        self.collectives = collectives

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, hidden] -> [T, hidden]."""
        return self.collectives.all_reduce(self.down_proj(self.ops.silu_mul(self.gate_up_proj(x))))


class DecoderLayer(nn.Module):
    """Pre-norm transformer block whose residual add is left to the next norm (see
    `thinfer.models.fused`)."""

    def __init__(
        self,
        cfg: ModelConfig,
        layer_index: int,
        layout: ShardLayout,
        collectives: Collectives = SINGLE_PROCESS,
    ) -> None:
        super().__init__()
        own = layer_layout(layout, cfg, layer_index)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer_index, own, collectives, layout.num_kv_heads)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg, own.ffn_size, collectives)
        self.ops: LayerOps = TORCH_OPS

    def forward(
        self,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        rotate: Rotate,
        kv_cache: tuple[torch.Tensor, torch.Tensor],
        meta: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(previous block's output, residual stream before it) -> (this block's MLP output,
        residual stream before it). The first layer gets the embeddings and residual None."""
        if residual is None:
            residual, normed = x, self.ops.rms_norm(x, self.input_layernorm)
        else:
            normed, residual = self.ops.add_rms_norm(x, residual, self.input_layernorm)
        attended = self.self_attn(normed, rotate, kv_cache, meta)
        normed, residual = self.ops.add_rms_norm(attended, residual, self.post_attention_layernorm)
        return self.mlp(normed), residual


class LlamaForCausalLM(nn.Module):
    """Decoder over flat token batches; `forward` returns final hidden states.

    With a `layout` of several ranks (`thinfer.models.shards`) the model holds one rank's
    shard and `collectives` joins the ranks: every rank ends each block, and `forward`, with
    the full hidden states, and `compute_logits` with the full logits. `config` stays the
    whole model's shape.
    """

    def __init__(
        self,
        cfg: ModelConfig,
        dtype: torch.dtype,
        device: torch.device,
        layout: ShardLayout | None = None,
        collectives: Collectives = SINGLE_PROCESS,
    ) -> None:
        super().__init__()
        self.config = cfg
        self.layout = layout = layout or full_layout(cfg)
        if layout.world_size != collectives.world_size:
            raise ValueError(
                f"a layout of {layout.world_size} ranks needs collectives over as many ranks, "
                f"got {collectives.world_size}"
            )
        self.collectives = collectives
        self.rotary_emb = RotaryEmbedding(
            cfg.head_dim,
            cfg.max_position_embeddings,
            cfg.rope_theta,
            cfg.rope_scaling,
            dtype,
            device,
        )
        self.embed_tokens = VocabParallelEmbedding(
            layout.vocab_rows, cfg.hidden_size, layout.vocab[0], collectives
        )
        self.layers = nn.ModuleList(
            DecoderLayer(cfg, i, layout, collectives) for i in range(cfg.num_hidden_layers)
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = Linear(cfg.hidden_size, layout.vocab_rows)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.attention_backend: AttentionBackend = TORCH_BACKEND
        self.ops: LayerOps = TORCH_OPS
        # Decode steps in one native call (`set_native_decoder`); None: layer by layer.
        self.native_stack: NativeDecoderStack | None = None
        self.to(dtype=dtype, device=device)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        """Flat input_ids/positions [T] -> normed hidden states [T, hidden]."""
        x = self.embed_tokens(input_ids)
        stack = self.native_stack
        if stack is not None and stack.applies(meta, input_ids.shape[0]):
            return stack.run(x, positions, kv_caches, meta)
        rotate = self.ops.rotation(self.rotary_emb, positions)
        residual = None
        for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
            x, residual = layer(x, residual, rotate, kv_cache, meta)
        assert residual is not None  # a model has at least one layer
        return self.ops.add_rms_norm(x, residual, self.norm)[0]

    def set_attention_backend(self, backend: AttentionBackend) -> None:
        """Make every layer write and read its KV cache through `backend` (and drop the
        native decoder: `set_native_decoder` again after)."""
        self.attention_backend = backend
        self.native_stack = None
        for layer in self.layers:
            layer.self_attn.backend = backend

    def set_layer_ops(self, ops: LayerOps) -> None:
        """Run every layer's small ops (add + norm, RoPE, SiLU-multiply) through `ops`: plain
        torch or the fused kernels (`thinfer.models.fused.select_layer_ops`), and drop the
        native decoder (`set_native_decoder` again after)."""
        self.ops = ops
        self.native_stack = None
        for layer in self.layers:
            layer.ops = layer.mlp.ops = ops

    def set_native_decoder(self, enabled: bool) -> str | None:
        """Run plain decode steps in one native call (`thinfer.models.native_stack`) when
        `enabled` and the model allows it, with the weights as they are now; returns why
        not (None when it runs). Call it after anything that changes the weights."""
        self.native_stack = None
        if not enabled:
            return "disabled"
        try:
            self.native_stack = NativeDecoderStack(self)
        except Unsupported as reason:
            return str(reason)
        return None

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Hidden states [N, hidden] -> logits [N, vocab] (on every rank)."""
        return self.collectives.gather_vocab(self.lm_head(hidden), self.config.vocab_size)

    def init_dummy_weights(self, seed: int = 0) -> None:
        """Random weights (std 0.02, unit norms) for benchmarks without a checkpoint.

        They are drawn on the weights' device (a 7B model's 27 GB of fp32 draws would take
        minutes on the CPU), so the same seed gives other values on a GPU than on the CPU.
        """
        unpack_linears(self)
        self.native_stack = None
        generators: dict[torch.device, torch.Generator] = {}
        for name, param in self.named_parameters():
            if name.endswith("norm.weight"):
                param.data.fill_(1.0)
                continue
            device = param.device
            if device not in generators:
                generators[device] = torch.Generator(device=device).manual_seed(seed)
            values = torch.randn(
                param.shape, generator=generators[device], dtype=torch.float32, device=device
            )
            param.data.copy_(values.mul_(0.02).to(param.dtype))

    def load_weights(self, tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy HF-named tensors into (fused) parameters, each cut to this rank's shard as it
        is read (a rank holds one whole checkpoint tensor at most, never the whole model);
        every parameter must be covered."""
        unpack_linears(self)
        self.native_stack = None
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for hf_name, tensor in tensors:
            name, rows = parameter_for(hf_name, self.config, self.layout)
            if name is None:
                continue
            if name not in params:
                raise ValueError(f"checkpoint tensor {hf_name!r} has no place in the model")
            param = params[name]
            tensor = shard_tensor(hf_name, tensor, self.layout, self.config.head_dim)
            target = param.data if rows is None else param.data[rows[0] : rows[1]]
            if tuple(target.shape) != tuple(tensor.shape):
                raise ValueError(
                    f"checkpoint tensor {hf_name!r} has shape {tuple(tensor.shape)}, "
                    f"expected {tuple(target.shape)}"
                )
            target.copy_(tensor.to(param.dtype))
            loaded.add(hf_name)
        expected = set(expected_tensor_names(self.config))
        missing = sorted(expected - loaded)
        if missing:
            shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
            raise ValueError(f"checkpoint is missing {len(missing)} tensor(s): {shown}")
