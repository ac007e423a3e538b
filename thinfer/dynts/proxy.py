"""A proxy reasoning task that a small model can solve: recall the critical intermediate results.

Each problem is a long thinking trace in which a few steps compute and name intermediate
results ("Step 7: 12 + 35 = 47, so the code of Alpha is 47.") among many plausible filler steps
that carry no information. After the think-end marker the answer names one of the results
("The code of Alpha is") and the model must complete it with the number. A model that keeps the
critical steps in its KV cache can copy the number; one that evicted them has to guess. This is
the situation DynTS is built for, at a length a 135M model on a CPU can replay.

Grading: replay the trace up to and including the answer prefix (`forced_tokens`, through the
decode path with the method's compression active), greedily generate a few tokens, compare the
number. Training traces include the answer value, so labels come from the answer's attention.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from thinfer.dynts.traces import DEFAULT_THINK_END, Trace
from thinfer.loading.tokenizer import Tokenizer

NAMES = (
    "Alpha", "Bravo", "Cedar", "Delta", "Ember", "Falcon", "Garnet", "Harbor", "Indigo",
    "Juniper", "Kestrel", "Lumen", "Marble", "Nectar", "Onyx", "Pepper", "Quartz", "Raven",
)  # fmt: skip
FILLER = (
    "Let me re-read the question to make sure I am on the right track.",
    "I should be careful here and not rush to a conclusion.",
    "Nothing in this part of the problem changes what we already have.",
    "Let me double-check the previous step; it looks consistent.",
    "This detail is only background and does not affect the result.",
    "I will keep going and organize my thoughts before the final answer.",
    "The wording here is a little long, but the meaning is simple.",
    "So far everything seems fine, so I can continue.",
    "Let me think about whether any step needs to be revised. It does not.",
    "There is no new quantity in this sentence, only a restatement.",
    "I am fairly confident about the work up to this point.",
    "Let me pause and summarize: the plan is still the same.",
)
PROMPT = (
    "Work through the steps below. Some steps compute a code for a name; the rest are "
    "commentary. At the end, report the requested code."
)
ANSWER_TOKENS = 4  # greedy tokens generated after the answer prefix when grading


@dataclass
class ProxyProblem:
    """One problem: the trace (with the answer), and where the graded answer starts."""

    trace: Trace
    answer_prefix_end: int  # completion tokens to force when grading (up to "... is")
    answer: str


def make_problem(
    tokenizer: Tokenizer,
    rng: random.Random,
    index: int,
    num_facts: int = 4,
    num_steps: int = 60,
    think_end: str = DEFAULT_THINK_END,
) -> ProxyProblem:
    """A problem with `num_facts` named results among `num_steps` steps."""
    names = rng.sample(NAMES, num_facts)
    fact_steps = sorted(rng.sample(range(1, num_steps + 1), num_facts))
    values = {}
    lines = []
    for step in range(1, num_steps + 1):
        if step in fact_steps:
            name = names[fact_steps.index(step)]
            a, b = rng.randint(10, 49), rng.randint(10, 49)
            values[name] = a + b
            lines.append(f"Step {step}: {a} + {b} = {a + b}, so the code of {name} is {a + b}.")
        else:
            lines.append(f"Step {step}: {rng.choice(FILLER)}")
    asked = rng.choice(names)
    thinking = "<think>\n" + "\n".join(lines) + "\n"
    prefix = f"\nThe code of {asked} is"
    answer = str(values[asked])
    prompt_ids = tokenizer.encode(f"{PROMPT} Which code does {asked} have?\n")
    pieces = [thinking, think_end, prefix]
    ids = [token for piece in pieces for token in tokenizer.encode(piece)]
    tail = tokenizer.encode(f" {answer}.")
    trace = Trace(f"proxy-{index}", prompt_ids, ids + tail, answer)
    return ProxyProblem(trace, len(ids), answer)


def make_problems(tokenizer: Tokenizer, count: int, seed: int, **kwargs: int) -> list[ProxyProblem]:
    """`count` problems from one seed (train and held-out splits use different seeds)."""
    rng = random.Random(seed)
    return [make_problem(tokenizer, rng, i, **kwargs) for i in range(count)]


def is_correct(problem: ProxyProblem, generated_text: str) -> bool:
    """True when the generated continuation starts with the expected number."""
    words = generated_text.strip().split()
    return bool(words) and words[0].rstrip(".,;") == problem.answer
