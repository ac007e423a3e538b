"""Healing a pruned model: LoRA retraining on the calibration text, merged into its weights.

As Shortened LLaMA does (its `lora_retrain.py`): LoRA adapters of rank 8 (alpha 16, dropout
0.05) on every projection (q, k, v, o, gate, up, down), AdamW, a linear warm-up, the
next-token loss; then the adapters are merged, so the saved checkpoint is a plain model of
the pruned shape. Deviation: the paper retrains on Alpaca (instructions, 5 epochs); thinfer
trains on windows of the calibration split of its text for `steps` steps (never on the
held-out split), since no instruction data ships offline.
"""

from __future__ import annotations

import math

import torch

from thinfer.pruning.hf_model import PruningModel

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def heal_lora(
    pruned: PruningModel,
    windows: torch.Tensor,
    steps: int,
    *,
    batch_size: int = 4,
    learning_rate: float = 3e-4,
    seed: int = 0,
) -> dict[str, float]:
    """Train LoRA adapters for `steps` steps on batches of `windows` [n, length] (cycled in
    a seeded random order) and merge them into `pruned.model`. Returns the mean training
    loss of the first and of the last tenth of the steps."""
    from peft import LoraConfig, get_peft_model

    if steps < 1:
        raise ValueError(f"--heal-steps must be >= 1, got {steps}")
    config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=TARGETS, bias="none")
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # the adapters' initialization and dropout
    model = get_peft_model(pruned.model, config)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=learning_rate)
    warmup = max(1, min(100, steps // 10))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup))
    losses = []
    order = torch.randperm(len(windows), generator=generator)
    model.train()
    for step in range(steps):
        picks = [(step * batch_size + i) % len(order) for i in range(batch_size)]
        rows = windows[order[picks]]
        loss = model(input_ids=rows, labels=rows, use_cache=False).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(float(loss.detach()))
    model.eval()
    pruned.model = model.merge_and_unload()
    tenth = max(1, math.ceil(steps / 10))
    return {
        "first_loss": sum(losses[:tenth]) / tenth,
        "last_loss": sum(losses[-tenth:]) / tenth,
    }
