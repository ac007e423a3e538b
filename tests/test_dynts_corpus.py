"""`thinfer dynts corpus`: six families of traces, reproducible per family, with the answer
stated (or derivable) in the thinking, varied wording, and a family split that never leaks."""

from __future__ import annotations

import re
from collections import Counter

import pytest
from default_model import require_default_model

from thinfer.dynts.corpus import (
    arithmetic,
    lookup,
    make_corpus,
    read_problems,
    recall,
    split_by_family,
    tracking,
    write_problems,
)
from thinfer.dynts.corpus.build import FAMILIES, check_request
from thinfer.dynts.corpus.wording import (
    ANIMALS,
    ANSWER_LEADS,
    CITIES,
    COLOURS,
    JOBS,
    OBJECTS,
    PEOPLE,
    PLACES,
    QUANTITIES,
    WORDS,
    capitalise,
)
from thinfer.dynts.proxy import is_correct
from thinfer.dynts.traces import read_traces, think_end_ids

TARGET = 650
COUNT = 60
LABEL = re.compile(
    r"^(Step \d+[:.] |\d+[).] |[-*] |(First|Next|Then|After that|Also|Now|Further): )"
)
POOL = set(PEOPLE + COLOURS + CITIES + JOBS + ANIMALS + OBJECTS + PLACES + WORDS)
POOL.update(word for unit, containers in QUANTITIES for word in (unit, *containers))
LEADS = sorted({lead for lead in ANSWER_LEADS if lead}, key=len, reverse=True)


@pytest.fixture(scope="module")
def tok():
    require_default_model()
    from thinfer.loading import load_checkpoint

    return load_checkpoint(None).tokenizer


@pytest.fixture(scope="module")
def corpus(tok):
    return make_corpus(tok, None, COUNT, seed=0)


def by_family(problems):
    out = {}
    for p in problems:
        out.setdefault(p.family, []).append(p)
    return out


def parts(tok, p):
    """(thinking text, text after the marker up to the answer prefix end)."""
    text = tok.decode(p.trace.completion_token_ids[: p.answer_prefix_end])
    thinking, after = text.split("</think>")
    return thinking, after.strip()


def mask(text: str) -> str:
    """`text` with numbers, pool words and one-letter variables masked."""
    out = []
    for word in re.sub(r"\d+", "#", text).split():
        core = word.strip(".,;:()")
        core = core[:-2] if core.endswith("'s") else core
        masked = core in POOL or core.lower() in POOL or (len(core) == 1 and core.isalpha())
        out.append("_" if masked else word)
    return " ".join(out)


def strip_lead(text: str, leads) -> str:
    return next((text[len(lead) :] for lead in leads if lead and text.startswith(lead)), text)


def test_same_seed_same_corpus_and_families_have_their_own_streams(tok, corpus):
    a = make_corpus(tok, None, 4, seed=0)
    assert [p.trace for p in a] == [p.trace for p in make_corpus(tok, None, 4, seed=0)]
    other = make_corpus(tok, None, 4, seed=1)
    assert all(x.trace != y.trace for x, y in zip(a, other, strict=True))
    # A family's stream ignores the other families, and a smaller count is a prefix.
    alone = make_corpus(tok, ["tracking"], 4, seed=0)
    mixed = make_corpus(tok, ["codes", "tracking", "text"], 4, seed=0)
    assert alone == [p for p in mixed if p.family == "tracking"]
    assert alone == by_family(corpus)["tracking"][:4]
    assert [p.trace.id for p in alone] == [f"tracking-{i}" for i in range(4)]


def test_every_family_states_its_answer_and_grades(tok, corpus):
    marker = think_end_ids(tok)
    families = by_family(corpus)
    assert sorted(families) == sorted(FAMILIES)
    for family, problems in families.items():
        assert len(problems) == COUNT
        lengths = [len(p.trace.token_ids) for p in problems]
        assert abs(sum(lengths) / COUNT - TARGET) < 0.12 * TARGET, family
        assert 0.6 * TARGET < min(lengths) and max(lengths) < 1.45 * TARGET, family
        for p in problems:
            ids = p.trace.completion_token_ids
            assert tok.decode(ids).count("</think>") == 1
            start = p.trace.answer_start(marker) - len(p.trace.prompt_token_ids)
            assert 0 < start < p.answer_prefix_end < len(ids)
            assert tok.decode(ids[p.answer_prefix_end :]) == f" {p.answer}."
            assert is_correct(p, tok.decode(ids[p.answer_prefix_end :]))
            assert len(p.answer.split()) == 1
            assert p.critical_spans and all(0 <= s < e < start for s, e in p.critical_spans)
            thinking, after = parts(tok, p)
            critical = " ".join(tok.decode(ids[s:e]) for s, e in p.critical_spans)
            CHECKS[family](p, thinking, after, critical)


def check_recall(p, thinking, after, critical):
    fact = p.record["facts"][p.record["asked"]]
    assert fact["value"] == p.answer and re.search(rf"\b{p.answer}\b", critical)
    kind, h = recall.KINDS[fact["kind"]], fact["holder"]
    assert any(after.endswith(t.format(h=h, H=capitalise(h))) for t in kind.prefixes)
    assert len({f["value"] for f in p.record["facts"]}) == len(p.record["facts"])


def check_tracking(p, thinking, after, critical):
    for e in p.record["entities"]:
        assert e["value"] == e["start"] + sum(e["updates"])
        running = e["start"]
        for change in e["updates"]:
            running += change
            assert running >= 0 and f" {abs(change)} " in critical
    e = p.record["entities"][p.record["asked"]]
    assert str(e["value"]) == p.answer and re.search(rf"\b{p.answer}\b", critical)
    prefixes = [capitalise(t.format(c=e["container"], u=e["unit"])) for t in tracking.PREFIXES]
    assert any(after.endswith(prefix) for prefix in prefixes)


def check_arithmetic(p, thinking, after, critical):
    values = {}
    for step in p.record["steps"]:
        x, y = (values.get(v, v) for v in (step["left"], step["right"]))
        expected = {"+": x + y, "-": x - y, "*": x * y}[step["op"]]
        assert step["value"] == expected > 0 and f"{step['value']}" in critical
        values[step["name"]] = expected
    assert str(values[p.record["asked"]]) == p.answer
    assert any(after.endswith(t.format(v=p.record["asked"])) for t in arithmetic.PREFIXES)
    for x, op, y, r in re.findall(r"(\d+) ([-+*×]) (\d+) = (\d+)", thinking):
        assert int(r) == {"+": int(x) + int(y), "-": int(x) - int(y)}.get(op, int(x) * int(y))


def check_lookup(p, thinking, after, critical):
    fields, row = p.record["fields"], p.record["rows"][p.record["row"]]
    assert row[fields.index(p.record["field"])] == p.answer
    assert re.search(rf"\b{p.answer}\b", critical) and row[0] in critical
    choices = lookup.FIELD_PREFIXES[p.record["field"]] + lookup.GENERIC_PREFIXES
    assert any(after.endswith(t.format(n=row[0], f=p.record["field"])) for t in choices)


def check_text(p, thinking, after, critical):
    prefix = p.record["prefix"]
    assert after.endswith(prefix)
    words = r"\s+".join(re.escape(w) for w in prefix.split() + [p.answer])
    assert re.search(words, critical) and len(re.findall(words, thinking)) == 1
    assert len(p.answer) >= 4 and p.answer.isalpha() and p.answer.lower() not in prefix.lower()


def check_codes(p, thinking, after, critical):
    assert str(p.record["codes"][p.record["asked"]]) == p.answer
    assert after.endswith(f"The code of {p.record['asked']} is")
    assert f"the code of {p.record['asked']} is {p.answer}." in critical
    for x, y, r in re.findall(r"(\d+) \+ (\d+) = (\d+)", thinking):
        assert int(x) + int(y) == int(r)


CHECKS = {
    "recall": check_recall,
    "tracking": check_tracking,
    "arithmetic": check_arithmetic,
    "lookup": check_lookup,
    "text": check_text,
    "codes": check_codes,
}


@pytest.mark.parametrize(
    "family, templates, prefixes",
    [("recall", 15, 10), ("tracking", 12, 6), ("arithmetic", 12, 6), ("lookup", 0, 10)],
)
def test_wording_is_varied(tok, corpus, family, templates, prefixes):
    problems = by_family(corpus)[family]
    facts, questions, fillers, sentences = set(), set(), Counter(), Counter()
    for p in problems:
        ids = p.trace.completion_token_ids
        crit = [tok.decode(ids[s:e]).strip() for s, e in p.critical_spans]
        for text in crit:
            facts.add(mask(strip_lead(LABEL.sub("", text), recall.FACT_LEADS)))
        thinking, after = parts(tok, p)
        questions.add(mask(strip_lead(after, LEADS)))
        crit_lines = {line for text in crit for line in text.split("\n")}
        for line in thinking.split("\n")[1:]:
            if line.strip() and line not in crit_lines:
                fillers[LABEL.sub("", line)] += 1
                sentences.update(re.split(r"(?<=[.!?]) ", LABEL.sub("", line)))
    assert len(facts) >= templates and len(questions) >= prefixes, (facts, questions)
    assert fillers.most_common(1)[0][1] <= 0.1 * sum(fillers.values())
    assert sentences.most_common(1)[0][1] <= 0.1 * sum(sentences.values())
    assert len({p.record["label_style"] for p in problems}) >= 5
    if family == "lookup":
        assert len({p.record["format"] for p in problems}) >= 5


def test_text_windows_differ(corpus):
    problems = by_family(corpus)["text"]
    assert len({p.record["start_line"] for p in problems}) >= 55
    assert len({p.answer for p in problems}) >= 45


def test_split_by_family_never_leaks(corpus):
    for family in FAMILIES:
        train, held_out = split_by_family(corpus, family)
        assert all(p.family != family for p in train)
        assert [p.trace.id for p in held_out] == [f"{family}-{i}" for i in range(COUNT)]
        assert len(train) + len(held_out) == len(corpus)
    with pytest.raises(ValueError, match="nope"):
        split_by_family(corpus, "nope")


def test_file_round_trip_and_read_traces(tok, corpus, tmp_path):
    path = str(tmp_path / "c.jsonl")
    write_problems(path, corpus[::7])
    assert read_problems(path) == corpus[::7]
    assert read_traces(path) == [p.trace for p in corpus[::7]]  # extra keys are ignored
    assert all(p.family == "text" for p in read_problems(path, families=["text"]))


@pytest.mark.parametrize(
    "families, count, target, message",
    [
        (["recall", "nope"], 3, 650, "unknown family nope"),
        (["recall", "recall"], 3, 650, "twice"),
        (None, 0, 650, "count"),
        (["tracking"], 3, 100, "too few"),
    ],
)
def test_bad_requests(families, count, target, message):
    with pytest.raises(ValueError, match=message):
        check_request(families, count, target)


def test_cli_round_trip_and_bad_input(tok, tmp_path):
    from conftest import run_cli

    path = str(tmp_path / "c.jsonl")
    result = run_cli("dynts", "corpus", "--output", path, "--count", "3", "--seed", "2")
    assert result.returncode == 0, result.stderr
    assert all(f"{family} " in result.stdout for family in FAMILIES)
    assert read_problems(path) == make_corpus(tok, None, 3, seed=2)
    result = run_cli("dynts", "corpus", "--output", path, "--families", "recall,nope")
    assert result.returncode == 2 and "unknown family nope" in result.stderr
    result = run_cli("dynts", "corpus", "--output", path, "--target-tokens", "50")
    assert result.returncode == 2 and "too few" in result.stderr
