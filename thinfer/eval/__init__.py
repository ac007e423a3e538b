"""Benchmark evaluation: answer extraction and checking, and the `thinfer eval` runner."""

from thinfer.eval.answers import answers_equal, extract_answer

__all__ = ["answers_equal", "extract_answer"]
