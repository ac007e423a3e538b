"""Training the DynTS importance head on cached features (the frozen model is never re-run).

The published recipe: MSE on thinking positions only, labels rescaled (x1e4 "llama" style or
10*y^0.3/0.3 "qwen" style), weight x5 on rescaled labels in [4, 5), AdamW (lr 5e-4, betas
0.9/0.95, weight decay 0.01), cosine schedule with 10% linear warm-up, gradient clip 1,
token-level batches of 256. Validation holds out whole traces and reports the MSE (rescaled
labels) and how much of each trace's true top-20% of thinking tokens the head's top-20%
recovers.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass

import torch
from tqdm import tqdm

from thinfer.compression.predictor import ImportancePredictor, save_predictor
from thinfer.dynts.feature_file import load_features
from thinfer.dynts.train_data import (
    LABEL_TRANSFORMS,
    TrainingData,
    build_training_data,
    resolve_transform,
)

UPWEIGHT_BAND = (4.0, 5.0)  # rescaled labels in [low, high) weigh UPWEIGHT in the loss
UPWEIGHT = 5.0
TOP_FRACTION = 0.2
EVAL_BATCH = 8192


@dataclass
class TrainConfig:
    """Hyper-parameters; defaults are the published recipe (label transform: see docs)."""

    epochs: int = 15
    lr: float = 5e-4
    batch_size: int = 256
    val_fraction: float = 0.1
    label_transform: str = "auto"
    seed: int = 0
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_fraction: float = 0.1
    grad_clip: float = 1.0

    def check(self) -> None:
        """ValueError naming the first bad setting."""
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.batch_size < 1:
            raise ValueError(f"batch size must be >= 1, got {self.batch_size}")
        if not 0 <= self.val_fraction < 1:
            raise ValueError(f"val fraction must be in [0, 1), got {self.val_fraction}")
        if self.label_transform not in LABEL_TRANSFORMS:
            raise ValueError(
                f"label transform must be one of {', '.join(LABEL_TRANSFORMS)}, "
                f"got {self.label_transform!r}"
            )


def make_schedule(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup_fraction: float
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over the first `warmup_fraction` of the steps, then cosine to zero."""
    warmup = max(1, round(warmup_fraction * total_steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def weighted_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean of (pred - target)^2, x UPWEIGHT where the target is in UPWEIGHT_BAND."""
    low, high = UPWEIGHT_BAND
    weight = torch.where((target >= low) & (target < high), UPWEIGHT, 1.0)
    return (weight * (pred - target) ** 2).mean()


@torch.no_grad()
def predict(head: ImportancePredictor, hidden: torch.Tensor) -> torch.Tensor:
    """Scores [N] of hidden states [N, d], EVAL_BATCH rows at a time."""
    return torch.cat([head(part) for part in hidden.split(EVAL_BATCH)])


def top_overlap(pred: torch.Tensor, true: torch.Tensor, fraction: float = TOP_FRACTION) -> float:
    """|top(pred) & top(true)| / |top(true)|, top = the round(fraction * n) highest (>= 1)."""
    k = max(1, round(fraction * true.numel()))
    chosen = set(torch.topk(pred, k).indices.tolist())
    return len(chosen & set(torch.topk(true, k).indices.tolist())) / k


def evaluate(head: ImportancePredictor, data: TrainingData) -> dict[str, float | None]:
    """Validation MSE over all held-out thinking tokens and the mean top-20% overlap per
    held-out trace (None without validation traces)."""
    if not data.val_hidden:
        return {"val_mse": None, "val_top20_overlap": None}
    errors, overlaps, count = 0.0, [], 0
    for hidden, labels in zip(data.val_hidden, data.val_labels):
        pred = predict(head, hidden)
        errors += float(((pred - labels) ** 2).sum())
        count += labels.numel()
        overlaps.append(top_overlap(pred, labels))
    return {"val_mse": errors / count, "val_top20_overlap": sum(overlaps) / len(overlaps)}


def train_predictor(
    features: dict, config: TrainConfig, progress: bool = False
) -> tuple[ImportancePredictor, dict]:
    """Train a head on a checked features dict; returns it and the report (see docs)."""
    config.check()
    transform = resolve_transform(config.label_transform, features)
    data = build_training_data(features, transform, config.val_fraction, config.seed)
    gen = torch.Generator().manual_seed(config.seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        head = ImportancePredictor(features["hidden_size"])
    optimizer = torch.optim.AdamW(
        head.parameters(), lr=config.lr, betas=config.betas, weight_decay=config.weight_decay
    )
    num_tokens = data.train_labels.numel()
    steps_per_epoch = -(-num_tokens // config.batch_size)
    schedule = make_schedule(optimizer, config.epochs * steps_per_epoch, config.warmup_fraction)
    metrics = []
    epochs = tqdm(range(1, config.epochs + 1), desc="train", unit="epoch", disable=not progress)
    for epoch in epochs:
        head.train()
        order = torch.randperm(num_tokens, generator=gen)
        total_loss = 0.0
        for batch in order.split(config.batch_size):
            loss = weighted_mse(head(data.train_hidden[batch]), data.train_labels[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(head.parameters(), config.grad_clip)
            optimizer.step()
            schedule.step()
            total_loss += float(loss.detach()) * batch.numel()
        head.eval()
        row = {"epoch": epoch, "train_loss": total_loss / num_tokens, **evaluate(head, data)}
        metrics.append(row)
        epochs.set_postfix({k: v for k, v in row.items() if k != "epoch" and v is not None})
    head.requires_grad_(False)
    report = {
        "hidden_size": features["hidden_size"],
        "model": features.get("model", ""),
        "label_transform": transform,
        **{k: v for k, v in asdict(config).items() if k != "label_transform"},
        "label_transform_requested": config.label_transform,
        "upweight": {"band": list(UPWEIGHT_BAND), "weight": UPWEIGHT},
        "num_traces": len(features["traces"]),
        "num_train_traces": len(data.train_ids),
        "num_val_traces": len(data.val_ids),
        "num_train_tokens": num_tokens,
        "num_val_tokens": sum(labels.numel() for labels in data.val_labels),
        "val_trace_ids": data.val_ids,
        "metrics": metrics,
        "final": {k: metrics[-1][k] for k in ("val_mse", "val_top20_overlap")},
    }
    return head, report


def train_from_file(
    features_path: str, output: str, config: TrainConfig, progress: bool = False
) -> dict:
    """Train on a features file; write the head to `output` and the report to
    `output + ".json"`; return the report."""
    config.check()
    head, report = train_predictor(load_features(features_path), config, progress)
    report["features"] = features_path
    save_predictor(head, output)
    with open(output + ".json", "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)
        f.write("\n")
    return report
