"""Training data for the DynTS head: label rescales, the split by trace, token tensors."""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

LABEL_TRANSFORMS = ("auto", "llama", "qwen", "none")
AUTO_TRANSFORM = "qwen"


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
    )
