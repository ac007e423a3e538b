"""The HF transformers peer: the same checkpoint as an `LLM`, run with `model.generate`.

Both engines get the same token ids (tokenized once by thinfer's tokenizer), decode greedily
and ignore EOS, so their speeds compare like for like and their tokens should mostly agree.
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING

import torch

from thinfer.loading.hf_config import hf_config

__all__ = ["hf_config", "llm_device", "llm_dtype", "prefix_agreement"]

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from thinfer.llm import LLM


def llm_device(llm: LLM) -> torch.device:
    """The device an LLM runs on."""
    return next(llm.engine.model.parameters()).device


def llm_dtype(llm: LLM) -> torch.dtype:
    """The dtype of an LLM's weights."""
    return next(llm.engine.model.parameters()).dtype


def load_hf_peer(llm: LLM, load_format: str = "auto") -> PreTrainedModel:
    """Load the transformers model for `llm.source`, on the LLM's device and dtype.

    A `.gguf` source loads with `gguf_file=` (dequantized), a directory with `from_pretrained`;
    a dummy preset (or `load_format="dummy"`) builds the same shape with random weights, which
    is good for speed only.
    """
    from transformers import AutoModelForCausalLM

    dtype, device = llm_dtype(llm), llm_device(llm)
    source = llm.source
    try:
        if load_format == "dummy" or not os.path.exists(source):
            torch.manual_seed(0)
            with torch.device(device):  # drawn where it runs: a 7B CPU init takes minutes
                model = AutoModelForCausalLM.from_config(hf_config(llm.model_config), dtype=dtype)
        elif os.path.isfile(source) and source.lower().endswith(".gguf"):
            folder, name = os.path.split(os.path.abspath(source))
            model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=dtype)
        else:
            model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    except (OSError, KeyError, RuntimeError) as exc:
        raise ValueError(f"{source}: transformers cannot load it as the HF peer: {exc}") from exc
    return model.to(device).eval()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def hf_generate_tokens(
    model: PreTrainedModel,
    prompt_token_ids: list[list[int]],
    batch_size: int,
    max_new_tokens: int,
) -> tuple[float, list[list[int]]]:
    """Greedy-generate exactly `max_new_tokens` per prompt in left-padded batches.

    EOS is ignored the way thinfer's `ignore_eos` ignores it: an EOS the argmax picks is kept
    and decoding goes on (no `eos_token_id` while generating). `min_new_tokens` would instead
    mask EOS out of the argmax and so change the tokens. Returns (wall seconds for all
    batches, generated ids per prompt in prompt order).
    """
    from transformers import GenerationConfig

    if batch_size < 1 or max_new_tokens < 1:
        raise ValueError("batch_size and max_new_tokens must be >= 1")
    defaults = model.generation_config
    saved_eos = defaults.eos_token_id
    eos = defaults.eos_token_id if defaults.eos_token_id is not None else model.config.eos_token_id
    pad = defaults.pad_token_id if defaults.pad_token_id is not None else model.config.pad_token_id
    if pad is None:
        pad = (eos[0] if isinstance(eos, list) else eos) if eos is not None else 0
    gen_cfg = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=1,
        pad_token_id=pad,
        eos_token_id=None,
        bos_token_id=model.config.bos_token_id,
    )
    device = model.device
    results: list[list[int]] = []
    # generate() fills unset fields from the model's defaults: hide its EOS meanwhile.
    defaults.eos_token_id = None
    try:
        _sync(device)
        start = time.perf_counter()
        with torch.inference_mode():
            for first in range(0, len(prompt_token_ids), batch_size):
                batch = prompt_token_ids[first : first + batch_size]
                width = max(len(ids) for ids in batch)
                input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
                mask = torch.zeros((len(batch), width), dtype=torch.long)
                for row, ids in enumerate(batch):
                    input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
                    mask[row, width - len(ids) :] = 1
                out = model.generate(
                    input_ids=input_ids.to(device),
                    attention_mask=mask.to(device),
                    generation_config=gen_cfg,
                )
                results.extend(out[:, width:].tolist())
        _sync(device)
        seconds = time.perf_counter() - start
    finally:
        defaults.eos_token_id = saved_eos
    if any(len(ids) != max_new_tokens for ids in results):
        raise RuntimeError("HF generate stopped before max_new_tokens")
    return seconds, results


def prefix_agreement(a: list[list[int]], b: list[list[int]]) -> float:
    """Share of `a`'s tokens before each sequence's first divergence from `b` (1.0 for no
    tokens): how long greedy paths stay together."""
    same = total = 0
    for x, y in zip(a, b, strict=True):
        total += len(x)
        for p, q in zip(x, y):
            if p != q:
                break
            same += 1
    return same / total if total else 1.0


def token_agreement(a: list[list[int]], b: list[list[int]]) -> float:
    """Fraction of positions (over all sequences of `a`) where `a` and `b` hold the same token."""
    total = sum(len(x) for x in a)
    same = sum(int(p == q) for x, y in zip(a, b) for p, q in zip(x, y))
    return same / total if total else 0.0
