"""`bench_prompts`: a fixed set of English prompts of clearly different lengths (10-200 words)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from thinfer.llm import LLM
    from thinfer.loading.tokenizer import Tokenizer

_PROMPTS: tuple[str, ...] = (
    "Explain in simple words why the sky looks blue on a clear afternoon.",
    "Write a short poem about a lighthouse keeper who has never seen the sea in a storm.",
    "What are three practical ways to reduce food waste in a small shared kitchen?",
    "Summarize the main causes of the First World War for a high school student who "
    "has only a few minutes before an exam and needs the essentials, not every detail.",
    "Translate the following sentence into French and explain any tricky word choices: "
    "The old bookshop on the corner closes early on rainy Sundays.",
    "List the steps needed to make a loaf of sourdough bread, starting from feeding the "
    "starter the night before and ending with letting the loaf cool on a rack.",
    "A train leaves a station at nine in the morning travelling at eighty kilometres per "
    "hour. A second train leaves the same station an hour later at one hundred and twenty "
    "kilometres per hour on a parallel track. At what time does the second train catch up "
    "with the first, and how far from the station are they? Show your reasoning.",
    "Describe the water cycle and name the main processes that move water around it.",
    "Write a polite email to a landlord asking for a leaking kitchen tap to be repaired, "
    "mentioning that the leak started last week and is getting worse.",
    "You are a museum guide. A visitor points at a large painting of a harbour at sunset and "
    "asks what makes it special. The painting shows fishing boats returning home, gulls over "
    "the water, and a small crowd waiting on the quay. The colours are mostly orange, violet "
    "and deep blue, and the brush strokes are visible and quick. Answer the visitor in a "
    "friendly way, pointing out the composition, the use of light, and what the scene might "
    "tell us about the life of the town at the time it was painted.",
    "Give me a one-sentence definition of entropy that a beginner could understand.",
    "Compare the advantages and disadvantages of living in a big city versus a small village, "
    "considering cost of living, access to healthcare, job opportunities, community life, "
    "noise, and the time people spend travelling every day.",
    "Read the passage and answer the question. Passage: Maria planted tomatoes, beans and "
    "squash in her garden in early spring. The beans grew fastest, climbing the fence within "
    "a month. The tomatoes needed stakes after a late frost damaged some leaves, and the "
    "squash spread across the path until her neighbour joked that it was trying to move "
    "house. By late summer she had more vegetables than her family could eat, so she started "
    "leaving baskets at the end of the driveway with a sign that said free for anyone who "
    "needs them. Question: Why did Maria start leaving baskets at the end of the driveway?",
    "Suggest a name for a cat that loves to sleep in cardboard boxes.",
    "Write a function in Python that checks whether a string is a palindrome, ignoring "
    "spaces, punctuation and letter case, and explain how it works line by line.",
    "What is the difference between weather and climate? Give two examples of each.",
    "Imagine you are planning a three-day hiking trip in the mountains in late autumn. The "
    "group has four people, one of whom has never hiked more than ten kilometres in a day. "
    "Nights may drop below freezing, and the huts along the route are only open on weekends. "
    "Draw up a plan covering the daily route lengths, what to pack for cold nights, how to "
    "handle water, what to do if the weather turns, and how to keep the least experienced "
    "hiker comfortable and safe without slowing the whole group too much.",
    "Tell me a fun and surprising fact about octopuses that most people do not know.",
    "Explain how a bicycle stays upright while it is moving, and why it falls over when it "
    "stops, using ideas a curious ten year old could follow.",
    "Rewrite the following paragraph so that it is clearer and shorter, keeping its meaning: "
    "In the event that it should happen to be the case that the meeting which was scheduled "
    "for Thursday is not able to take place due to the fact that a number of the people who "
    "were expected to attend it are unavailable, then it will be necessary for us to find "
    "another date which is suitable for everyone, and we will let all of those concerned "
    "know about the new arrangements as soon as we possibly can.",
    "Why do onions make people cry when they are cut, and how can you avoid it?",
    "Write the opening paragraph of a mystery story set in a snowed-in mountain hotel where "
    "the power has just gone out.",
    "A small bakery sells bread, pastries and coffee. Over the last year its sales of bread "
    "have fallen slightly, pastry sales have stayed the same, and coffee sales have almost "
    "doubled since it added a few tables near the window. Rent is going up next year, and "
    "the owner is thinking about either extending opening hours into the evening, adding "
    "a small lunch menu, or turning part of the kitchen into more seating. Two employees "
    "already work full time and a third works on weekends. Which option would you "
    "recommend, what would you want to measure before deciding, and what risks should the "
    "owner watch for during the first few months after the change?",
    "Name the planets of the solar system in order from the sun.",
    "What makes a good teacher? Answer in a short paragraph.",
    "Explain the idea of supply and demand using the example of umbrellas being sold on a "
    "busy street when it suddenly starts to rain.",
    "Here is a list of tasks for tomorrow: buy groceries, call the dentist, finish the "
    "quarterly report, water the plants, return the library books, pick up the children at "
    "four, and prepare dinner for six guests. The report takes about three hours of focused "
    "work and the dentist only answers the phone before noon. Organize these tasks into a "
    "realistic schedule for the day and briefly justify the order you chose.",
    "How does a vaccine help the body fight an infection?",
    "Write a dialogue between a robot who has just learned to cook and a grandmother who "
    "has been cooking for sixty years, in which they argue gently about how much salt to "
    "put in the soup.",
    "Give three tips for someone learning to play the guitar.",
    "The following are notes from a team meeting. Notes: the website redesign is two weeks "
    "behind because the image library licence expired; the new checkout page is finished "
    "but untested on mobile phones; customer support reports many questions about delivery "
    "times; the marketing team wants to launch a spring campaign next month; the budget for "
    "the quarter is almost used up; two developers will be on holiday during the first week "
    "of next month; and the manager asked everyone to suggest which work could be postponed. "
    "Write a short summary of the situation and a prioritized list of next steps that a "
    "project manager could send to the whole team after the meeting, and point out which "
    "of the items carry the biggest risk if they slip further. Keep the summary under "
    "two hundred words, use plain language that people outside the team would understand, "
    "avoid blaming anyone for the delays, and end with a clear question asking each team "
    "member to confirm by Friday which of their tasks they can realistically finish before "
    "the holidays and which ones should be moved to the following month.",
    "What is the capital of Australia, and why is it not Sydney?",
)


def bench_prompts(n: int) -> list[str]:
    """The first `n` benchmark prompts, cycling through the fixed set when `n` exceeds it."""
    if n < 1:
        raise ValueError(f"number of prompts must be >= 1, got {n}")
    return [_PROMPTS[i % len(_PROMPTS)] for i in range(n)]


def bench_prompt_token_ids(llm: LLM, n: int) -> list[list[int]]:
    """`bench_prompts(n)` tokenized once by the LLM's tokenizer, to feed both engines.

    A model without a tokenizer (dummy preset) gets deterministic random ids, about 1.3 per
    word of each prompt, so the length spread stays the same.
    """
    return tokenize_bench_prompts(llm.tokenizer, llm.model_config.vocab_size, n)


def tokenize_bench_prompts(tokenizer: Tokenizer | None, vocab_size: int, n: int) -> list[list[int]]:
    """`bench_prompts(n)` as token ids: by `tokenizer`, or deterministic random ids if None."""
    texts = bench_prompts(n)
    if tokenizer is not None:
        return [tokenizer.encode(text) for text in texts]
    low = min(3, vocab_size - 1)
    gen = torch.Generator().manual_seed(1234)
    ids = []
    for text in texts:
        length = max(1, round(1.3 * len(text.split())))
        ids.append(torch.randint(low, vocab_size, (length,), generator=gen).tolist())
    return ids
