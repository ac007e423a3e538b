"""`thinfer` command line: generate, bench, eval, prune, serve, dynts.

Bad input (invalid parameters, unknown model, malformed files) exits with status 2 and one
line on stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

from thinfer.cli_args import add_model_args, llm_kwargs
from thinfer.sampling_params import SamplingParams

if TYPE_CHECKING:
    from thinfer.llm import LLM

EXIT_BAD_INPUT = 2


def _add_sampling_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=-1)
    parser.add_argument("--min-p", type=float, default=0.0)
    parser.add_argument("--repetition-penalty", type=float, default=1.0)
    parser.add_argument("--sample-seed", type=int, default=None, help="per-request seed")
    parser.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    parser.add_argument("--n", type=int, default=1)
    parser.add_argument("--ignore-eos", action="store_true")


def _sampling_params(args: argparse.Namespace, overrides: dict[str, object]) -> SamplingParams:
    values: dict[str, object] = dict(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        min_p=args.min_p,
        repetition_penalty=args.repetition_penalty,
        seed=args.sample_seed,
        stop=args.stop,
        n=args.n,
        ignore_eos=args.ignore_eos,
    )
    allowed = set(SamplingParams.__dataclass_fields__)
    unknown = sorted(set(overrides) - allowed)
    if unknown:
        raise ValueError(f"unknown sampling field(s) {', '.join(unknown)}")
    values.update(overrides)
    return SamplingParams(**values)  # type: ignore[arg-type]


def _read_jsonl(path: str) -> list[dict[str, object]]:
    try:
        with open(path, encoding="utf-8") as f:
            lines = [(i, line) for i, line in enumerate(f, 1) if line.strip()]
    except OSError as e:
        raise ValueError(f"cannot read {path}: {e.strerror}") from e
    records = []
    for number, line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{number}: invalid JSON ({e.msg})") from e
        if not isinstance(record, dict):
            raise ValueError(f"{path}:{number}: each line must be a JSON object")
        records.append(record)
    if not records:
        raise ValueError(f"{path}: no prompts")
    return records


def cmd_generate(args: argparse.Namespace) -> int:
    """`thinfer generate`: one prompt to stdout, or a JSONL file of prompts to JSONL."""
    from thinfer.llm import LLM

    if (args.prompt is None) == (args.file is None):
        raise ValueError("give either a prompt or --file prompts.jsonl")
    base = _sampling_params(args, {})
    records = _read_jsonl(args.file) if args.file is not None else []
    llm = LLM(**llm_kwargs(args))  # type: ignore[arg-type]
    try:
        return _generate(args, llm, base, records)
    finally:
        llm.close()  # stops the other ranks of a tensor-parallel engine


def _generate(args: argparse.Namespace, llm: LLM, base: SamplingParams, records: list[dict]) -> int:
    """`cmd_generate` once the model is loaded."""
    if args.file is None:
        prompt = args.prompt
        if args.chat:
            outputs = llm.chat([{"role": "user", "content": prompt}], base)
        else:
            outputs = llm.generate(prompt, base)
        for completion in outputs[0].outputs:
            print(completion.text)
        return 0
    prompts: list[str | list[int]] = []
    params = []
    for number, record in enumerate(records, 1):
        where = f"{args.file}:{number}"
        if "prompt" not in record and "messages" not in record:
            raise ValueError(f"{where}: needs a 'prompt' or 'messages' field")
        fields = {k: v for k, v in record.items() if k not in ("prompt", "messages", "id")}
        try:
            params.append(_sampling_params(args, fields))
        except (TypeError, ValueError) as e:
            raise ValueError(f"{where}: {e}") from e
        if "messages" in record:
            prompts.append(_chat_prompt(llm, record["messages"], where))
        else:
            text = record["prompt"]
            if args.chat and isinstance(text, str):
                text = _chat_prompt(llm, [{"role": "user", "content": text}], where)
            prompts.append(text)
    outputs = llm.generate(prompts, params, use_tqdm=True)
    out = open(args.output, "w", encoding="utf-8") if args.output else sys.stdout
    try:
        for record, result in zip(records, outputs):
            for completion in result.outputs:
                row = {
                    "id": record.get("id"),
                    "index": completion.index,
                    "text": completion.text,
                    "token_ids": completion.token_ids,
                    "finish_reason": completion.finish_reason,
                    "time_to_first_token": result.metrics.time_to_first_token,
                    "time_per_output_token": result.metrics.time_per_output_token,
                }
                out.write(json.dumps(row) + "\n")
    finally:
        if out is not sys.stdout:
            out.close()
    return 0


def _chat_prompt(llm: LLM, messages: object, where: str) -> str:
    if llm.tokenizer is None:
        raise ValueError(f"{where}: this model has no tokenizer, so no chat template")
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise ValueError(f"{where}: 'messages' must be a list of {{role, content}} objects")
    return llm.tokenizer.apply_chat_template(messages)


def build_parser() -> argparse.ArgumentParser:
    """The whole command tree."""
    parser = argparse.ArgumentParser(prog="thinfer", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate text for a prompt or a JSONL file")
    gen.add_argument("prompt", nargs="?", default=None)
    gen.add_argument("--file", default=None, help="JSONL with 'prompt' or 'messages' per line")
    gen.add_argument("--output", default=None, help="write JSONL results here (default stdout)")
    gen.add_argument("--chat", action="store_true", help="apply the model's chat template")
    add_model_args(gen)
    _add_sampling_args(gen)
    gen.set_defaults(func=cmd_generate)
    from thinfer.bench.cli import add_bench_parser
    from thinfer.dynts.cli import add_dynts_parser
    from thinfer.eval.cli import add_eval_parser
    from thinfer.pruning.cli import add_prune_parser
    from thinfer.server.serve_args import add_serve_parser

    add_bench_parser(sub)
    add_dynts_parser(sub)
    add_eval_parser(sub)
    add_prune_parser(sub)
    add_serve_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `thinfer` console command."""
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except ValueError as e:
        print(f"thinfer: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
