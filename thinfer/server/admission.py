"""Admission: a prompt tokenized (in a worker thread, off the engine thread) and its params
fitted and validated (in the engine thread), ready for the engine.

Everything here raises ValueError naming the problem, so that the HTTP handler answers 400
and the engine is left unchanged.
"""

from __future__ import annotations

import dataclasses

from thinfer.engine.llm_engine import LLMEngine
from thinfer.sampling_params import SamplingParams
from thinfer.server.limits import ServerLimits
from thinfer.server.request_stream import AddCommand, ChatPrompt, Prompt


def tokenize(engine: LLMEngine, prompt: Prompt) -> list[int]:
    """Token ids of `prompt` (chats rendered with the template). Reads only the tokenizer
    and the vocabulary size, so it runs off the engine thread: a huge prompt costs its own
    handler the time, never the running streams."""
    if isinstance(prompt, ChatPrompt):
        if engine.tokenizer is None:
            raise ValueError("messages: this model has no tokenizer, so no chat template")
        try:
            prompt = engine.tokenizer.apply_chat_template(prompt.messages)
        except Exception as e:  # jinja's TemplateError (e.g. roles must alternate)
            raise ValueError(f"messages: the chat template failed: {e}") from e
    return engine.tokenize_prompt(prompt)[1]


def fit(
    engine: LLMEngine,
    ids: list[int],
    params: SamplingParams,
    fill_max_tokens: bool,
    cap: int | None = None,
) -> SamplingParams:
    """The params to run `ids` with, validated as the engine would (in the engine thread).

    `fill_max_tokens` sets `max_tokens` to the room the prompt leaves in the context and
    the KV pool (the chat default), at most `cap` when given.
    """
    if fill_max_tokens:
        room = min(engine.max_model_len, engine.kv_cache.capacity_tokens) - len(ids)
        if cap is not None:
            room = min(room, cap)
        params = dataclasses.replace(params, max_tokens=max(1, room, params.min_tokens))
    engine.validate(len(ids), params)  # also loads and checks a DynTS predictor
    return params


def admit(
    engine: LLMEngine, limits: ServerLimits, waiting_prompt_tokens: int, command: AddCommand
) -> list[tuple[list[int], SamplingParams]]:
    """(ids, params) per prompt of an add, within `limits` (QueueFullError beyond them) and
    validated as the engine would (ValueError); in the engine thread."""
    limits.check_admission(
        engine.get_num_waiting_requests(),
        waiting_prompt_tokens,
        [len(ids) for ids in command.prompt_token_ids],
    )
    cap = limits.default_max_tokens
    return [
        (ids, fit(engine, ids, command.params, command.fill_max_tokens, cap))
        for ids in command.prompt_token_ids
    ]
