"""A multi-family corpus of reasoning traces for training and evaluating the DynTS head.

Six families (recall, tracking, arithmetic, lookup, text, codes), each with many templates and
varied filler, so that a head can be trained on all families but one and evaluated on the one
left out (`split_by_family`). `thinfer dynts corpus` writes one; see docs/dynts.md.
"""

from thinfer.dynts.corpus.build import FAMILIES, make_corpus
from thinfer.dynts.corpus.problem import (
    CorpusProblem,
    read_problems,
    split_by_family,
    write_problems,
)

__all__ = [
    "FAMILIES",
    "CorpusProblem",
    "make_corpus",
    "read_problems",
    "split_by_family",
    "write_problems",
]
