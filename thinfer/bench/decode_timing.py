"""Timing thinfer and HF transformers decoding on the same prompts, for the GPU benchmarks.

Only decoding is timed: the `output_len - 1` steps after every sequence has its first token
(prefill and first-token sampling excluded), so both engines are timed over the same
`batch * (output_len - 1)` tokens.

thinfer: a mark before each engine step and one after the last. HF: a forward pre-hook marks
the start of every `model.forward` inside `generate` (call 1 is the prefill, the others
decode) and one mark follows `generate`; HF decode = the second mark to the last. This
isolates decoding within one `generate` call, where "total minus a 1-token generate" would
take the difference of two noisy runs and pay for an extra prefill (seconds at 32K tokens).
On CUDA the marks are CUDA events, so the timed code runs unsynchronized, as it does untimed;
on CPU they are `perf_counter` readings.

Each run gives thinfer a KV cache of exactly what it needs (`resize_kv_cache`) and frees it
afterwards, so a peer in the same process gets the rest of the memory. A dummy-weight model
whose context is shorter than the run needs (Llama-2-7B: 4096) is built with its context
extended (`build_bench_llm`): RoPE is defined at every position and random weights are only
good for speed anyway.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import tempfile
import time
from typing import TYPE_CHECKING, Any

import torch

from thinfer.bench.hf_peer import hf_generate_tokens, llm_device
from thinfer.config import ModelConfig
from thinfer.engine.factory import build_engine
from thinfer.sampling_params import SamplingParams

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from thinfer.llm import LLM


WARMUP_PROMPT_LEN = 64
# Past a 16-slot block boundary: the warm-up allocates a new block and sees every residue of
# the context length mod 16 (kernel specializations, CUDA graphs per batch size).
WARMUP_TOKENS = 18


def parse_positive_ints(text: str, option: str) -> list[int]:
    """ "128,1024" -> [128, 1024]; ValueError naming `option` unless all are positive ints."""
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError as exc:
        raise ValueError(f"{option}: expected comma-separated integers, got {text!r}") from exc
    if not values or any(value < 1 for value in values):
        raise ValueError(f"{option}: expected positive integers, got {text!r}")
    return values


class DeviceClock:
    """Time points on a device's timeline: CUDA events on GPUs (marking never synchronizes),
    `perf_counter` readings on CPU. `seconds(i, j)` is the time from mark i to mark j."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.marks: list[Any] = []

    def mark(self) -> None:
        """Record a time point after the work queued so far."""
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def seconds(self, start: int, end: int) -> float:
        """Seconds from mark `start` to mark `end` (waits for the device on CUDA)."""
        if self.cuda:
            self.marks[end].synchronize()
            return self.marks[start].elapsed_time(self.marks[end]) / 1e3
        return self.marks[end] - self.marks[start]


@dataclasses.dataclass
class DecodeTiming:
    """One timed generation: prefill (to every sequence's first token) and decode phases."""

    batch_size: int
    prefill_seconds: float
    decode_steps: int
    decode_seconds: float

    @property
    def decode_tokens(self) -> int:
        """Tokens sampled by the decode steps."""
        return self.batch_size * self.decode_steps

    @property
    def tokens_per_s(self) -> float:
        """Decode tokens per second."""
        return self.decode_tokens / self.decode_seconds

    def as_dict(self) -> dict[str, Any]:
        """JSON form, with the derived fields."""
        return dataclasses.asdict(self) | {
            "decode_tokens": self.decode_tokens,
            "tokens_per_s": self.tokens_per_s,
        }


def synthetic_prompts(vocab_size: int, batch: int, length: int) -> list[list[int]]:
    """`batch` prompts of `length` random ids (deterministic per length), the same for both."""
    gen = torch.Generator().manual_seed(length)
    low = min(3, vocab_size - 1)
    return torch.randint(low, vocab_size, (batch, length), generator=gen).tolist()


def _hf_config_dict(cfg: ModelConfig) -> dict[str, Any]:
    """A HF `config.json` dictionary that `ModelConfig.from_hf_dict` reads back as `cfg`."""
    fields = dataclasses.asdict(cfg)
    fields["eos_token_id"] = fields.pop("eos_token_ids")
    fields["architectures"] = [fields.pop("architecture")]
    fields["model_type"] = "qwen2" if "qwen2" in cfg.architecture.lower() else "llama"
    return fields


# The KV cache an idle bench engine keeps between cells: one block, plus the one CUDA graphs
# reserve as scratch for padded rows.
IDLE_KV_BLOCKS = 2


def build_bench_llm(args: argparse.Namespace, tokens_per_seq: int) -> tuple[LLM, int | None]:
    """The LLM of `args` with an idle KV cache (`IDLE_KV_BLOCKS`; cells size their own) and a
    context of at least `tokens_per_seq`; (llm, the original context when it had to be
    extended, else None).

    Only dummy weights may be extended; `llm.source` keeps naming the original model.
    """
    from thinfer.cli_args import llm_kwargs
    from thinfer.llm import LLM
    from thinfer.loading import load_checkpoint

    kwargs = llm_kwargs(args) | {
        "num_kv_blocks": IDLE_KV_BLOCKS,
        "max_num_seqs": 1,
        "max_model_len": None,
    }
    checkpoint = load_checkpoint(args.model, args.load_format)
    context = checkpoint.config.max_position_embeddings
    if tokens_per_seq <= context:
        return LLM(**kwargs), None  # type: ignore[arg-type]
    if args.load_format != "dummy":
        raise ValueError(
            f"{tokens_per_seq} tokens per sequence exceed the model's context of {context}; "
            "use shorter lengths, or --load-format dummy (context extended for speed runs)"
        )
    longer = dataclasses.replace(checkpoint.config, max_position_embeddings=tokens_per_seq)
    with tempfile.TemporaryDirectory() as tmp:
        with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as f:
            json.dump(_hf_config_dict(longer), f)
        llm = LLM(**(kwargs | {"model": tmp}))  # type: ignore[arg-type]
    llm.source = checkpoint.source
    llm.loaded = dataclasses.replace(llm.loaded, source=checkpoint.source)
    return llm, context


def free_device_memory(device: torch.device) -> None:
    """Collect garbage and return cached CUDA blocks, so the next allocation sees them."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def resize_kv_cache(llm: LLM, num_seqs: int = 0, tokens_per_seq: int = 0) -> None:
    """Give `llm` a fresh engine whose KV cache holds `num_seqs` x `tokens_per_seq` tokens
    (one block when 0), all prefilled in one step. The old cache is freed first; if the new
    one does not fit (OutOfMemoryError), `llm` is left with a working idle engine."""
    device = llm_device(llm)

    def install(num_blocks: int, seqs: int, batched: int) -> None:
        config = dataclasses.replace(
            llm.engine.config,
            num_kv_blocks=num_blocks,
            max_num_seqs=seqs,
            max_num_batched_tokens=batched,
            max_model_len=llm.max_model_len,
        )
        compression = llm.engine.default_compression
        llm.engine = build_engine(llm.loaded, config, kv_compression=compression)

    block_size = llm.engine.config.block_size
    install(IDLE_KV_BLOCKS, 1, block_size)
    free_device_memory(device)
    if num_seqs:
        # + the CUDA graphs' scratch block, + the scheduler's admission reserve (1% of the
        # blocks), so all sequences are admitted in the same step and none is preempted
        needed = num_seqs * (-(-tokens_per_seq // block_size) + 1) + 1
        blocks = needed + needed // 99 + 1
        install(blocks, num_seqs, max(num_seqs * tokens_per_seq, block_size))


def thinfer_decode(llm: LLM, prompts: list[list[int]], output_len: int) -> DecodeTiming:
    """Generate `output_len` tokens per prompt, all at once; time prefill and decode steps."""
    engine, batch = llm.engine, len(prompts)
    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    clock = DeviceClock(llm_device(llm))
    ids: list[str] = []
    first_decode_mark, sampled = None, 0
    try:
        for prompt in prompts:
            ids.append(engine.add_request(list(prompt), params))
        while engine.has_unfinished_requests():
            if sampled >= batch and first_decode_mark is None:
                first_decode_mark = len(clock.marks)
            clock.mark()
            engine.step()
            stats = engine.last_stats
            assert stats is not None
            if first_decode_mark is not None and stats.num_sampled != batch:
                raise RuntimeError(f"a decode step sampled {stats.num_sampled} of {batch} rows")
            sampled += stats.num_sampled
        clock.mark()
    except BaseException:
        for request_id in ids:
            engine.abort_request(request_id)
        raise
    if first_decode_mark is None:
        raise RuntimeError("no decode step ran (is output_len >= 2?)")
    end = len(clock.marks) - 1
    return DecodeTiming(
        batch_size=batch,
        prefill_seconds=clock.seconds(0, first_decode_mark),
        decode_steps=end - first_decode_mark,
        decode_seconds=clock.seconds(first_decode_mark, end),
    )


def hf_decode(model: PreTrainedModel, prompts: list[list[int]], output_len: int) -> DecodeTiming:
    """One HF `generate` of `output_len` tokens for all prompts; time prefill and decode."""
    clock = DeviceClock(model.device)
    handle = model.register_forward_pre_hook(lambda _module, _args: clock.mark())
    try:
        hf_generate_tokens(model, prompts, len(prompts), output_len)
        clock.mark()
    finally:
        handle.remove()
    forwards = len(clock.marks) - 1  # more than output_len if HF decides to stop a step late
    if forwards < output_len or output_len < 2:
        raise RuntimeError(f"HF ran {forwards} forward passes for {output_len} tokens")
    end = len(clock.marks) - 1
    return DecodeTiming(len(prompts), clock.seconds(0, 1), output_len - 1, clock.seconds(1, end))


def time_thinfer(llm: LLM, prompts: list[list[int]], output_len: int) -> DecodeTiming:
    """Warm up at this batch size, then `thinfer_decode` with a KV cache sized for the run
    (released afterwards)."""
    warm = [p[:WARMUP_PROMPT_LEN] for p in prompts]
    need = max(len(prompts[0]) + output_len, len(warm[0]) + WARMUP_TOKENS)
    try:
        resize_kv_cache(llm, len(prompts), need)
        thinfer_decode(llm, warm, WARMUP_TOKENS)
        return thinfer_decode(llm, prompts, output_len)
    finally:
        resize_kv_cache(llm)


def time_hf(peer: PreTrainedModel, prompts: list[list[int]], output_len: int) -> DecodeTiming:
    """Warm up at this batch size, then `hf_decode`."""
    hf_decode(peer, [p[:WARMUP_PROMPT_LEN] for p in prompts], WARMUP_TOKENS)
    return hf_decode(peer, prompts, output_len)
