"""Answer extraction and equivalence (thinfer.eval.answers), sympy worker included."""

from __future__ import annotations

import time

import pytest

from thinfer.eval.answers import answers_equal, choice_letter, extract_answer, normalize_answer
from thinfer.eval.sympy_worker import latex_to_sympy, sympy_equal


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (r"so \boxed{\frac{1}{2}}", r"\frac{1}{2}"),
        (r"first \boxed{3}, then \boxed{4}.", "4"),
        (r"\boxed{\left\{ x : x^{2} > 1 \right\}}", r"\left\{ x : x^{2} > 1 \right\}"),
        (r"\boxed{\dfrac{3}{4}}", r"\dfrac{3}{4}"),
        (r"$\boxed{\boxed{2}+1}$", r"\boxed{2}+1"),
        (r"\fbox{7}", "7"),
        (r"\boxed 5$ done", "5"),
        (r"\boxed{2} and then a truncated \boxed{\frac{1", "2"),
        ("no answer here", None),
        ("", None),
    ],
)
def test_extract_boxed(text, expected):
    assert extract_answer(text) == expected


def test_extract_with_pattern():
    text = "Answer: 3\nmore\nAnswer: (B)\n"
    assert extract_answer(text, r"Answer:\s*(\S+)") == "(B)"
    assert extract_answer(text, r"Final:\s*(\S+)") is None
    assert extract_answer("x 12 y 34", r"\d+") == "34"  # no group: the whole match


@pytest.mark.parametrize(
    ("predicted", "reference"),
    [
        (r"\frac{1}{2}", "0.5"),
        ("1/2", "0.5"),
        (r"\frac{1}{2}", "1/2"),
        (r"\dfrac{3}{4}", "0.75"),
        (r"\boxed{\dfrac{3}{4}}", r"\frac34"),
        ("1,000", "1000"),
        ("1{,}000", "1000"),
        (r"2\sqrt{2}", r"\sqrt{8}"),
        ("x^2+2x+1", "(x+1)^2"),
        ("(1, 2)", "(1,2)"),
        (r"\left( 1, \frac{1}{2} \right)", "(1, 0.5)"),
        (r"90^\circ", "90"),
        (r"90^{\circ}", "90"),
        (r"10\text{ cm}", "10"),
        (r"12 \text{ inches}^2", "12"),
        ("$5$.", "5"),
        ("x = 3", "3"),
        (r"50\%", "50"),
        (r"50\%", "0.5"),
        (r"\pi r^2", r"r^2 \pi"),
        (r"\frac{\sqrt{3}}{2}", r"\frac{1}{2}\sqrt{3}"),
        ("[0, 1)", r"\left[0,1\right)"),
        ("-3", "-3.0"),
    ],
)
def test_equivalent_forms(predicted, reference):
    assert answers_equal(predicted, reference)
    assert answers_equal(reference, predicted)


@pytest.mark.parametrize(
    ("predicted", "reference"),
    [
        ("0.5", "0.51"),
        ("x+1", "x-1"),
        ("(1,2)", "(2,1)"),
        ("[1,2)", "(1,2)"),
        ("(1,2)", "(1,2,3)"),
        ("1000000", "1000001"),
        (r"\sqrt{2}", "1.414"),
        ("2xy", "2"),
        ("", "0"),
        (None, "1"),
    ],
)
def test_wrong_answers_rejected(predicted, reference):
    assert not answers_equal(predicted, reference)


def test_normalize_keeps_command_spacing():
    assert normalize_answer(r"\pi r") == (r"\pi r", False)
    assert normalize_answer(r" \$1,234.50 ") == ("1234.50", False)
    assert normalize_answer("75%") == ("75", True)


def test_choice_letters():
    assert choice_letter("B") == "B"
    assert choice_letter("(c)") == "C"
    assert choice_letter(r"\text{D}") == "D"
    assert choice_letter("A. 42") == "A"
    assert choice_letter("42") is None


def test_latex_rewrite_and_sympy_in_process():
    assert latex_to_sympy(r"\frac{1}{2}") == "((1)/(2))"
    assert latex_to_sympy(r"\sqrt[3]{8}") == "((8)**(1/(3)))"
    assert "sqrt(2)" in latex_to_sympy(r"2\sqrt{2}")
    assert sympy_equal(r"\sqrt[3]{8}", "2")
    assert sympy_equal("y=2x+1", "2x+1=y")
    assert not sympy_equal(r"\frac{1}{2", "1")


@pytest.mark.parametrize(
    "bad",
    [
        "10**10**10**10",
        "10^{10^{10^{10}}}",
        "(" * 400 + "1" + ")" * 400,
        "x" * 100_000,
        r"\frac{" * 300 + "1" + "}{2}" * 300,
    ],
    ids=["power-tower", "latex-tower", "deep-parens", "100k-chars", "deep-fracs"],
)
def test_pathological_inputs_return_false_in_time(bad):
    timeout = 1.0
    started = time.monotonic()
    assert answers_equal(bad, "7", timeout=timeout) is False
    assert time.monotonic() - started < timeout + 2.0
