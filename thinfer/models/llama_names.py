"""HF checkpoint tensor names of a Llama-family model, and where each lands in thinfer's
fused parameters (q/k/v rows in `qkv_proj`, gate/up rows in `gate_up_proj`)."""

from __future__ import annotations

from thinfer.config import ModelConfig
from thinfer.models.shards import ShardLayout, layer_layout


def expected_tensor_names(cfg: ModelConfig) -> list[str]:
    """HF tensor names a model of shape `cfg` needs."""
    names = ["model.embed_tokens.weight", "model.norm.weight"]
    if not cfg.tie_word_embeddings:
        names.append("lm_head.weight")
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        names += [p + "input_layernorm.weight", p + "post_attention_layernorm.weight"]
        names += [p + f"self_attn.{x}_proj.weight" for x in "qkvo"]
        names += [p + f"mlp.{x}_proj.weight" for x in ("gate", "up", "down")]
        if cfg.attention_bias:
            names += [p + f"self_attn.{x}_proj.bias" for x in "qkv"]
        if cfg.output_bias:
            names += [p + "self_attn.o_proj.bias", p + "mlp.down_proj.bias"]
    return names


def parameter_for(
    hf_name: str, cfg: ModelConfig, layout: ShardLayout
) -> tuple[str | None, tuple[int, int] | None]:
    """HF name -> (thinfer parameter name, row range inside a fused parameter), sized for
    this rank's `layout` and the tensor's own layer; (None, None) for tensors thinfer does
    not keep (rotary tables, a tied lm_head)."""
    if "rotary_emb" in hf_name:
        return None, None
    if hf_name == "lm_head.weight" and cfg.tie_word_embeddings:
        return None, None
    name = hf_name.removeprefix("model.")
    if name.startswith("layers."):
        layout = layer_layout(layout, cfg, int(name.split(".")[1]))
    head_dim = cfg.head_dim
    q, kv, ffn = layout.num_heads * head_dim, layout.num_kv_heads * head_dim, layout.ffn_size
    fused = {
        "self_attn.q_proj": ("self_attn.qkv_proj", (0, q)),
        "self_attn.k_proj": ("self_attn.qkv_proj", (q, q + kv)),
        "self_attn.v_proj": ("self_attn.qkv_proj", (q + kv, q + 2 * kv)),
        "mlp.gate_proj": ("mlp.gate_up_proj", (0, ffn)),
        "mlp.up_proj": ("mlp.gate_up_proj", (ffn, 2 * ffn)),
    }
    for part, (target, rows) in fused.items():
        if f".{part}." in name:
            return name.replace(part, target), rows
    return name, None
