"""Admission checks run in the engine thread: a prompt and its params, ready for the engine.

Everything here raises ValueError naming the problem, so that the HTTP handler answers 400
and the engine is left unchanged.
"""

from __future__ import annotations

import dataclasses

from thinfer.engine.llm_engine import LLMEngine
from thinfer.sampling_params import SamplingParams
from thinfer.server.request_stream import ChatPrompt, Prompt


def prepare(
    engine: LLMEngine, prompt: Prompt, params: SamplingParams, fill_max_tokens: bool
) -> tuple[list[int], SamplingParams]:
    """Token ids of `prompt` (chats rendered with the template) and the params to run with.

    `fill_max_tokens` sets `max_tokens` to the room the prompt leaves in the context and
    the KV pool (the chat default). The request is validated as the engine would.
    """
    if isinstance(prompt, ChatPrompt):
        if engine.tokenizer is None:
            raise ValueError("messages: this model has no tokenizer, so no chat template")
        try:
            prompt = engine.tokenizer.apply_chat_template(prompt.messages)
        except Exception as e:  # jinja's TemplateError (e.g. roles must alternate)
            raise ValueError(f"messages: the chat template failed: {e}") from e
    _, ids = engine.tokenize_prompt(prompt)
    if fill_max_tokens:
        room = min(engine.max_model_len, engine.kv_cache.capacity_tokens) - len(ids)
        params = dataclasses.replace(params, max_tokens=max(1, room))
    engine.validate(len(ids), params)  # also loads and checks a DynTS predictor
    return ids, params
