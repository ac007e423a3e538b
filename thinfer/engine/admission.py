"""`check_request`: whether a request can run to completion, decided before it is queued;
`tokenize_prompt`: a prompt's token ids, checked against the vocabulary.

Everything a request could make fail later, inside a step shared with other requests, is
checked here against the engine's model and cache: its length against the context, its
peak KV slots against the cache, every token id it names against the vocabulary, and that
`min_tokens` leaves at least one token to sample while EOS and the stop ids are banned.
"""

from __future__ import annotations

from thinfer.compression import CompressionConfig
from thinfer.loading.tokenizer import Tokenizer
from thinfer.sampling_params import SamplingParams


def tokenize_prompt(
    prompt: str | list[int], tokenizer: Tokenizer | None, vocab_size: int
) -> tuple[str | None, list[int]]:
    """(text, token ids) of a prompt given as text or ids; ValueError for an empty prompt,
    text without a tokenizer, or an id outside [0, vocab_size)."""
    if isinstance(prompt, str):
        if not prompt:
            raise ValueError("prompt is empty")
        if tokenizer is None:
            raise ValueError("this model has no tokenizer: give prompts as token ids")
        return prompt, tokenizer.encode(prompt)
    ids = list(prompt)
    if not ids:
        raise ValueError("prompt is empty")
    bad = [
        t for t in ids if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab_size
    ]
    if bad:
        raise ValueError(f"prompt token id {bad[0]!r} is not an integer in [0, {vocab_size})")
    return None, ids


def check_request(
    prompt_len: int,
    params: SamplingParams,
    *,
    max_model_len: int,
    vocab_size: int,
    eos_token_ids: set[int],
    capacity_tokens: int,
    compression: CompressionConfig | None,
) -> None:
    """Raise ValueError naming the problem if the request can never run to completion."""
    if prompt_len >= max_model_len:
        raise ValueError(
            f"prompt has {prompt_len} tokens, but the model's context is {max_model_len} tokens"
        )
    if prompt_len + params.max_tokens > max_model_len:
        raise ValueError(
            f"prompt ({prompt_len} tokens) + max_tokens ({params.max_tokens}) exceeds the "
            f"model's context of {max_model_len} tokens"
        )
    for name in ("forced_tokens", "stop_token_ids"):
        if any(t >= vocab_size for t in getattr(params, name)):
            raise ValueError(f"{name}: token ids must be below the vocabulary size {vocab_size}")
    if params.min_tokens > len(params.forced_tokens):
        banned = {t for t in eos_token_ids if t < vocab_size} | set(params.stop_token_ids)
        if len(banned) >= vocab_size:
            raise ValueError(
                f"min_tokens {params.min_tokens}: EOS and stop_token_ids ban all {vocab_size} "
                "tokens of the vocabulary, so nothing could be sampled"
            )
    peak = peak_slots(compression, prompt_len, params.max_tokens)
    if peak > capacity_tokens:
        raise ValueError(
            f"prompt ({prompt_len} tokens) + max_tokens ({params.max_tokens}) needs up to "
            f"{peak} KV slots and can never fit in the KV cache of {capacity_tokens} tokens"
        )


def peak_slots(config: CompressionConfig | None, prompt_len: int, max_tokens: int) -> int:
    """The most KV slots a request under `config` can occupy."""
    if config is None:
        return prompt_len + max_tokens
    return config.params.peak_slots(config, prompt_len, max_tokens)
