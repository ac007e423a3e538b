"""`thinfer eval`: accuracy and peak KV of KV-cache compression methods on a benchmark.

For each method, every problem gets one request of k samples (`SamplingParams(n=k)`, seeded
so that every method sees the same seeds), all submitted together; then the answers are
extracted and checked, and Pass@1, pass@k, generated lengths and peak KV lengths are
reported, per method and per problem, as JSON plus a chart (see docs/eval.md).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from thinfer.compression.config import (
    CompressionConfig,
    all_method_names,
    needs_predictor,
    scoring_field,
)
from thinfer.eval.dataset import Problem, load_problems
from thinfer.eval.generation import generate_with_peaks
from thinfer.eval.scoring import Grader, score_method
from thinfer.sampling_params import SamplingParams

if TYPE_CHECKING:
    from thinfer.llm import LLM
    from thinfer.loading.tokenizer import Tokenizer


def parse_methods(text: str) -> list[str]:
    """The comma-separated method list, validated (no duplicates, known names)."""
    methods = [m.strip() for m in text.split(",") if m.strip()]
    if not methods:
        raise ValueError("--methods is empty")
    for method in methods:
        if method not in all_method_names():
            raise ValueError(
                f"--methods: unknown method {method!r}; available: {', '.join(all_method_names())}"
            )
    if len(set(methods)) != len(methods):
        raise ValueError(f"--methods lists a method twice: {text}")
    return methods


def compression_for(
    method: str, args: argparse.Namespace, think_end_ids: list[int] | None
) -> dict[str, Any]:
    """The `kv_compression` dict of one method under the command's budget settings."""
    if method == "full":
        return {"method": "full"}  # explicit, so an engine default cannot apply
    config: dict[str, Any] = {
        "method": method,
        "budget": args.budget,
        "ratio": args.ratio,
        "trigger": args.trigger,
    }
    if args.window is not None:
        config["window"] = args.window
    if needs_predictor(method):
        config["predictor"] = args.predictor
        if think_end_ids:
            config["think_end_token_ids"] = list(think_end_ids)
    config.update(scoring_field(method, getattr(args, "scoring", "per_head")))
    return config


def validate_args(args: argparse.Namespace) -> list[str]:
    """Check everything that does not need the model; return the methods."""
    if args.methods is None:
        default = [m for m in all_method_names() if args.predictor or not needs_predictor(m)]
        methods = parse_methods(",".join(default))
    else:
        methods = parse_methods(args.methods)
    if not isinstance(args.budget, int) or args.budget < 2:
        raise ValueError(f"--budget must be an integer >= 2, got {args.budget}")
    validate_sampling(args)
    wanting = [m for m in methods if needs_predictor(m)]
    if wanting:
        if not args.predictor:
            raise ValueError(
                f"--methods includes {', '.join(wanting)}, which needs --predictor head.safetensors"
            )
        if not os.path.isfile(args.predictor):
            raise ValueError(f"--predictor: no such file {args.predictor}")
    for method in methods:
        CompressionConfig.coerce(compression_for(method, args, [0]))
    return methods


def validate_sampling(args: argparse.Namespace) -> None:
    """Check the sampling and grading options shared with `thinfer dynts traces`."""
    for name in ("samples", "max_tokens"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be >= 1, got {args.limit}")
    if args.timeout <= 0:
        raise ValueError(f"--answer-timeout must be > 0, got {args.timeout}")
    if args.answer_pattern is not None:
        try:
            re.compile(args.answer_pattern)
        except re.error as e:
            raise ValueError(f"--answer-pattern is not a valid regex: {e}") from e
    sampling_params(args, None, 0)


def sampling_params(
    args: argparse.Namespace, compression: dict[str, Any] | None, problem_index: int
) -> SamplingParams:
    """Problem i's request: k samples with seeds `seed + i*k + j`, the same for every method."""
    return SamplingParams(
        n=args.samples,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed + problem_index * args.samples,
        max_tokens=args.max_tokens,
        kv_compression=compression,
    )


def resolve_chat(tokenizer: Tokenizer, chat: bool | None) -> bool:
    """The `--chat` option resolved: None means "when the tokenizer has a chat template";
    True without a template is a ValueError."""
    has_template = tokenizer.chat_template is not None
    if chat and not has_template:
        raise ValueError("--chat: this model's tokenizer has no chat template")
    return has_template if chat is None else chat


def render_prompts(problems: list[Problem], tokenizer: Tokenizer, chat: bool) -> list[list[int]]:
    """Token ids of each problem's prompt, through the chat template when `chat`.

    A rendered template already holds its special tokens, so it is encoded without adding
    any (as `apply_chat_template(tokenize=True)` does).
    """
    prompts = []
    for problem in problems:
        text = problem.prompt_text()
        if chat:
            rendered = tokenizer.apply_chat_template([{"role": "user", "content": text}])
            prompts.append(tokenizer.encode(rendered, add_special_tokens=False))
        else:
            prompts.append(tokenizer.encode(text))
    return prompts


def _warn_dynts_budget(args: argparse.Namespace, prompt_lens: list[int]) -> None:
    """DynTS (and DynTS+H2O) never evicts prompt tokens: with budget <= prompt + window
    nothing can go."""
    config = CompressionConfig(
        "dynts", budget=args.budget, window=args.window, predictor=args.predictor or "-"
    )
    window = config.recent_window
    short = sum(1 for n in prompt_lens if args.budget <= n + window)
    if short:
        print(
            f"warning: dynts: --budget {args.budget} <= prompt + window ({window}) for {short} "
            f"of {len(prompt_lens)} problems; their caches cannot be compressed",
            file=sys.stderr,
        )


def _progress(method: str, total: int) -> Any:
    started = time.monotonic()

    def report(done: int) -> None:
        elapsed = time.monotonic() - started
        print(f"\r  {method}: {done}/{total} problems ({elapsed:.0f} s)", end="", file=sys.stderr)
        if done == total:
            print(file=sys.stderr)

    return report


def run_eval(args: argparse.Namespace, llm: LLM | None = None) -> dict[str, Any]:
    """Run the evaluation described by parsed `thinfer eval` arguments; write JSON + PNG.

    `llm` reuses a loaded model (its engine must be idle); else one is built from the model
    options. Returns the JSON record with `json_path` and `png_path` added.
    """
    from thinfer.bench.report import model_short_name, safe_name, write_result
    from thinfer.eval.plot import plot_eval

    methods = validate_args(args)
    problems = load_problems(args.dataset, args.limit)
    if llm is None:
        from thinfer.cli_args import llm_kwargs
        from thinfer.llm import LLM

        llm = LLM(**llm_kwargs(args))  # type: ignore[arg-type]
    tokenizer = llm.tokenizer
    if tokenizer is None:
        raise ValueError("this model has no tokenizer; thinfer eval needs one")
    chat = resolve_chat(tokenizer, args.chat)
    think_end = tokenizer.encode(args.think_end, add_special_tokens=False)
    if any(needs_predictor(m) for m in methods) and not think_end:
        raise ValueError(f"--think-end {args.think_end!r} encodes to no tokens")
    prompts = render_prompts(problems, tokenizer, chat)
    longest = max(range(len(prompts)), key=lambda i: len(prompts[i]))
    for method in methods:  # fail before any generation, not after hours of it
        params = sampling_params(args, compression_for(method, args, think_end), longest)
        try:
            llm.engine.validate(len(prompts[longest]), params)
        except ValueError as e:
            raise ValueError(f"{method}, problem {problems[longest].id}: {e}") from e
    if any(needs_predictor(m) for m in methods):
        _warn_dynts_budget(args, [len(p) for p in prompts])
    grader = Grader(args.answer_pattern, args.timeout)
    results: dict[str, Any] = {}
    for method in methods:
        compression = compression_for(method, args, think_end)
        params = [sampling_params(args, compression, i) for i in range(len(problems))]
        started = time.monotonic()
        samples = generate_with_peaks(
            llm.engine, prompts, params, f"eval-{method}", _progress(method, len(problems))
        )
        seconds = time.monotonic() - started
        scored = score_method(problems, samples, [len(p) for p in prompts], grader, args.keep_text)
        results[method] = {
            "kv_compression": None if method == "full" else compression,
            "generation_seconds": round(seconds, 3),
            **scored,
        }
        print(
            f"  {method}: Pass@1 {scored['pass_at_1']:.3f}, pass@{args.samples} "
            f"{scored['pass_at_k']:.3f}, mean length {scored['mean_generated_tokens']:.1f}, "
            f"mean peak KV {scored['mean_peak_kv']:.1f}",
            file=sys.stderr,
        )
    stem = Path(args.dataset).stem
    data: dict[str, Any] = {
        "benchmark": "eval",
        "dataset": {"path": args.dataset, "name": stem, "num_problems": len(problems)},
        "model": llm.source,
        "model_name": model_short_name(llm),
        "protocol": {
            "samples": args.samples,
            "max_tokens": args.max_tokens,
            "temperature": args.temperature,
            "top_p": args.top_p,
            "top_k": args.top_k,
            "seed": args.seed,
            "chat": chat,
            "answer_pattern": args.answer_pattern,
            "answer_timeout_s": args.timeout,
            "think_end": args.think_end,
            "think_end_token_ids": think_end,
            "budget": args.budget,
            "window": args.window,
            "ratio": args.ratio,
            "trigger": args.trigger,
            "scoring": getattr(args, "scoring", "per_head"),
            "predictor": args.predictor,
        },
        "prompt_tokens": {
            "mean": sum(map(len, prompts)) / len(prompts),
            "max": max(map(len, prompts)),
        },
        "summary": [
            {
                "method": method,
                **{
                    key: results[method][key]
                    for key in (
                        "pass_at_1",
                        "pass_at_k",
                        "mean_generated_tokens",
                        "mean_peak_kv",
                        "max_peak_kv",
                    )
                },
            }
            for method in methods
        ],
        "methods": results,
    }
    shared = "_shared" if getattr(args, "scoring", "per_head") == "shared" else ""
    name = f"eval_{safe_name(stem)}_{data['model_name']}{shared}"
    json_path, png_path = write_result(name, data, plot_eval(data), args.output_dir)
    print(f"wrote {json_path} and {png_path}", file=sys.stderr)
    data["json_path"], data["png_path"] = str(json_path), str(png_path)
    return data
