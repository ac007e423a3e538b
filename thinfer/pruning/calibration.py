"""Calibration batches and perplexity on an HF model being pruned.

Text comes from `thinfer.eval.texts` (the embedded default, or the user's files): the first
80% of its tokens calibrate, the last 20% are held out for evaluation and never calibrate.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from thinfer.eval.texts import default_text, read_texts, split_tokens, windows
from thinfer.loading.tokenizer import Tokenizer

WINDOW = 128  # tokens per sample, the papers' setting


def text_splits(tokenizer: Tokenizer, paths: list[str] | None) -> tuple[list[int], list[int]]:
    """(calibration, held-out) token ids of the user's text files or the default text."""
    text = read_texts(paths) if paths else default_text()
    return split_tokens(tokenizer.encode(text))


def batch_of(token_ids: list[int], count: int | None, window: int = WINDOW) -> torch.Tensor:
    """The first `count` (None: all) windows of `window` tokens as a [count, window] batch;
    ValueError (naming the sizes) when the text is too short."""
    return torch.tensor(windows(token_ids, window, count))


@torch.no_grad()
def mean_nll(model: nn.Module, batch: torch.Tensor, chunk: int = 8) -> float:
    """Mean next-token negative log-likelihood of the windows of `batch`."""
    total, count = 0.0, 0
    for rows in batch.split(chunk):
        logits = model(input_ids=rows, use_cache=False).logits[:, :-1].float()
        nll = nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), rows[:, 1:].reshape(-1), reduction="sum"
        )
        total, count = total + float(nll), count + rows[:, 1:].numel()
    return total / count


def perplexity(model: nn.Module, batch: torch.Tensor) -> float:
    """exp(mean NLL) of the windows of `batch`."""
    return math.exp(mean_nll(model, batch))
