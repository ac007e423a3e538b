"""The head-training options shared by `thinfer dynts train` and `thinfer dynts
generalization`: one set of flags, one `TrainConfig` built from them."""

from __future__ import annotations

import argparse
from typing import Any

from thinfer.dynts.train import TrainConfig
from thinfer.dynts.train_data import BATCH_UNITS, LABEL_TRANSFORMS, PUBLISHED_BATCH


def add_training_options(parser: Any) -> None:
    """--epochs, --lr, --batch-unit, --batch-size, --val-fraction, --label-transform, --seed
    on `parser` (a parser or an argument group), defaults from `TrainConfig`."""
    d = TrainConfig()
    parser.add_argument("--epochs", type=int, default=d.epochs)
    parser.add_argument("--lr", type=float, default=d.lr)
    parser.add_argument(
        "--batch-unit",
        default=d.batch_unit,
        choices=list(BATCH_UNITS),
        help="what --batch-size counts: whole traces (all their thinking tokens in the loss; "
        "the published recipe) or thinking tokens drawn from all traces",
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=d.batch_size,
        help=f"traces or tokens per optimizer step (default: {PUBLISHED_BATCH} tokens, or "
        f"{PUBLISHED_BATCH} traces capped so an epoch has the published ~27 steps; "
        "see docs/dynts.md)",
    )
    parser.add_argument(
        "--val-fraction", type=float, default=d.val_fraction, help="share of traces held out"
    )
    parser.add_argument(
        "--label-transform",
        default=d.label_transform,
        choices=list(LABEL_TRANSFORMS),
        help="label rescale: llama (x1e4), qwen (10*y^0.3/0.3), none; auto: see docs/dynts.md",
    )
    parser.add_argument("--seed", type=int, default=d.seed)


def training_config(args: argparse.Namespace) -> TrainConfig:
    """The `TrainConfig` of the options `add_training_options` added; ValueError when one is
    out of range."""
    config = TrainConfig(
        epochs=args.epochs,
        lr=args.lr,
        batch_size=args.batch_size,
        batch_unit=args.batch_unit,
        val_fraction=args.val_fraction,
        label_transform=args.label_transform,
        seed=args.seed,
    )
    config.check()
    return config
