"""Llama (with Llama-3 rope scaling), Mistral and Qwen2 (q/k/v bias) from HF safetensors dirs.

Tiny random models are saved with transformers' `save_pretrained`, loaded by thinfer, and
compared with transformers' own greedy generation on each prompt alone.
"""

from __future__ import annotations

import pytest
import torch

from thinfer import LLM, SamplingParams

transformers = pytest.importorskip("transformers")

COMMON = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    initializer_range=0.3,
)

FAMILIES = {
    "llama3-scaled": lambda: transformers.LlamaConfig(
        **COMMON,
        rope_theta=500000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    ),
    "llama-tied": lambda: transformers.LlamaConfig(**COMMON, tie_word_embeddings=True),
    "mistral": lambda: transformers.MistralConfig(**COMMON, sliding_window=None),
    "qwen2": lambda: transformers.Qwen2Config(**COMMON, tie_word_embeddings=False),
}

PROMPTS = [[3, 17, 99, 4], [200, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 100, 101], [42]]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_matches_transformers(family, tmp_path):
    torch.manual_seed(0)
    hf_config = FAMILIES[family]()
    hf = transformers.AutoModelForCausalLM.from_config(hf_config).eval()
    if family == "qwen2":
        for layer in hf.model.layers:  # make the biases matter
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                torch.nn.init.normal_(proj.bias, std=0.5)
    hf.save_pretrained(tmp_path)
    hf.generation_config.eos_token_id = None  # ignore EOS like ignore_eos=True, no masking
    llm = LLM(model=str(tmp_path), dtype="float32", device="cpu", num_kv_blocks=64)
    if family == "qwen2":
        assert llm.model_config.attention_bias
    params = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True, logprobs=3)
    outputs = llm.generate(PROMPTS, params)
    for prompt, out in zip(PROMPTS, outputs):
        with torch.inference_mode():
            ref = hf.generate(
                torch.tensor([prompt]),
                attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                max_new_tokens=20,
                do_sample=False,
                pad_token_id=0,
                output_logits=True,
                return_dict_in_generate=True,
            )
        ours, theirs = out.outputs[0].token_ids, ref.sequences[0, len(prompt) :].tolist()
        for step, entry in enumerate(out.outputs[0].logprobs):
            ref_logprobs = torch.log_softmax(ref.logits[step][0].float(), -1)
            for token, logprob in entry.items():
                assert abs(logprob - ref_logprobs[token].item()) < 1e-4
            if ours[step] != theirs[step]:
                # Only a near-tie may flip greedy: both choices are equally likely to 1e-4.
                gap = ref_logprobs[theirs[step]] - ref_logprobs[ours[step]]
                assert abs(gap.item()) < 1e-4, (step, ours, theirs)
                break
