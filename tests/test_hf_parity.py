"""Acceptance: batched thinfer greedy output equals HF transformers on each prompt alone.

The oracle is HF transformers loading the same GGUF file (it dequantizes and un-permutes
independently of thinfer's loader).
"""

from __future__ import annotations

import torch

from thinfer import SamplingParams

NEW_TOKENS = 64


def hf_greedy(model: torch.nn.Module, prompt_ids: list[int], new_tokens: int) -> list[int]:
    with torch.inference_mode():
        out = model.generate(
            torch.tensor([prompt_ids]),
            attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
            max_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=0,
        )
    return out[0, len(prompt_ids) :].tolist()


def test_batched_greedy_matches_hf_alone(llm, hf_model, english_prompts):
    prompt_ids = [llm.tokenizer.encode(p) for p in english_prompts]
    assert len(prompt_ids) >= 8
    assert len({len(p) for p in prompt_ids}) >= 8, "prompts must differ in length"
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
    outputs = llm.generate(prompt_ids, params)
    for ids, out in zip(prompt_ids, outputs):
        assert out.prompt_token_ids == ids
        assert out.outputs[0].token_ids == hf_greedy(hf_model, ids, NEW_TOKENS)


def test_hf_logits_match_prefill(llm, hf_model, english_prompts):
    """First-token log-probabilities agree closely, not just the argmax."""
    ids = llm.tokenizer.encode(english_prompts[5])
    out = llm.generate(ids, SamplingParams(max_tokens=1, temperature=0.0, logprobs=5))[0]
    ours = out.outputs[0].logprobs[0]
    with torch.inference_mode():
        ref = torch.log_softmax(hf_model(torch.tensor([ids])).logits[0, -1].float(), -1)
    for token, logprob in ours.items():
        assert abs(logprob - ref[token].item()) < 1e-3
