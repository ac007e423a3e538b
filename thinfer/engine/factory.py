"""Building engines: `load_model` loads weights once, `build_engine` wires an engine.

`build_engine` is the one place that turns settings into an `LLMEngine`: it checks the
context length, picks the attention backend, sizes and allocates the KV cache. `LLM` uses it;
so do benchmarks and tests that need an engine with other settings: they build a new engine
(sharing an already loaded model) instead of changing a live one.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from thinfer.attention.backend import NATIVE_INVARIANT_BACKEND, TORCH_BACKEND, select_backend
from thinfer.compression import CompressionConfig
from thinfer.config import EngineConfig, ModelConfig, resolve_dtype
from thinfer.engine.cpu_malloc import tune_malloc_for_decode
from thinfer.engine.deterministic import (
    check_deterministic_config,
    make_batch_invariant,
    make_batch_variant,
)
from thinfer.engine.exchange import StepExchange
from thinfer.engine.kv_cache import KVCache, auto_num_blocks
from thinfer.engine.llm_engine import LLMEngine
from thinfer.loading import load_checkpoint
from thinfer.loading.tokenizer import Tokenizer
from thinfer.models import build_model
from thinfer.models.collectives import SINGLE_PROCESS, Collectives
from thinfer.models.fused import NativeLayerOps, select_layer_ops
from thinfer.models.linear import (
    QUANTIZATIONS,
    gemm_table,
    pack_linears,
    quantize_linears,
    set_gemm_dataflow,
)
from thinfer.models.llama import LlamaForCausalLM
from thinfer.models.shards import plan_shards


@dataclass(frozen=True)
class LoadedModel:
    """A model ready to serve: the network on its device, its tokenizer, where it came from.

    Engines built from one `LoadedModel` share its weights (not their KV caches); run them
    one at a time, since each engine sets the model's attention backend when built.
    """

    net: LlamaForCausalLM
    tokenizer: Tokenizer | None
    source: str

    @property
    def config(self) -> ModelConfig:
        """The model's shape."""
        return self.net.config

    @property
    def device(self) -> torch.device:
        """Where the weights live."""
        return next(self.net.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """The weights' dtype."""
        return next(self.net.parameters()).dtype


def load_model(
    model: str | None = None,
    *,
    dtype: str | torch.dtype = "auto",
    device: str | torch.device | None = None,
    load_format: str = "auto",
    seed: int = 0,
    quantization: str | None = None,
    rank: int = 0,
    collectives: Collectives = SINGLE_PROCESS,
) -> LoadedModel:
    """Load `model` (a HF directory, a GGUF file, a dummy preset with `load_format="dummy"`,
    or None for the embedded SmolLM2-135M GGUF); dummy weights are drawn from `seed`.
    `quantization="int4"` runs the linear layers on int4 weights (CPU, fp32; see
    `thinfer.models.int4`). Under tensor parallelism (`collectives` over several ranks) only
    the shard of rank `rank` is loaded (`thinfer.models.shards`)."""
    if quantization is not None and quantization not in QUANTIZATIONS:
        raise ValueError(
            f"quantization: unknown method {quantization!r}; use None or one of {QUANTIZATIONS}"
        )
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch_dtype = resolve_dtype(dtype, dev)
    if quantization is not None and (dev.type != "cpu" or torch_dtype != torch.float32):
        raise ValueError(
            f"quantization {quantization!r} runs fp32 models on the CPU, got {torch_dtype} on "
            f"{dev.type}"
        )
    checkpoint = load_checkpoint(model, load_format)
    layout = plan_shards(checkpoint.config, collectives.world_size)[rank]
    net = build_model(checkpoint.config, torch_dtype, dev, layout, collectives)
    if checkpoint.tensors is None:
        net.init_dummy_weights(seed)
    else:
        net.load_weights(checkpoint.tensors())
    net.eval()
    pack_linears(net)
    if quantization is not None:
        quantize_linears(net, quantization)
    return LoadedModel(net, checkpoint.tokenizer, checkpoint.source)


def resolve_model(
    model: str | LoadedModel | None,
    *,
    dtype: str | torch.dtype = "auto",
    device: str | torch.device | None = None,
    load_format: str = "auto",
    seed: int = 0,
    quantization: str | None = None,
) -> LoadedModel:
    """`model` itself when already loaded (then dtype, device, load_format and quantization
    must stay at their defaults: ValueError otherwise), else `load_model(model, ...)`."""
    if not isinstance(model, LoadedModel):
        return load_model(
            model,
            dtype=dtype,
            device=device,
            load_format=load_format,
            seed=seed,
            quantization=quantization,
        )
    if (dtype, device, load_format, quantization) != ("auto", None, "auto", None):
        raise ValueError(
            "dtype, device, load_format and quantization apply when loading, not to a loaded model"
        )
    return model


def build_engine(
    model: str | LoadedModel | None = None,
    config: EngineConfig | None = None,
    *,
    dtype: str | torch.dtype = "auto",
    device: str | torch.device | None = None,
    load_format: str = "auto",
    kv_compression: CompressionConfig | dict[str, object] | None = None,
    exchange: StepExchange | None = None,
    engine_class: type[LLMEngine] = LLMEngine,
) -> LLMEngine:
    """An engine over `model` (loaded here with `load_model`, or already loaded) with the
    settings of `config`; `kv_compression` is the default compression of its requests.
    Under tensor parallelism `model` is this rank's shard, `exchange` joins the ranks (all
    of them get the same number of KV blocks, the least any can hold) and `engine_class`
    is the driver's or a worker's engine (`thinfer.distributed`).

    Raises ValueError if `config.max_model_len` exceeds the model's context, or if dtype,
    device or load_format are given with an already loaded model.
    """
    config = config or EngineConfig()
    check_deterministic_config(config)
    loaded = resolve_model(
        model, dtype=dtype, device=device, load_format=load_format, seed=config.seed
    )
    context = loaded.config.max_position_embeddings
    if config.max_model_len is not None and config.max_model_len > context:
        raise ValueError(
            f"max_model_len {config.max_model_len} exceeds the model's context {context}"
        )
    max_model_len = config.max_model_len or context
    dev, torch_dtype = loaded.device, loaded.dtype
    if dev.type == "cpu":
        tune_malloc_for_decode()  # no page-fault cliff once contexts grow (see cpu_malloc)
    if config.deterministic:
        backend, ops = make_batch_invariant(loaded.net, config.fused_ops)
    else:
        make_batch_variant(loaded.net)
        backend = select_backend(config.attention_backend, dev)
        ops = select_layer_ops(config.fused_ops, backend, dev)
        set_gemm_dataflow(loaded.net, gemm_table(config.gemm_dataflow, dev))
    loaded.net.set_attention_backend(backend)
    loaded.net.set_layer_ops(ops)
    # plain decode steps in one native call where the native layer ops run (CPU, fp32)
    # (the deterministic mode's native backend runs the stack's kernels too: same bits)
    native_backend = backend in (TORCH_BACKEND, NATIVE_INVARIANT_BACKEND)
    loaded.net.set_native_decoder(isinstance(ops, NativeLayerOps) and native_backend)
    exchange = exchange or StepExchange()
    local = loaded.net.layout.local_config(loaded.config)  # this rank's KV heads
    num_blocks = config.num_kv_blocks or exchange.min_over_ranks(
        auto_num_blocks(local, _per_rank(config, exchange, dev), max_model_len, torch_dtype, dev)
    )
    kv_cache = KVCache(local, num_blocks, config.block_size, torch_dtype, dev)
    compression = CompressionConfig.coerce(kv_compression)  # type: ignore[arg-type]
    return engine_class(
        loaded.net, loaded.tokenizer, config, kv_cache, max_model_len, dev, compression, exchange
    )


def _per_rank(config: EngineConfig, exchange: StepExchange, device: torch.device) -> EngineConfig:
    """On the CPU the ranks share one machine's memory: each sizes its cache from its share
    of the fraction."""
    if device.type != "cpu" or exchange.world_size == 1:
        return config
    share = config.kv_cache_memory_fraction / exchange.world_size
    return dataclasses.replace(config, kv_cache_memory_fraction=share)
