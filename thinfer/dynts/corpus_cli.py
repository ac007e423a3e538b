"""`thinfer dynts corpus`: write a multi-family trace corpus (thinfer/dynts/corpus/)."""

from __future__ import annotations

import argparse
from typing import Any


def _families(text: str | None) -> list[str] | None:
    """The comma-separated family list (None: all)."""
    if text is None:
        return None
    return [name.strip() for name in text.split(",") if name.strip()]


def _corpus(args: argparse.Namespace) -> int:
    from thinfer.dynts.corpus.build import check_request, make_corpus
    from thinfer.dynts.corpus.problem import write_problems
    from thinfer.loading.checkpoint import load_checkpoint

    families = check_request(_families(args.families), args.count, args.target_tokens)
    tokenizer = load_checkpoint(args.model, args.load_format).tokenizer
    if tokenizer is None:
        raise ValueError("this model has no tokenizer")
    problems = make_corpus(
        tokenizer, families, args.count, args.seed, args.target_tokens, args.think_end
    )
    write_problems(args.output, problems)
    for family in families:
        lengths = [len(p.trace.token_ids) for p in problems if p.family == family]
        mean = sum(lengths) / len(lengths)
        print(f"{family:<11} {len(lengths):>5} traces, mean {mean:.0f} tokens")
    print(f"wrote {len(problems)} traces -> {args.output}")
    return 0


def add_corpus_command(commands: Any) -> None:
    """`thinfer dynts corpus`: traces of several task families, with answers and families."""
    from thinfer.dynts.corpus.build import DEFAULT_TARGET_TOKENS, FAMILIES
    from thinfer.dynts.traces import DEFAULT_THINK_END

    p = commands.add_parser(
        "corpus",
        help="generate a multi-family trace corpus (recall, tracking, arithmetic, ...)",
        description="Write traces of several synthetic task families (thinfer/dynts/corpus/), "
        "each with many templates and varied filler, as token-id trace JSONL with the keys "
        "family and answer_prefix_end. Each family has its own random stream from the seed, "
        "so a family's traces do not depend on which other families are written.",
    )
    p.add_argument("--output", required=True, help="JSONL file to write")
    p.add_argument(
        "--families",
        default=None,
        help=f"comma-separated families (default all: {','.join(FAMILIES)})",
    )
    p.add_argument("--count", type=int, default=60, help="traces per family (default 60)")
    p.add_argument("--seed", type=int, default=0, help="corpus seed (default 0)")
    p.add_argument(
        "--target-tokens",
        type=int,
        default=DEFAULT_TARGET_TOKENS,
        help=f"mean trace length in tokens, varied ±30%% (default {DEFAULT_TARGET_TOKENS})",
    )
    p.add_argument(
        "--think-end",
        default=DEFAULT_THINK_END,
        help=f"text of the think-end marker (default {DEFAULT_THINK_END!r})",
    )
    p.add_argument("--model", default=None, help="whose tokenizer (default: SmolLM2)")
    p.add_argument("--load-format", default="auto", choices=["auto", "gguf", "safetensors"])
    p.set_defaults(func=_corpus)
