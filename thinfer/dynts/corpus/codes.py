"""Family `codes`: the proxy task of `thinfer.dynts.proxy` (named codes among filler steps),
made by its own `make_problem`, with the number of steps set from the token target.

"Step 7: 12 + 35 = 47, so the code of Alpha is 47." ... "</think> The code of Alpha is" ->
"47". Unlike the other families it has one template and one filler pool: it is the task the
first head was trained on.
"""

from __future__ import annotations

import random
import re

from thinfer.dynts.corpus.assemble import THINK_START
from thinfer.dynts.corpus.problem import CorpusProblem
from thinfer.dynts.proxy import make_problem
from thinfer.dynts.traces import Trace
from thinfer.loading.tokenizer import Tokenizer

MIN_TOKENS = 150
TOKENS_PER_STEP = 20  # a proxy step is about 20 tokens; the prompt and answer about 50
FACT = re.compile(r"the code of (\w+) is (\d+)\.")
ASKED = re.compile(r"The code of (\w+) is$")


def _spans(tokenizer: Tokenizer, completion: list[int], thinking: str) -> list[tuple[int, int]]:
    """Completion-token spans of the fact lines: the thinking re-tokenized line by line; empty
    when that does not reproduce the trace's own tokens."""
    ids = tokenizer.encode(THINK_START, add_special_tokens=False)
    spans = []
    for line in thinking[len(THINK_START) :].splitlines(keepends=True):
        start = len(ids)
        ids += tokenizer.encode(line, add_special_tokens=False)
        if FACT.search(line):
            spans.append((start, len(ids)))
    return spans if completion[: len(ids)] == ids else []


def make(
    tokenizer: Tokenizer, rng: random.Random, index: int, target_tokens: int, think_end: str
) -> CorpusProblem:
    """One proxy problem of about `target_tokens` tokens, 2-4 codes."""
    facts = rng.randint(2, 4)
    steps = max(facts + 2, round((target_tokens - 50) / TOKENS_PER_STEP))
    proxy = make_problem(
        tokenizer, rng, index, num_facts=facts, num_steps=steps, think_end=think_end
    )
    ids = proxy.trace.completion_token_ids
    text = tokenizer.decode(ids[: proxy.answer_prefix_end])
    thinking = text.split(think_end)[0]
    asked = ASKED.search(text)
    record = {
        "codes": {name: int(value) for name, value in FACT.findall(thinking)},
        "asked": asked.group(1) if asked else None,
        "steps": steps,
    }
    trace = Trace(f"codes-{index}", proxy.trace.prompt_token_ids, ids, proxy.answer)
    spans = _spans(tokenizer, ids, thinking)
    return CorpusProblem(trace, proxy.answer_prefix_end, proxy.answer, "codes", spans, record)
