"""`LLM`: the public face, with vLLM's names (`generate`, `chat`) plus a streaming form."""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence

import torch
from tqdm import tqdm

from thinfer.attention.backend import select_backend
from thinfer.compression import CompressionConfig
from thinfer.config import EngineConfig
from thinfer.distributed.launch import launch
from thinfer.distributed.spec import EngineSpec
from thinfer.engine.deterministic import check_deterministic_config
from thinfer.engine.factory import LoadedModel, build_engine, resolve_model
from thinfer.engine.llm_engine import LLMEngine
from thinfer.models.fused import select_layer_ops
from thinfer.outputs import RequestOutput
from thinfer.sampling_params import SamplingParams

Prompt = str | list[int]
Message = dict[str, str]


class LLM:
    """Load a model and generate with continuous batching.

    `model` is a HF directory, a GGUF file, or (with `load_format="dummy"`) a preset name such
    as "llama-2-7b"; None means the embedded SmolLM2-135M-Instruct GGUF. It may also be an
    already loaded model (`llm.loaded`, then dtype, device and load_format stay at their
    defaults): the new LLM shares its weights, with its own engine and KV cache. KV capacity is
    `num_kv_blocks` blocks when given, else `kv_cache_memory_fraction` of the free memory.
    `kv_compression` is the default KV-cache compression of requests that set none.
    `attention_backend` is "auto" (Triton kernels on CUDA, else torch), "torch" or "triton".
    `cuda_graphs` (on by default) replays decode steps from CUDA graphs where they apply: the
    triton backend on a CUDA device (see `thinfer.engine.decode_graphs`). `fused_ops` runs
    the decoder's small ops through fused Triton kernels: "auto" (default) exactly with the
    triton attention backend, True or False to force them on or off. `gemm_dataflow` is a
    table from `thinfer bench gemm-dataflow` choosing the kernel of each linear layer per
    batch size (None: cuBLAS everywhere). `quantization="int4"` runs the linear layers on
    group-wise int4 weights on the CPU (see `thinfer.models.int4`; None: as loaded).
    `deterministic=True` makes each request's token ids and logprobs bitwise independent of
    its batch (batch-invariant kernels, at a cost; see docs/determinism.md).
    `tensor_parallel_size=N` splits the model and its KV cache over N processes (N GPUs, or
    N CPU processes over gloo), spawned here or started by torchrun; call `close()` (or use
    the LLM as a context manager) to stop them. See docs/distributed.md.
    """

    def __init__(
        self,
        model: str | LoadedModel | None = None,
        dtype: str | torch.dtype = "auto",
        device: str | None = None,
        load_format: str = "auto",
        max_num_seqs: int = 64,
        max_num_batched_tokens: int = 2048,
        max_model_len: int | None = None,
        block_size: int = 16,
        num_kv_blocks: int | None = None,
        kv_cache_memory_fraction: float = 0.5,
        seed: int = 0,
        kv_compression: CompressionConfig | dict[str, object] | None = None,
        attention_backend: str = "auto",
        cuda_graphs: bool = True,
        fused_ops: str | bool = "auto",
        gemm_dataflow: str | None = None,
        quantization: str | None = None,
        deterministic: bool = False,
        tensor_parallel_size: int = 1,
    ) -> None:
        config = EngineConfig(
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens,
            block_size=block_size,
            num_kv_blocks=num_kv_blocks,
            kv_cache_memory_fraction=kv_cache_memory_fraction,
            max_model_len=max_model_len,
            seed=seed,
            attention_backend=attention_backend,
            cuda_graphs=cuda_graphs,
            fused_ops=fused_ops,
            gemm_dataflow=gemm_dataflow,
            deterministic=deterministic,
        )
        check_deterministic_config(config)
        if deterministic and quantization is not None:
            raise ValueError(
                f"deterministic=True runs unquantized weights; quantization={quantization!r} "
                "has no batch-invariant kernel"
            )
        if not isinstance(model, LoadedModel):  # a bad backend choice fails before loading
            dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
            select_layer_ops(config.fused_ops, select_backend(config.attention_backend, dev), dev)
        if tensor_parallel_size != 1:
            loaded, self.engine = _start_parallel(
                model,
                dtype,
                device,
                load_format,
                quantization,
                config,
                kv_compression,
                tensor_parallel_size,
            )
        else:
            loaded = resolve_model(
                model,
                dtype=dtype,
                device=device,
                load_format=load_format,
                seed=seed,
                quantization=quantization,
            )
            self.engine = build_engine(loaded, config, kv_compression=kv_compression)
        self.loaded = loaded
        self.tokenizer = loaded.tokenizer
        self.model_config = loaded.config
        self.source = loaded.source
        self.max_model_len = self.engine.max_model_len
        self._ids = itertools.count()

    def close(self) -> None:
        """Stop the engine's other processes (tensor parallelism); a no-op otherwise."""
        close = getattr(self.engine, "close", None)
        if close is not None:
            close()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # ----- batch generation -------------------------------------------------------------
    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = False,
    ) -> list[RequestOutput]:
        """Generate for every prompt; outputs come back in prompt order."""
        ids = self._add_all(prompts, sampling_params)
        finals: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(ids), desc="generate", unit="req", disable=not use_tqdm)
        try:
            while len(finals) < len(ids):
                for out in self.engine.step():
                    raise_if_failed(out)
                    if out.finished:
                        finals[out.request_id] = out
                        bar.update(1)
        except BaseException:
            for request_id in ids:
                self.engine.abort_request(request_id)
            raise
        finally:
            bar.close()
        return [finals[request_id] for request_id in ids]

    def stream(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> Iterator[RequestOutput]:
        """Yield increments as they are produced: `outputs[i].delta_text`, `delta_token_ids`
        and `delta_logprobs` are what is new; a request's final output (`finished`) also
        carries the full text, token ids and logprobs (see `thinfer.outputs`).

        Closing the iterator early aborts the requests still running.
        """
        ids = self._add_all(prompts, sampling_params)
        pending = set(ids)
        try:
            while pending:
                for out in self.engine.step():
                    raise_if_failed(out)
                    if out.finished:
                        pending.discard(out.request_id)
                    yield out
        finally:
            for request_id in pending:
                self.engine.abort_request(request_id)

    def chat(
        self,
        messages: list[Message] | list[list[Message]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = False,
    ) -> list[RequestOutput]:
        """Apply the chat template to one conversation (or a list of them) and generate."""
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer, so it has no chat template")
        if not messages:
            raise ValueError("messages is empty")
        conversations = [messages] if isinstance(messages[0], dict) else messages
        prompts = [self.tokenizer.apply_chat_template(list(conv)) for conv in conversations]
        return self.generate(prompts, sampling_params, use_tqdm)

    def _add_all(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None,
    ) -> list[str]:
        if isinstance(prompts, str) or (
            isinstance(prompts, list) and prompts and isinstance(prompts[0], int)
        ):
            prompts = [prompts]
        prompts = list(prompts)
        if not prompts:
            raise ValueError("no prompts given")
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params_list = [sampling_params or SamplingParams()] * len(prompts)
        else:
            params_list = list(sampling_params)
            if len(params_list) != len(prompts):
                raise ValueError(
                    f"got {len(params_list)} SamplingParams for {len(prompts)} prompts"
                )
        ids: list[str] = []
        try:
            for prompt, params in zip(prompts, params_list):
                ids.append(self.engine.add_request(prompt, params, f"llm-{next(self._ids)}"))
        except BaseException:
            for request_id in ids:
                self.engine.abort_request(request_id)
            raise
        return ids


def _start_parallel(
    model: str | LoadedModel | None,
    dtype: str | torch.dtype,
    device: str | None,
    load_format: str,
    quantization: str | None,
    config: EngineConfig,
    kv_compression: CompressionConfig | dict[str, object] | None,
    world_size: int,
) -> tuple[LoadedModel, LLMEngine]:
    """The driver of a tensor-parallel engine (see `thinfer.distributed`)."""
    if not isinstance(world_size, int) or isinstance(world_size, bool) or world_size < 1:
        raise ValueError(f"tensor_parallel_size must be a positive integer, got {world_size!r}")
    if isinstance(model, LoadedModel):
        raise ValueError(
            "tensor_parallel_size > 1 loads each rank's shard itself: pass a model path, "
            "not a loaded model"
        )
    if config.deterministic:
        raise ValueError(
            "deterministic=True is not available with tensor_parallel_size > 1 (the "
            "all-reduce order is not part of its batch-invariance checks)"
        )
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    spec = EngineSpec(
        model, dtype, dev.type, load_format, config.seed, quantization, config, kv_compression
    )
    return launch(spec, world_size)


def raise_if_failed(out: RequestOutput) -> None:
    """Raise RuntimeError if the engine failed `out`'s request (see `RequestOutput.error`)."""
    if out.error is not None:
        raise RuntimeError(f"request {out.request_id} failed: {out.error}")
