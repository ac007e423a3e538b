"""`thinfer prune` on a tiny random Llama (GQA: 4 query heads in 2 KV groups, 8 blocks) with
the default model's real tokenizer, calibrated on the embedded real text.

A pruned checkpoint must be exactly the dense model without what was removed: HF transformers
with the block deleted (depth), or with the removed heads' and channels' output columns
zeroed (width: this also proves GQA integrity, since a query head paired with the wrong
K/V head would change the logits). Both thinfer and transformers reload it.
"""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch
from conftest import run_cli
from tiny_llama import save_tiny_llama

from thinfer import LLM, SamplingParams
from thinfer.bench.prune_variants import param_count
from thinfer.config import ModelConfig
from thinfer.loading import load_checkpoint
from thinfer.loading.hf_config import hf_model_from_checkpoint
from thinfer.models.shards import plan_shards
from thinfer.pruning.calibration import batch_of, text_splits
from thinfer.pruning.flap import input_statistics, prune_flap
from thinfer.pruning.hf_model import load_for_pruning
from thinfer.pruning.run import run_prune

transformers = pytest.importorskip("transformers")
PROMPT = "The history of the printing press begins in the fifteenth century"
FAST = dict(samples=2, eval_samples=2)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    """A tiny Llama checkpoint with SmolLM2's tokenizer (`tests/tiny_llama.py`)."""
    return save_tiny_llama(str(tmp_path_factory.mktemp("tiny")))


def hf(directory: str) -> torch.nn.Module:
    return transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits[0]


def thinfer_matches(directory: str, reference: torch.nn.Module, ids: list[int]) -> None:
    """thinfer's greedy tokens and their logprobs on `directory` equal `reference`'s."""
    out = (
        LLM(directory, dtype="float32", device="cpu", num_kv_blocks=32)
        .generate(ids, SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True, logprobs=0))[
            0
        ]
        .outputs[0]
    )
    with torch.no_grad():
        expected = reference.generate(
            torch.tensor([ids]), max_new_tokens=6, do_sample=False, eos_token_id=None
        )[0, len(ids) :].tolist()
    assert out.token_ids == expected
    full = torch.tensor([ids + expected])
    ref_lp = torch.log_softmax(logits(reference, full)[len(ids) - 1 : -1], dim=-1)
    for step, token in enumerate(expected):
        assert abs(out.logprobs[step][token] - float(ref_lp[step, token])) < 1e-4


@pytest.mark.parametrize("method", ["depth-ppl", "depth-taylor"])
def test_depth_pruning_equals_deleting_the_blocks_in_transformers(tiny, tmp_path, method):
    out = str(tmp_path / "pruned")
    report = run_prune(out, method, model=tiny, remove=2, **FAST)
    removed = report["removed_blocks"]
    assert len(removed) == 2 and len(report["block_scores"]) == 8
    if method == "depth-taylor":  # Taylor+ keeps the first 4 and the last 2 blocks
        assert set(removed) <= {4, 5}
    reference = hf(tiny)
    for block in sorted(removed, reverse=True):
        del reference.model.layers[block]
    reference.config.num_hidden_layers = 6
    for index, layer in enumerate(reference.model.layers):  # its KV cache indexes by layer
        layer.self_attn.layer_idx = index
    ids = load_checkpoint(tiny).tokenizer.encode(PROMPT)
    reloaded = hf(out)
    assert reloaded.config.num_hidden_layers == 6
    torch.testing.assert_close(
        logits(reloaded, torch.tensor([ids])), logits(reference, torch.tensor([ids]))
    )
    thinfer_matches(out, reference, ids)
    saved = json.load(open(os.path.join(out, "thinfer_pruning.json")))
    assert saved["pruned"]["parameters"] < saved["dense"]["parameters"]


@pytest.mark.parametrize("method", ["wanda-sp", "mag-sp"])
def test_width_pruning_equals_zeroing_what_was_removed(tiny, tmp_path, method):
    out = str(tmp_path / "pruned")
    report = run_prune(out, method, model=tiny, ratio=0.5, **FAST)
    shape = report["shape"]
    assert (shape["num_key_value_heads"], shape["num_attention_heads"]) == (1, 2)
    assert shape["intermediate_size"] == 24
    masked = hf(tiny)
    for layer, groups, channels in zip(
        masked.model.layers, shape["dropped_kv_groups"], shape["dropped_mlp_channels"], strict=True
    ):
        for group in groups:  # 2 query heads of 16 channels per group
            layer.self_attn.o_proj.weight.data[:, group * 32 : (group + 1) * 32] = 0
        layer.mlp.down_proj.weight.data[:, channels] = 0
    ids = load_checkpoint(tiny).tokenizer.encode(PROMPT)
    reloaded = hf(out)
    assert reloaded.config.num_key_value_heads == 1 and reloaded.config.intermediate_size == 24
    torch.testing.assert_close(
        logits(reloaded, torch.tensor([ids])), logits(masked, torch.tensor([ids]))
    )
    thinfer_matches(out, reloaded, ids)


def test_flap_adapts_widths_compensates_with_biases_and_reloads_in_thinfer(tiny, tmp_path):
    """FLAP gives layers their own widths; each projection's new bias makes the pruned layer
    output the dense one at the calibration mean input; thinfer serves the checkpoint (its
    narrow layers padded to the cache's width) exactly like the pruned HF model in memory,
    also under KV compression; HF cannot reload per-layer widths; TP refuses them."""
    out = str(tmp_path / "flap")
    report = run_prune(out, "flap", model=tiny, ratio=0.4, **FAST)
    shape = report["shape"]
    assert len(set(shape["layer_num_key_value_heads"])) == 2  # 1 or 2 groups, per layer
    assert report["pruned"]["parameters"] < report["dense"]["parameters"]

    pruned = load_for_pruning(tiny)  # the same pruning, in memory: HF runs it as it is
    dense = copy.deepcopy(pruned.model)
    batch = batch_of(text_splits(pruned.tokenizer, None)[0], FAST["samples"])
    stats = input_statistics(pruned, batch)
    assert prune_flap(pruned, 0.4, batch) == shape
    for i, (o_stats, down_stats) in enumerate(stats):
        dense_layer, layer = dense.model.layers[i], pruned.layers[i]
        groups = [g for g in range(2) if g not in shape["dropped_kv_groups"][i]]
        o_kept = [c for g in groups for c in range(g * 32, (g + 1) * 32)]
        channels = [c for c in range(48) if c not in shape["dropped_mlp_channels"][i]]
        for new, old, mean, kept in (
            (layer.self_attn.o_proj, dense_layer.self_attn.o_proj, o_stats.mean, o_kept),
            (layer.mlp.down_proj, dense_layer.mlp.down_proj, down_stats.mean, channels),
        ):
            with torch.no_grad():
                torch.testing.assert_close(new(mean[kept]), old(mean), atol=1e-5, rtol=1e-4)
                if len(kept) < mean.numel():  # without the bias it would not hold
                    assert not torch.allclose(new(mean[kept]) - new.bias, old(mean), atol=1e-4)

    ids = load_checkpoint(tiny).tokenizer.encode(PROMPT)
    thinfer_matches(out, pruned.model, ids)
    with pytest.raises((RuntimeError, ValueError)):
        transformers.AutoModelForCausalLM.from_pretrained(out)
    rebuilt = hf_model_from_checkpoint(load_checkpoint(out), torch.float32)  # HF, fitted
    torch.testing.assert_close(
        logits(rebuilt, torch.tensor([ids])), logits(pruned.model, torch.tensor([ids]))
    )
    config = ModelConfig.from_hf_dict(json.load(open(os.path.join(out, "config.json"))))
    assert param_count(config) == report["pruned"]["parameters"] == pruned.num_parameters()
    with pytest.raises(ValueError, match="differ in width"):
        plan_shards(config, 2)

    llm = LLM(out, dtype="float32", device="cpu", num_kv_blocks=32)
    heads = config.layer_num_key_value_heads
    padded = torch.full((8, 2, 5), 1e6)  # a padding head's score must not count
    for layer, count in enumerate(heads):
        padded[layer, :count] = torch.arange(5.0)
    mean = llm.engine.compression.head_average.mean(padded)
    torch.testing.assert_close(mean, torch.arange(5.0))
    compressed = SamplingParams(
        max_tokens=40,
        temperature=0.0,
        ignore_eos=True,
        kv_compression={"method": "h2o", "budget": 16, "scoring": "shared"},
    )
    result = llm.generate(ids, compressed)[0]
    assert len(result.outputs[0].token_ids) == 40 and result.metrics.peak_kv_slots <= 17


def test_bad_requests_fail_clearly_and_write_nothing(tiny, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("Too short to calibrate anything.")
    cases = [
        (dict(method="wanda-sp", ratio=1.5), "must be in \\(0, 1\\)"),
        (dict(method="depth-ppl", ratio=0.0), "must be in \\(0, 1\\)"),
        (dict(method="depth-ppl", remove=8), "cannot remove 8"),
        (dict(method="mag-sp", remove=2), "for depth pruning"),
        (dict(method="flapx", ratio=0.2), "use one of"),
        (dict(method="depth-ppl", remove=1, calib=[str(short)]), "token"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            run_prune(str(tmp_path / "out"), model=tiny, **FAST, **kwargs)
    (tmp_path / "taken").mkdir()
    with pytest.raises(ValueError, match="already exists"):
        run_prune(str(tmp_path / "taken"), "depth-ppl", model=tiny, remove=1, **FAST)
    assert sorted(os.listdir(tmp_path)) == ["short.txt", "taken"]  # nothing partial


def test_prune_command_line(tiny, tmp_path):
    out = tmp_path / "cli"
    result = run_cli(
        "prune",
        "--model",
        tiny,
        "--method",
        "depth-ppl",
        "--remove-blocks",
        "1",
        "--samples",
        "2",
        "--eval-samples",
        "2",
        "--output",
        str(out),
    )
    assert result.returncode == 0, result.stderr
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(out).st_mode & 0o777 == 0o777 & ~umask  # not mkdtemp's private 0700
    summary = json.loads(result.stdout)
    assert len(summary["removed_blocks"]) == 1 and "->" in summary["held_out_ppl"]
    again = run_cli(
        "prune", "--model", tiny, "--method", "mag-sp", "--ratio", "0.2", "--output", str(out)
    )
    assert again.returncode == 2 and "already exists" in again.stderr


def test_lora_healing_lowers_the_loss_and_is_merged_into_the_checkpoint(tiny, tmp_path):
    """20 LoRA steps on the calibration text: the training loss falls, the saved weights are
    the merged ones (no adapter files, other weights than the unhealed pruning) and thinfer
    serves them like transformers does."""
    plain = run_prune(str(tmp_path / "plain"), "depth-ppl", model=tiny, remove=2, **FAST)
    healed = run_prune(
        str(tmp_path / "healed"), "depth-ppl", model=tiny, remove=2, heal_steps=20, **FAST
    )
    assert healed["removed_blocks"] == plain["removed_blocks"]
    assert healed["healed"]["last_loss"] < healed["healed"]["first_loss"]
    assert healed["healed"]["ppl"] != healed["pruned"]["ppl"]
    files = os.listdir(tmp_path / "healed")
    assert "model.safetensors" in files and not any("adapter" in f for f in files)
    ids = load_checkpoint(tiny).tokenizer.encode(PROMPT)
    merged, unhealed = hf(str(tmp_path / "healed")), hf(str(tmp_path / "plain"))
    assert not torch.allclose(
        logits(merged, torch.tensor([ids])), logits(unhealed, torch.tensor([ids]))
    )
    thinfer_matches(str(tmp_path / "healed"), merged, ids)
