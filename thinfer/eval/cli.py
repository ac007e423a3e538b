"""`thinfer eval`: the command-line options of the evaluation runner, and of its siblings
`thinfer eval ppl`, perplexity on real text, and `thinfer eval quant-cost` (see
docs/eval.md)."""

from __future__ import annotations

import argparse
from typing import Any

from thinfer.bench.report import DEFAULT_OUTPUT_DIR
from thinfer.eval.quant_cost import add_parser as add_quant_cost_parser

ALL_METHODS = "full,window,streamingllm,sepllm,h2o,snapkv,rkv,dynts"


def _eval(args: argparse.Namespace) -> int:
    from thinfer.eval.runner import run_eval

    # Not `required=True` in argparse, so that `thinfer eval ppl` needs neither.
    given = {"--dataset": args.dataset, "--budget": args.budget}
    missing = [flag for flag, value in given.items() if value is None]
    if missing:
        raise ValueError(f"eval: the following arguments are required: {', '.join(missing)}")
    run_eval(args)
    return 0


def add_eval_parser(subparsers: Any) -> None:
    """Add `eval` to the `thinfer` sub-commands."""
    from thinfer.cli_args import add_model_args
    from thinfer.compression.config import TRIGGERS

    ev = subparsers.add_parser(
        "eval",
        help="Pass@1 and peak KV of compression methods on a JSONL benchmark",
        description="Sample every problem k times per method (the DynTS protocol: temperature "
        "0.6, top-p 0.95, top-k 20, up to 16384 new tokens), check the last \\boxed{} answer "
        "against the reference (symbolic equality), and report Pass@1, pass@k, generated "
        "lengths and peak KV lengths per method as JSON + PNG. --seed also seeds the "
        "samples: problem i's sample j uses seed + i*k + j, the same under every method.",
    )
    ev.add_argument("--dataset", default=None, help="JSONL file of problems (required)")
    ev.add_argument(
        "--methods",
        default=None,
        help=f"comma-separated (default {ALL_METHODS}; dynts only with --predictor)",
    )
    ev.add_argument("--budget", type=int, default=None, help="KV slots per sample (B; required)")
    ev.add_argument(
        "--window", type=int, default=None, help="recent tokens kept (W; default per method)"
    )
    ev.add_argument(
        "--ratio", type=float, default=0.3, help="share of older tokens kept (r; default 0.3)"
    )
    ev.add_argument("--trigger", default="native", choices=list(TRIGGERS), help="default native")
    ev.add_argument(
        "--scoring",
        default="per_head",
        choices=["per_head", "shared"],
        help="H2O/SnapKV/R-KV: keep slots per head (default) or one shared score per token",
    )
    ev.add_argument("--predictor", default=None, help="DynTS head (safetensors); dynts needs it")
    ev.add_argument("--think-end", default="</think>", help="marker that ends the thinking (DynTS)")
    add_sampling_args(ev, default_samples=5)
    ev.add_argument(
        "--keep-text", action="store_true", help="store every sample's text in the JSON"
    )
    ev.add_argument(
        "--output-dir",
        default=str(DEFAULT_OUTPUT_DIR),
        help="where the JSON and PNG go (default: bench/results)",
    )
    add_model_args(ev)
    ev.set_defaults(func=_eval)
    commands = ev.add_subparsers(
        dest="eval_command",
        metavar="{ppl,quant-cost}",
        help="optional: ppl = perplexity on real text; quant-cost = int8/int4 against fp32",
    )
    add_ppl_parser(commands)
    add_quant_cost_parser(commands)


def add_sampling_args(parser: argparse.ArgumentParser, default_samples: int) -> None:
    """The sampling, problem-set and grading options shared by `thinfer eval` and
    `thinfer dynts traces` (defaults: the DynTS protocol)."""
    parser.add_argument(
        "--samples",
        type=int,
        default=default_samples,
        help=f"samples per problem, k (default {default_samples})",
    )
    parser.add_argument("--max-tokens", type=int, default=16384, help="default 16384")
    parser.add_argument("--temperature", type=float, default=0.6, help="default 0.6")
    parser.add_argument("--top-p", type=float, default=0.95, help="default 0.95")
    parser.add_argument("--top-k", type=int, default=20, help="default 20")
    parser.add_argument("--limit", type=int, default=None, help="only the first N problems")
    parser.add_argument(
        "--answer-pattern",
        default=None,
        help="regex with one group: its last match is the answer (default: last \\boxed{})",
    )
    parser.add_argument(
        "--answer-timeout",
        dest="timeout",
        type=float,
        default=2.0,
        help="seconds for one symbolic answer check (default 2)",
    )
    parser.add_argument(
        "--chat",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="apply the chat template (default: when the tokenizer has one)",
    )


def add_ppl_parser(commands: Any) -> None:
    """Add `ppl` to the `thinfer eval` sub-commands."""
    from thinfer.cli_args import add_model_args

    ppl = commands.add_parser(
        "ppl",
        help="perplexity of a model on real text",
        description="Perplexity through thinfer's own forward pass: the text is tokenized, cut "
        "into consecutive windows of --window tokens, each window scored on its own from its "
        "first token; ppl = exp(mean NLL of the predicted tokens). Default text: the Python "
        "documentation topics (pydoc_data), its held-out last 20% of tokens.",
    )
    ppl.add_argument("model_path", nargs="?", default=None, metavar="MODEL", help="as --model")
    ppl.add_argument(
        "--text",
        action="extend",
        nargs="+",
        default=None,
        metavar="PATH",
        help="text files, directories of *.txt, or glob patterns (default: pydoc_data topics)",
    )
    ppl.add_argument("--window", type=int, default=128, help="tokens per window (default 128)")
    ppl.add_argument("--count", type=int, default=None, help="at most N windows (default all)")
    ppl.add_argument(
        "--split",
        default="eval",
        choices=["eval", "calib", "all"],
        help="eval: the last 20%% of the tokens (default); calib: the rest; all: every token",
    )
    ppl.add_argument("--batch-size", type=int, default=8, help="windows per forward pass")
    ppl.add_argument("--json", default=None, metavar="OUT", help="write the result here as JSON")
    add_model_args(ppl)
    ppl.set_defaults(func=_ppl)


SPLIT_NAMES = {"eval": "held-out split of", "calib": "calibration split of", "all": "all of"}


def _ppl(args: argparse.Namespace) -> int:
    """`thinfer eval ppl`: print the perplexity line, optionally write the JSON."""
    import json
    import platform

    from thinfer.cli_args import llm_kwargs
    from thinfer.eval.perplexity import perplexity
    from thinfer.eval.texts import DEFAULT_SOURCE, default_text, read_texts, split_tokens
    from thinfer.eval.texts import windows as cut_windows
    from thinfer.llm import LLM

    if args.model_path is not None:
        if args.model is not None and args.model != args.model_path:
            raise ValueError(f"two models given: {args.model_path} and --model {args.model}")
        args.model = args.model_path
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.window < 2 or (args.count is not None and args.count < 1):
        raise ValueError(f"--window must be >= 2 and --count >= 1, got {args.window}, {args.count}")
    if args.tensor_parallel_size != 1:
        raise ValueError("perplexity runs the model in one process: --tensor-parallel-size 1")
    if args.text:
        text, source = read_texts(args.text), " ".join(args.text)
    else:
        text, source = default_text(), f"{DEFAULT_SOURCE} (Python {platform.python_version()})"
    # The engine's own KV cache is not used (perplexity has its own): keep it tiny.
    kwargs = llm_kwargs(args) | {"num_kv_blocks": args.num_kv_blocks or 2, "cuda_graphs": False}
    llm = LLM(**kwargs)  # type: ignore[arg-type]
    try:
        if llm.tokenizer is None:
            raise ValueError("this model has no tokenizer, so the text has no token ids")
        ids = llm.tokenizer.encode(text, add_special_tokens=False)
        calib, held_out = split_tokens(ids)
        chosen = {"eval": held_out, "calib": calib, "all": ids}[args.split]
        result = perplexity(llm, cut_windows(chosen, args.window, args.count), args.batch_size)
    finally:
        llm.close()
    print(
        f"ppl {result['ppl']:.2f} (nll {result['nll']:.3f}, {result['windows']} windows x "
        f"{args.window} tokens, {SPLIT_NAMES[args.split]} {source})"
    )
    if args.json is not None:
        record = {
            "model": llm.source,
            "text_source": source,
            "text_tokens": len(ids),
            "split": args.split,
            "split_tokens": len(chosen),
            "window": args.window,
            "count": result["windows"],
            "predicted_tokens": result["tokens"],
            "nll": result["nll"],
            "ppl": result["ppl"],
            "dtype": str(llm.loaded.dtype).removeprefix("torch."),
            "device": str(llm.loaded.device),
        }
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(record, f, indent=2)
            f.write("\n")
    return 0
