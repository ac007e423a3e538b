"""The `thinfer dynts` sub-commands: traces, proxy-traces, corpus, label, train, proxy-eval,
fidelity, generalization.

Each sub-command is added by its own `add_*_command(commands)` function, listed in
`SUBCOMMANDS`; a new one is a function taking the group's sub-parsers plus one entry there.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

from thinfer.dynts.corpus_cli import add_corpus_command
from thinfer.dynts.features import DEFAULT_CHUNK
from thinfer.dynts.fidelity_cli import add_fidelity_command
from thinfer.dynts.generalization_cli import add_generalization_command
from thinfer.dynts.proxy_cli import add_proxy_eval_command, add_proxy_traces_command
from thinfer.dynts.traces import DEFAULT_THINK_END
from thinfer.dynts.traces_cli import add_traces_command


def _label(args: argparse.Namespace) -> int:
    import torch

    from thinfer.dynts.feature_file import save_features
    from thinfer.dynts.label import HIDDEN_DTYPES, label_traces
    from thinfer.dynts.traces import read_traces, think_end_ids
    from thinfer.llm import LLM

    if args.chunk < 1:
        raise ValueError(f"--chunk must be >= 1, got {args.chunk}")
    llm = LLM(
        model=args.model,
        load_format=args.load_format,
        dtype=args.dtype,
        device=args.device,
        num_kv_blocks=1,  # labelling uses its own cache, sized per trace
    )
    if llm.tokenizer is None:
        raise ValueError("this model has no tokenizer, so the think-end marker has no ids")
    traces = read_traces(args.traces, llm.tokenizer)
    marker = think_end_ids(llm.tokenizer, args.think_end)
    torch.set_grad_enabled(False)
    features = label_traces(
        llm.engine.model,
        traces,
        marker,
        args.chunk,
        HIDDEN_DTYPES[args.hidden_dtype],
        model_name=llm.source,
    )
    for reason, count in sorted(features["skipped"].items()):
        print(f"thinfer: warning: skipped {count} trace(s): {reason}", file=sys.stderr)
    if not features["traces"]:
        raise ValueError(f"{args.traces}: none of the {len(traces)} traces could be labelled")
    save_features(args.output, features)
    tokens = sum(int(t["thinking_mask"].sum()) for t in features["traces"])
    print(
        f"labelled {len(features['traces'])} of {len(traces)} traces "
        f"({tokens} thinking tokens) -> {args.output}"
    )
    return 0


def add_label_command(commands: Any) -> None:
    """`thinfer dynts label`: hidden states and importance labels of each trace, cached."""
    from thinfer.dynts.label import HIDDEN_DTYPES

    p = commands.add_parser(
        "label",
        help="cache hidden states and answer-attention labels of reasoning traces",
        description="Run each trace once through the model; store the final hidden state of "
        "every token, its importance label (mean attention the answer pays it, over layers, "
        "heads and answer tokens, self-attention excluded) and the thinking mask. Traces "
        "without the think-end marker are skipped with a warning.",
    )
    p.add_argument("--traces", required=True, help="JSONL traces (token ids or text)")
    p.add_argument("--output", required=True, help="features file to write (torch.save)")
    p.add_argument("--model", default=None, help="HF dir, GGUF file (default: SmolLM2)")
    p.add_argument("--load-format", default="auto", choices=["auto", "gguf", "safetensors"])
    p.add_argument("--dtype", default="auto")
    p.add_argument("--device", default=None)
    p.add_argument(
        "--think-end",
        default=DEFAULT_THINK_END,
        help=f"text of the think-end marker (default {DEFAULT_THINK_END!r})",
    )
    p.add_argument(
        "--chunk",
        type=int,
        default=DEFAULT_CHUNK,
        help=f"tokens per forward pass (default {DEFAULT_CHUNK}; bounds memory)",
    )
    p.add_argument(
        "--hidden-dtype",
        default="float32",
        choices=list(HIDDEN_DTYPES),
        help="dtype of the stored hidden states (bfloat16 halves the file for big models)",
    )
    p.set_defaults(func=_label)


def _train(args: argparse.Namespace) -> int:
    from thinfer.dynts.train import train_from_file
    from thinfer.dynts.train_options import training_config

    config = training_config(args)
    report = train_from_file(args.features, args.output, config, progress=True)
    final = report["final"]
    if final["val_mse"] is None:
        metrics = "no validation traces"
    else:
        metrics = (
            f"val MSE {final['val_mse']:.4g}, top-20% overlap {final['val_top20_overlap']:.3f}"
        )
    print(
        f"trained on {report['num_train_traces']} traces ({report['num_train_tokens']} tokens), "
        f"batches of {report['batch_size']} {report['batch_unit']}, "
        f"{report['optimizer_steps']} optimizer steps, "
        f"label transform {report['label_transform']}: {metrics} -> {args.output}"
    )
    return 0


def add_train_command(commands: Any) -> None:
    """`thinfer dynts train`: fit the importance head on a features file."""
    from thinfer.dynts.train_options import add_training_options

    p = commands.add_parser(
        "train",
        help="train the DynTS importance head on cached features",
        description="MSE on thinking tokens of rescaled labels (x5 weight on rescaled labels "
        "in [4, 5)), AdamW, cosine schedule with 10%% warm-up, gradient clip 1; a batch is "
        "whole traces (the published recipe) or tokens. Writes the head (safetensors) and "
        "OUTPUT.json with the config, the batches and steps taken and per-epoch metrics.",
    )
    p.add_argument("--features", required=True, help="file written by `thinfer dynts label`")
    p.add_argument("--output", required=True, help="head to write (safetensors)")
    add_training_options(p)
    p.set_defaults(func=_train)


SUBCOMMANDS: list[Callable[[Any], None]] = [
    add_traces_command,
    add_proxy_traces_command,
    add_corpus_command,
    add_label_command,
    add_train_command,
    add_proxy_eval_command,
    add_fidelity_command,
    add_generalization_command,
]


def add_dynts_parser(subparsers: Any) -> None:
    """Add the `dynts` group (label, train, ...) to the `thinfer` sub-commands."""
    group = subparsers.add_parser("dynts", help="DynTS: label traces, train the importance head")
    commands = group.add_subparsers(dest="dynts_command", required=True)
    for add in SUBCOMMANDS:
        add(commands)
