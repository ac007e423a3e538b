"""Training data for the DynTS head: label rescales, the split by trace, token tensors, and
the batches (of whole traces or of tokens) that make up an epoch."""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch

LABEL_TRANSFORMS = ("auto", "llama", "qwen", "none")
AUTO_TRANSFORM = "qwen"
BATCH_UNITS = ("traces", "tokens")
PUBLISHED_BATCH = 256  # the reference's train_batch_size (whole traces)
PUBLISHED_STEPS_PER_EPOCH = 27  # 256-trace batches on ~7k MATH traces (15 epochs -> step 405)


def transform_labels(labels: torch.Tensor, name: str) -> torch.Tensor:
    """Rescale raw mean attention probabilities: "llama" y*1e4, "qwen" 10*y^0.3/0.3,
    "none" y."""
    if name == "llama":
        return labels * 1e4
    if name == "qwen":
        return 10 * labels.clamp_min(0).pow(0.3) / 0.3
    if name == "none":
        return labels
    raise ValueError(f"unknown label transform {name!r}")


def resolve_transform(name: str, features: dict[str, Any]) -> str:
    """The concrete transform for `name`; "auto" is AUTO_TRANSFORM (see docs/dynts.md)."""
    if name not in LABEL_TRANSFORMS:
        raise ValueError(f"label transform must be one of {', '.join(LABEL_TRANSFORMS)}")
    return AUTO_TRANSFORM if name == "auto" else name


class TrainingData(NamedTuple):
    """Thinking tokens of the training traces (flat) and of each validation trace."""

    train_hidden: torch.Tensor  # [N, d] float32
    train_labels: torch.Tensor  # [N] rescaled
    val_hidden: list[torch.Tensor]  # per validation trace [n_i, d]
    val_labels: list[torch.Tensor]  # per validation trace [n_i], rescaled
    train_ids: list[str]
    val_ids: list[str]
    train_lengths: list[int]  # thinking tokens of each training trace, in train_hidden order


def split_by_trace(num_traces: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Shuffled trace indices -> (train, validation); at least one of each when there are
    two or more traces and val_fraction > 0."""
    order = torch.randperm(num_traces, generator=torch.Generator().manual_seed(seed)).tolist()
    num_val = 0
    if val_fraction > 0 and num_traces > 1:
        num_val = min(num_traces - 1, max(1, round(val_fraction * num_traces)))
    return sorted(order[num_val:]), sorted(order[:num_val])


def build_training_data(
    features: dict[str, Any], transform: str, val_fraction: float, seed: int
) -> TrainingData:
    """Thinking positions of the usable traces, split by trace; ValueError when there is
    nothing to train on."""
    usable = [t for t in features["traces"] if bool(t["thinking_mask"].any())]
    if not usable:
        raise ValueError("the features file has no trace with thinking tokens")
    train_index, val_index = split_by_trace(len(usable), val_fraction, seed)

    def tokens(trace: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        mask = trace["thinking_mask"]
        hidden = trace["hidden"][mask].float()
        return hidden, transform_labels(trace["labels"][mask].float(), transform)

    train = [tokens(usable[i]) for i in train_index]
    val = [tokens(usable[i]) for i in val_index]
    return TrainingData(
        train_hidden=torch.cat([h for h, _ in train]),
        train_labels=torch.cat([y for _, y in train]),
        val_hidden=[h for h, _ in val],
        val_labels=[y for _, y in val],
        train_ids=[str(usable[i].get("id", i)) for i in train_index],
        val_ids=[str(usable[i].get("id", i)) for i in val_index],
        train_lengths=[y.numel() for _, y in train],
    )


def resolve_batch_size(batch_size: int | None, unit: str, num_train_traces: int) -> int:
    """The batch size used: `batch_size` when given; otherwise (auto) PUBLISHED_BATCH tokens,
    or PUBLISHED_BATCH traces capped at ceil(num_train_traces / PUBLISHED_STEPS_PER_EPOCH) so a
    small corpus still gets the published ~27 optimizer steps per epoch (docs/dynts.md)."""
    if unit not in BATCH_UNITS:
        raise ValueError(f"batch unit must be one of {', '.join(BATCH_UNITS)}, got {unit!r}")
    if batch_size is not None:
        return batch_size
    if unit == "tokens":
        return PUBLISHED_BATCH
    return min(PUBLISHED_BATCH, max(1, math.ceil(num_train_traces / PUBLISHED_STEPS_PER_EPOCH)))


def epoch_batches(
    lengths: list[int], unit: str, batch_size: int, generator: torch.Generator
) -> list[torch.Tensor]:
    """One epoch's batches as indices into the flat training tokens (traces laid end to end
    with `lengths` tokens each). "traces": the traces shuffled and cut into groups of
    `batch_size` whole traces, every thinking token of each in its batch; "tokens": all
    tokens shuffled and cut into groups of `batch_size`."""
    if unit == "tokens":
        return list(torch.randperm(sum(lengths), generator=generator).split(batch_size))
    if unit != "traces":
        raise ValueError(f"batch unit must be one of {', '.join(BATCH_UNITS)}, got {unit!r}")
    starts = [0]
    for length in lengths[:-1]:
        starts.append(starts[-1] + length)
    order = torch.randperm(len(lengths), generator=generator)
    return [
        torch.cat([torch.arange(starts[i], starts[i] + lengths[i]) for i in group.tolist()])
        for group in order.split(batch_size)
    ]
