"""Symbolic equality of two answers with sympy, meant to run in a separate process.

Run as a script (`python -P sympy_worker.py`) it reads one JSON object per line on stdin,
`{"a": "...", "b": "..."}`, and writes `{"equal": true|false}` per line on stdout, after a
first line `{"ready": true}`. It imports only the standard library and sympy (not thinfer,
which would import torch), and caps its own address space, so a pathological input
(`10**10**10**10`) ends in a MemoryError or in the parent's timeout kill, never in the
parent. `latex_to_sympy` and `sympy_equal` are importable for tests.
"""

from __future__ import annotations

import json
import re
import sys
from typing import Any

MEMORY_LIMIT_BYTES = 2 * 1024**3

# LaTeX commands rewritten to sympy names; unknown commands lose their backslash.
_COMMANDS = {
    "cdot": "*",
    "times": "*",
    "div": "/",
    "pi": "pi",
    "infty": "oo",
    "ln": "log",
    "log": "log",
    "exp": "exp",
    "sin": "sin",
    "cos": "cos",
    "tan": "tan",
    "cot": "cot",
    "sec": "sec",
    "csc": "csc",
    "arcsin": "asin",
    "arccos": "acos",
    "arctan": "atan",
}


def _group(text: str, start: int) -> tuple[str, int]:
    """The argument at `start`: a braced group (balanced) or one character; (content, end)."""
    while start < len(text) and text[start] == " ":
        start += 1
    if start >= len(text):
        raise ValueError("missing argument")
    if text[start] != "{":
        if text[start] == "\\":
            match = re.match(r"\\[A-Za-z]+", text[start:])
            if match:
                return match.group(0), start + match.end()
        return text[start], start + 1
    depth = 0
    for i in range(start, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[start + 1 : i], i + 1
    raise ValueError("unbalanced braces")


def latex_to_sympy(text: str) -> str:
    """Rewrite simple LaTeX into sympy infix: `\\frac{a}{b}` -> `((a)/(b))`, `\\sqrt{x}` ->
    `sqrt(x)`, `\\sqrt[n]{x}` -> `((x)**(1/(n)))`, `\\cdot`/`\\times` -> `*`, `^` -> `**`,
    `\\pi` -> `pi`, braces -> parentheses. Raises ValueError on unbalanced braces."""
    out: list[str] = []
    i = 0
    while i < len(text):
        char = text[i]
        if char == "\\":
            match = re.match(r"\\([A-Za-z]+)", text[i:])
            if match is None:
                i += 2  # "\{" "\}" "\," and the like
                if text[i - 1 : i] in "{}":
                    out.append("(" if text[i - 1] == "{" else ")")
                continue
            name = match.group(1)
            i += match.end()
            if name in ("frac", "dfrac", "tfrac", "cfrac"):
                num, i = _group(text, i)
                den, i = _group(text, i)
                out.append(f"(({latex_to_sympy(num)})/({latex_to_sympy(den)}))")
            elif name == "sqrt":
                root = None
                if i < len(text) and text[i] == "[":
                    close = text.find("]", i)
                    if close < 0:
                        raise ValueError("unbalanced brackets")
                    root, i = text[i + 1 : close], close + 1
                arg, i = _group(text, i)
                inner = latex_to_sympy(arg)
                out.append(
                    f"sqrt({inner})"
                    if root is None
                    else f"(({inner})**(1/({latex_to_sympy(root)})))"
                )
            elif name in ("text", "mathrm", "mathbf", "mbox", "operatorname"):
                arg, i = _group(text, i)
                out.append(latex_to_sympy(arg))
            else:
                out.append(f" {_COMMANDS.get(name, name)} ")
        elif char == "{":
            out.append("(")
            i += 1
        elif char == "}":
            out.append(")")
            i += 1
        elif char == "^":
            out.append("**")
            i += 1
        else:
            out.append(char)
            i += 1
    return "".join(out)


def _parse(text: str) -> Any:
    from sympy import E, I, Symbol
    from sympy.parsing.sympy_parser import (
        convert_xor,
        implicit_multiplication_application,
        parse_expr,
        standard_transformations,
    )

    transformations = standard_transformations + (implicit_multiplication_application, convert_xor)
    local: dict[str, Any] = {"e": E, "i": I}
    for letter in "ABCDEFGHIJKLMNOPQRSTUVWXYZ":
        local[letter] = Symbol(letter)  # not sympy's E, I, N, S, Q, O
    return parse_expr(latex_to_sympy(text), local_dict=local, transformations=transformations)


def sympy_equal(a: str, b: str) -> bool:
    """True when the two (LaTeX or infix) expressions are symbolically equal; equations
    `l = r` compare `l - r` (up to sign). Any parse or evaluation error means False."""
    try:
        return _sympy_equal(a, b)
    except Exception:  # noqa: BLE001  (SyntaxError, TypeError, sympy's own, MemoryError)
        return False


def _sympy_equal(a: str, b: str) -> bool:
    from sympy import simplify

    sides_a, sides_b = a.split("="), b.split("=")
    if len(sides_a) != len(sides_b) or len(sides_a) > 2:
        return False
    if len(sides_a) == 2:
        diff_a = _parse(sides_a[0]) - _parse(sides_a[1])
        diff_b = _parse(sides_b[0]) - _parse(sides_b[1])
        return bool(simplify(diff_a - diff_b) == 0 or simplify(diff_a + diff_b) == 0)
    left, right = _parse(a), _parse(b)
    if left == right:
        return True
    return bool(simplify(left - right) == 0)


def _limit_memory() -> None:
    try:
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT_BYTES, MEMORY_LIMIT_BYTES))
    except (ImportError, ValueError, OSError):
        pass  # not available here: the parent's timeout still bounds the time


def main() -> None:
    """Serve comparisons on stdin/stdout until stdin closes."""
    _limit_memory()
    import sympy  # noqa: F401  (imported before "ready", so comparisons are not charged for it)

    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        try:
            request = json.loads(line)
            equal = sympy_equal(str(request["a"]), str(request["b"]))
        except BaseException:  # noqa: BLE001  (MemoryError, RecursionError, sympy's own)
            equal = False
        print(json.dumps({"equal": equal}), flush=True)


if __name__ == "__main__":
    main()
