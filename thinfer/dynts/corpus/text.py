"""Family `text`: recall of real English text. A window of the Python documentation topics
(`thinfer.eval.texts.default_text`, shipped with every Python) is the thinking; after the
think-end marker a sentence from early in the window is quoted up to a word, and the answer is
that word.

The word is chosen so that it is not easy to guess: four or more lowercase letters, not a
stopword, neither it nor its first five letters in the quoted part, at most twice in the window
(as any part of a word); the quoted part occurs once.
The text differs between Python versions, so a corpus is reproducible on one Python version.
"""

from __future__ import annotations

import random
import re
from functools import lru_cache

from thinfer.dynts.corpus.assemble import Draft, encode_problem
from thinfer.dynts.corpus.problem import CorpusProblem
from thinfer.loading.tokenizer import Tokenizer

MIN_TOKENS = 160
SOURCE = "pydoc_data.topics"
EARLY = 0.4  # the quoted sentence starts in this first share of the window's lines
MIN_WORDS, MAX_WORDS = 5, 18  # words quoted before the answer
STOPWORDS = frozenset(
    """about above after again against also although among another because been before being
    below between both cannot could does doing done down during each either else even every
    from further have having here however into itself just like made make many more most must
    much neither never only other others over same several should since some such than that
    their them then there these they this those through thus under until upon very were what
    when where whether which while will with within without would your used uses using
    well""".split()
)
LEADS = (
    "Earlier the text said: ",
    "Quoting from above: ",
    "The passage contained this sentence: ",
    "As written earlier: ",
    "Recall: ",
    "",
)
INTROS = (
    "Read this passage from the Python documentation.",
    "Here is part of the Python docs; a sentence from it will be quoted.",
    "Study the documentation excerpt below.",
    "The following is reference text about Python.",
)
TASKS = (
    "Afterwards, complete a sentence quoted from it.",
    "At the end, finish a quotation from the passage.",
    "Then continue one of its sentences word for word.",
)
WORD = re.compile(r"[a-z]{4,}")
SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")


@lru_cache(maxsize=1)
def _lines() -> tuple[str, ...]:
    from thinfer.eval.texts import default_text

    return tuple(default_text().split("\n"))


@lru_cache(maxsize=1)
def _starts() -> tuple[int, ...]:
    """Lines that begin a prose paragraph."""
    lines = _lines()
    return tuple(
        i
        for i, line in enumerate(lines)
        if line[:1].isalpha() and (i == 0 or not lines[i - 1].strip()) and i < len(lines) - 150
    )


def _window(tokenizer: Tokenizer, start: int, budget: int) -> list[str]:
    """Pieces (lines with their newlines, a blank line joined to the line before) from line
    `start` until `budget` tokens."""
    lines = _lines()
    pieces: list[str] = []
    tokens = 0
    i = start
    while i < len(lines) and tokens < budget:
        if lines[i].strip() or not pieces:
            pieces.append(lines[i] + "\n")
            tokens += len(tokenizer.encode(pieces[-1], add_special_tokens=False))
        else:
            pieces[-1] += "\n"  # "\n\n" is one token, like "\n"
        i += 1
    return pieces


def _paragraphs(pieces: list[str], limit: int) -> list[tuple[int, str]]:
    """(first piece, text with whitespace collapsed) of the prose paragraphs that start among
    the first `limit` pieces."""
    out: list[tuple[int, str]] = []
    current: list[str] = []
    begin = 0
    for i, piece in enumerate(pieces + ["\n\n"]):
        prose = piece[:1].isalpha() or (bool(current) and piece[:1] not in " \n")
        if prose and not current:
            begin = i
        if prose:
            current.append(piece)
        if current and (not prose or piece.endswith("\n\n")):
            text = " ".join("".join(current).split())
            if begin < limit and ">>>" not in text and "::=" not in text:
                out.append((begin, text))
            current = []
    return out


def _candidates(window: str, paragraphs: list[tuple[int, str]]) -> list[tuple[str, str]]:
    """(quoted prefix, answer word) pairs that pass the checks of the module docstring."""
    out = []
    lowered = window.lower()
    for _, paragraph in paragraphs:
        for sentence in SENTENCE_END.split(paragraph):
            words = sentence.split()
            for k in range(MIN_WORDS, min(len(words), MAX_WORDS + 1)):
                word = words[k].rstrip(".,;:")
                if not WORD.fullmatch(word) or word in STOPWORDS:
                    continue
                quoted = " ".join(words[:k]).lower()
                if word in quoted or re.search(rf"\b{word[:5]}", quoted):
                    continue  # the quote gives it away ("strings ... a ___")
                if lowered.count(word) > 2:
                    continue  # the window keeps mentioning it
                if len(re.findall(_pattern(words[:k]), window)) != 1:
                    continue
                out.append((" ".join(words[:k]), word))
    return out


def _pattern(words: list[str]) -> str:
    return r"\s+".join(re.escape(w) for w in words)


def make(
    tokenizer: Tokenizer, rng: random.Random, index: int, target_tokens: int, think_end: str
) -> CorpusProblem:
    """One text problem of about `target_tokens` tokens (a window from a random paragraph)."""
    prompt = f"{rng.choice(INTROS)} {rng.choice(TASKS)}"
    lead = rng.choice(LEADS)
    overhead = len(tokenizer.encode(prompt + "\n")) + 25  # marker, lead and the quote
    for _ in range(100):
        start = rng.choice(_starts())
        pieces = _window(tokenizer, start, target_tokens - overhead)
        window = "".join(pieces)
        found = _candidates(window, _paragraphs(pieces, max(1, int(len(pieces) * EARLY))))
        if found:
            break
    else:
        raise RuntimeError("no quotable sentence found in 100 windows of the text")
    prefix, answer = rng.choice(found)
    match = re.search(_pattern(prefix.split() + [answer]), window)
    assert match is not None  # the prefix occurs once, followed by the answer
    offsets = [0]
    for piece in pieces:
        offsets.append(offsets[-1] + len(piece))
    critical = {
        i for i in range(len(pieces)) if offsets[i] < match.end() and offsets[i + 1] > match.start()
    }
    draft = Draft(
        family="text",
        prompt=prompt,
        lines=[],
        prefix=prefix,
        answer=answer,
        topics=(),
        record={"source": SOURCE, "start_line": start, "lines": len(pieces), "prefix": prefix},
        lead=lead,
    )
    return encode_problem(tokenizer, draft, index, pieces, critical, think_end)
