"""Final-answer extraction and equivalence checking for math and multiple-choice benchmarks.

`extract_answer` takes the content of the last `\\boxed{...}` (or `\\fbox{...}`) of a model's
output. `answers_equal` decides whether two answers are the same: after normalisation it
compares strings, then numbers (exactly, as fractions), then expressions with sympy in a
separate process under a timeout (see `symbolic.py`); tuples and intervals element-wise.
"""

from __future__ import annotations

import re
import time
from fractions import Fraction

from thinfer.eval.symbolic import symbolic_equal

MAX_SYMBOLIC_CHARS = 1000  # longer answers are compared as strings and numbers only
MAX_NUMBER_CHARS = 400
REL_TOL = Fraction(1, 10**6)

_BOX = re.compile(r"\\(?:boxed|fbox)\s*")
_REMOVE = (
    "\\displaystyle",
    "\\left",
    "\\right",
    "\\!",
    "\\,",
    "\\;",
    "\\:",
    "\\ ",
    "^{\\circ}",
    "^\\circ",
    "\\circ",
    "°",
    "\\$",
    "$",
    "{,}",
)
_NUMBER = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d{1,3})?")
_FRACTION = re.compile(r"([-+]?)\\frac\{([^{}]+)\}\{([^{}]+)\}")
_THOUSANDS = re.compile(r"[-+]?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_TRAILING_UNIT = re.compile(r"\\(?:text|mbox|mathrm)\{\s*[A-Za-z][A-Za-z .]*\}(?:\^\{?\d\}?)?$")
_UNIT_WORDS = re.compile(r"([-+]?[\d.,/]*\d)\s+[A-Za-z]{2,}\.?(?:\s+[A-Za-z]{2,}\.?)*")
_BRACKETS = {"(": ")", "[": "]", "{": "}", "\\{": "\\}"}


def _braced(text: str, start: int) -> int | None:
    """Index just past the group opened by `text[start] == "{"`, or None if unclosed."""
    depth = 0
    for i in range(start, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return i + 1
    return None


def _last_boxed(text: str) -> str | None:
    """Content of the last top-level `\\boxed{...}` / `\\fbox{...}` (or `\\boxed x`)."""
    found = None
    pos = 0
    while True:
        match = _BOX.search(text, pos)
        if match is None:
            return found
        start = match.end()
        if start < len(text) and text[start] == "{":
            end = _braced(text, start)
            if end is None:  # unclosed (a truncated output): not an answer
                pos = start
                continue
            found, pos = text[start + 1 : end - 1], end
        elif match.group(0).endswith(" "):  # "\boxed 5": up to the next space or "$"
            token = re.match(r"[^\s$]+", text[start:])
            if token:
                found = token.group(0)
            pos = start
        else:
            pos = start


def extract_answer(text: str, pattern: str | re.Pattern[str] | None = None) -> str | None:
    """The final answer in `text`: the content of its last `\\boxed{...}` or `\\fbox{...}`
    (nested braces allowed), or with `pattern` (a regex with one group) the group of its last
    match. None when there is none."""
    if pattern is None:
        boxed = _last_boxed(text)
        return boxed.strip() if boxed is not None else None
    regex = re.compile(pattern) if isinstance(pattern, str) else pattern
    last = None
    for match in regex.finditer(text):
        last = match
    if last is None:
        return None
    value = last.group(1) if regex.groups else last.group(0)
    return value.strip() if value is not None else None


def _unwrap(text: str, command: str) -> str:
    """`\\command{x}` -> `x` everywhere (balanced braces)."""
    out = []
    pos = 0
    while (start := text.find(command, pos)) >= 0:
        brace = start + len(command)
        while brace < len(text) and text[brace] == " ":
            brace += 1
        end = _braced(text, brace) if brace < len(text) and text[brace] == "{" else None
        if end is None:
            out.append(text[pos:brace])
            pos = brace
            continue
        out.append(text[pos:start] + text[brace + 1 : end - 1])
        pos = end
    return "".join(out) + text[pos:]


def normalize_answer(answer: str) -> tuple[str, bool]:
    """Canonical string form of an answer and whether it carried a percent sign."""
    s = answer.strip()
    for box in ("\\boxed", "\\fbox"):
        s = _unwrap(s, box)
    for token in _REMOVE:
        s = s.replace(token, "")
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    percent = "%" in s
    s = s.replace("\\%", "").replace("%", "")
    s = s.strip().rstrip(".").strip()
    while _TRAILING_UNIT.search(s) and _TRAILING_UNIT.sub("", s).strip():
        s = _TRAILING_UNIT.sub("", s).strip()
    for command in ("\\text", "\\textbf", "\\mbox", "\\mathrm", "\\mathbf", "\\textrm"):
        s = _unwrap(s, command)
    unit = _UNIT_WORDS.fullmatch(s)
    if unit and "\\" not in s and len(s) <= MAX_NUMBER_CHARS:
        s = unit.group(1)
    # Keep a space only where it separates a command from a letter ("\pi r").
    s = re.sub(r"(\\[A-Za-z]+)\s+(?=[A-Za-z])", "\\1\x00", s)
    s = re.sub(r"\s+", "", s).replace("\x00", " ")
    s = re.sub(r"\\frac(\d)(\d)", r"\\frac{\1}{\2}", s)
    if _THOUSANDS.fullmatch(s):
        s = s.replace(",", "")
    assignment = re.fullmatch(r"[A-Za-z]=([^=]+)", s)
    if assignment:
        s = assignment.group(1)
    return s.rstrip("."), percent


def _number(s: str) -> Fraction | None:
    """Exact value of an integer, decimal, `a/b` or `\\frac{a}{b}` string, else None."""
    if len(s) > MAX_NUMBER_CHARS:
        return None
    if _NUMBER.fullmatch(s):
        return Fraction(s)
    parts = s.split("/")
    if len(parts) == 2 and all(_NUMBER.fullmatch(p) for p in parts):
        den = Fraction(parts[1])
        return Fraction(parts[0]) / den if den else None
    frac = _FRACTION.fullmatch(s)
    if frac and _NUMBER.fullmatch(frac.group(2)) and _NUMBER.fullmatch(frac.group(3)):
        den = Fraction(frac.group(3))
        if not den:
            return None
        value = Fraction(frac.group(2)) / den
        return -value if frac.group(1) == "-" else value
    return None


def _close(a: Fraction, b: Fraction, decimal: bool) -> bool:
    """Exactly equal, or within `REL_TOL` when one side was written as a decimal."""
    return a == b or (decimal and abs(a - b) <= REL_TOL * max(abs(a), abs(b)))


def _split_items(s: str) -> tuple[str, str, list[str]] | None:
    """(open, close, items) of a bracketed tuple/interval or a bare comma list; else None."""
    opener = next((o for o in ("\\{", "(", "[", "{") if s.startswith(o)), "")
    closer = next((c for c in ("\\}", ")", "]", "}") if s.endswith(c)), "") if opener else ""
    body = s[len(opener) : len(s) - len(closer)] if opener and closer else s
    if not (opener and closer):
        opener = closer = ""
    items, depth, start = [], 0, 0
    for i, char in enumerate(body):
        if char in "([{":
            depth += 1
        elif char in ")]}":
            depth -= 1
        elif char == "," and depth == 0:
            items.append(body[start:i])
            start = i + 1
    if not items:
        return None
    items.append(body[start:])
    return opener, closer, items


def _scalar_equal(a: str, b: str, pct_a: bool, pct_b: bool, deadline: float) -> bool:
    if a == b:
        return True
    num_a, num_b = _number(a), _number(b)
    if num_a is not None and num_b is not None:
        values_a = {num_a, num_a / 100} if pct_a else {num_a}
        values_b = {num_b, num_b / 100} if pct_b else {num_b}
        decimal = any(c in s for s in (a, b) for c in ".eE")
        return any(_close(x, y, decimal) for x in values_a for y in values_b)
    if not a or not b or max(len(a), len(b)) > MAX_SYMBOLIC_CHARS:
        return False
    return symbolic_equal(a, b, deadline - time.monotonic())


def answers_equal(predicted: str | None, reference: str | None, timeout: float = 2.0) -> bool:
    """True when `predicted` and `reference` are the same answer.

    Both are normalised (`$`, spaces, `\\left`/`\\right`, `^\\circ`, a trailing `.`, text
    units such as `\\text{ cm}`, thousands separators, `x =` prefixes), then compared as
    strings, as exact numbers (integers, decimals, `a/b`, `\\frac{a}{b}`; a percent sign
    makes `50\\%` match 50 and 0.5), and finally symbolically with sympy (`simplify(a - b)
    == 0`) in a worker process; tuples and intervals are compared element-wise with their
    brackets. The sympy part of one call gets `timeout` seconds in all; running out, or any
    parse error, means False.
    """
    if predicted is None or reference is None:
        return False
    deadline = time.monotonic() + timeout
    a, pct_a = normalize_answer(str(predicted))
    b, pct_b = normalize_answer(str(reference))
    if a == b:
        return True
    items_a, items_b = _split_items(a), _split_items(b)
    if items_a is None and items_b is None:
        return _scalar_equal(a, b, pct_a, pct_b, deadline)
    if items_a is None or items_b is None:
        return False
    if items_a[:2] != items_b[:2] or len(items_a[2]) != len(items_b[2]):
        return False
    return all(
        _scalar_equal(x, y, pct_a, pct_b, deadline)
        for x, y in zip(items_a[2], items_b[2], strict=True)
    )


def choice_letter(answer: str | None) -> str | None:
    """The option letter of a multiple-choice answer (`B`, `(b)`, `\\text{B}`, `B. 42`)."""
    if answer is None:
        return None
    s, _ = normalize_answer(answer)
    match = re.fullmatch(r"\(?([A-Za-z])\)?(?:[.:)].*)?", s)
    return match.group(1).upper() if match else None
