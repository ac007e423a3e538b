"""The native decoder stack (`thinfer.models.native_stack`, one C call per decode step)
against the layer-by-layer path it replaces: the same tokens and bitwise the same
log-probabilities on ragged batches, fp32 and quantized; and it stays out of the steps and
models it cannot run (compression signals, prefill, padded heads, batch-invariant layers,
torch layer ops, the deterministic mode)."""

from __future__ import annotations

import pytest
import torch

from thinfer import LLM, SamplingParams
from thinfer.attention.metadata import AttentionMetadata
from thinfer.kernels.cpu_native import native_library
from thinfer.kernels.cpu_panels import panels_available
from thinfer.kernels.cpu_qgemm import WHOLE_WEIGHT_MIN_ROWS
from thinfer.models.linear import NATIVE_FP32_MAX_ROWS, set_batch_invariant
from thinfer.models.native_stack import UNLIMITED_ROWS, NativeDecoderStack

pytestmark = pytest.mark.skipif(native_library() is None, reason="no native CPU kernels here")

# prompt lengths across block boundaries (block size 16): one, two and three blocks
PROMPTS = [[1, *range(5, 8)], [1, *range(40, 59)], [1, *range(100, 133)], [1, 9, 10]]


def _generate(llm: LLM, prompts: list[list[int]], max_tokens: int) -> list[tuple]:
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, logprobs=1)
    outputs = llm.generate(prompts, params, use_tqdm=False)
    return [
        (tuple(out.outputs[0].token_ids), tuple(map(str, out.outputs[0].logprobs)))
        for out in outputs
    ]


def _with_and_without_stack(
    llm: LLM, prompts: list[list[int]], max_tokens: int, monkeypatch: pytest.MonkeyPatch
) -> tuple[list[tuple], list[tuple], int]:
    """(outputs through the stack, outputs layer by layer, decode steps the stack ran)."""
    runs: list[int] = []
    original = NativeDecoderStack.run

    def counted(self: NativeDecoderStack, *args: object) -> torch.Tensor:
        runs.append(1)
        return original(self, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(NativeDecoderStack, "run", counted)
    model = llm.engine.model
    assert model.native_stack is not None
    fused = _generate(llm, prompts, max_tokens)
    assert model.set_native_decoder(False) == "disabled"
    try:
        layered = _generate(llm, prompts, max_tokens)
    finally:
        assert model.set_native_decoder(True) is None
    return fused, layered, len(runs)


@pytest.mark.parametrize("quantization", [None, "int4", "int8"])
def test_decode_steps_equal_the_layer_path_bitwise(
    quantization: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    llm = LLM(
        model="tiny",
        load_format="dummy",
        device="cpu",
        num_kv_blocks=64,
        max_num_seqs=3,  # the fourth prompt joins later: batches of changing size
        quantization=quantization,
    )
    fused, layered, runs = _with_and_without_stack(llm, PROMPTS, 10, monkeypatch)
    assert fused == layered
    assert runs >= 9  # the decode steps took it; prefill steps did not


def test_default_model_bitwise_with_and_without(llm: LLM, monkeypatch: pytest.MonkeyPatch) -> None:
    """SmolLM2: head size 64 (the attention's register-held value sums), GQA 9 / 3."""
    fused, layered, runs = _with_and_without_stack(llm, PROMPTS[:3], 6, monkeypatch)
    assert fused == layered and runs == 5


def test_row_limits_follow_the_kernels() -> None:
    def stack_of(quantization: str | None) -> NativeDecoderStack | None:
        llm = LLM(
            model="tiny",
            load_format="dummy",
            device="cpu",
            num_kv_blocks=16,
            quantization=quantization,
        )
        return llm.engine.model.native_stack

    stack = stack_of(None)
    assert stack is not None
    assert stack.max_rows == (UNLIMITED_ROWS if panels_available() else NATIVE_FP32_MAX_ROWS)
    stack = stack_of("int4")
    assert stack is not None
    assert stack.max_rows == (UNLIMITED_ROWS if panels_available() else WHOLE_WEIGHT_MIN_ROWS - 1)
    meta = AttentionMetadata(
        slot_mapping=torch.zeros(2, dtype=torch.long),
        block_tables=torch.zeros(2, 1, dtype=torch.long),
        context_lens=torch.ones(2, dtype=torch.long),
        context_lens_list=[1, 1],
        query_lens_list=[1, 1],
        query_starts_list=[0, 1],
        num_decodes=2,
        block_size=16,
    )
    assert stack.applies(meta, 2)
    meta.num_decodes = 1  # the second sequence prefills
    assert not stack.applies(meta, 2)
    meta.num_decodes, meta.capture = 2, object()  # type: ignore[assignment]
    assert not stack.applies(meta, 2)


def test_models_and_modes_it_cannot_run_keep_the_layer_path() -> None:
    def tiny(**kwargs: object) -> LLM:
        return LLM(model="tiny", load_format="dummy", device="cpu", num_kv_blocks=16, **kwargs)

    assert tiny(fused_ops=False).engine.model.native_stack is None
    assert tiny(deterministic=True, fused_ops=False).engine.model.native_stack is None
    # the deterministic mode's panels in one call are the stack's own kernel
    assert (tiny(deterministic=True).engine.model.native_stack is not None) == panels_available()
    model = tiny().engine.model
    model.layers[1].self_attn.padded_kv_heads = 1
    assert "layer 1 pads its KV heads" in str(model.set_native_decoder(True))
    assert model.native_stack is None
    model.layers[1].self_attn.padded_kv_heads = 0
    set_batch_invariant(model, True)
    model.layers[1].mlp.down_proj.invariant_tiles = (16,)  # a library kernel's row tiles
    assert "batch-invariant tiled" in str(model.set_native_decoder(True))
    set_batch_invariant(model, False)
    assert model.set_native_decoder(True) is None
    model.init_dummy_weights(1)  # new weights: the stack is dropped, not left stale
    assert model.native_stack is None
