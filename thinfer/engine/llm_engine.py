"""The engine loop: accept requests, step the batch, return increments.

`add_request` validates everything before touching engine state, so a bad request raises
`ValueError` and the engine goes on serving the others. `step` runs one scheduled batch and
returns a `RequestOutput` for every request that made progress: what is new since its previous
output, and the full lists once, on its final output (see `thinfer.outputs`). Each request's
KV occupancy (`RequestMetrics.kv_slots`, `peak_kv_slots`) is measured here, with one
definition for every tool.
"""

from __future__ import annotations

import itertools
import time

import torch

from thinfer.compression import CompressionConfig
from thinfer.config import EngineConfig, ModelConfig
from thinfer.engine import telemetry
from thinfer.engine.admission import check_request, tokenize_prompt
from thinfer.engine.compression import CompressionStage
from thinfer.engine.decode_graphs import build_decode_graphs
from thinfer.engine.exchange import StepExchange
from thinfer.engine.forcing import choose_tokens_row_by_row, sampling_row
from thinfer.engine.kv_cache import KVCache
from thinfer.engine.request_state import RequestState
from thinfer.engine.runner import ModelRunner
from thinfer.engine.scheduler import ScheduledSequence, Scheduler
from thinfer.engine.sequence import Sequence
from thinfer.engine.stopping import append_text, check_stop, start_detokenizer
from thinfer.engine.telemetry import StepStats
from thinfer.loading.tokenizer import Tokenizer
from thinfer.models.llama import LlamaForCausalLM
from thinfer.outputs import RequestMetrics, RequestOutput
from thinfer.sampling_params import SamplingParams


class LLMEngine:
    """Continuous-batching engine over one model and one paged KV cache.

    Build one with `thinfer.engine.factory.build_engine` (or `LLM`); `config` is frozen, so an
    engine with other settings is a new engine (it may share the loaded model).
    `default_compression` is the KV-cache compression of requests that set none.
    `exchange` joins the ranks of a tensor-parallel engine (see `thinfer.engine.exchange`);
    the default is a single process.
    """

    def __init__(
        self,
        model: LlamaForCausalLM,
        tokenizer: Tokenizer | None,
        config: EngineConfig,
        kv_cache: KVCache,
        max_model_len: int,
        device: torch.device,
        default_compression: CompressionConfig | None = None,
        exchange: StepExchange | None = None,
    ) -> None:
        self.model = model
        self.exchange = exchange = exchange or StepExchange()
        self.model_config: ModelConfig = model.config
        self.tokenizer = tokenizer
        self.config = config
        self.kv_cache = kv_cache
        self.max_model_len = max_model_len
        self.scheduler = Scheduler(config, kv_cache)
        self.compression = CompressionStage.for_model(
            model, kv_cache, tokenizer, config.deterministic, exchange
        )
        graphs = None
        if exchange.world_size == 1:  # collectives are not captured in CUDA graphs
            graphs = build_decode_graphs(config, model, kv_cache, max_model_len)
        self.runner = ModelRunner(model, kv_cache, device, graphs, self.compression.plan_capture)
        eos = set(self.model_config.eos_token_ids)
        if tokenizer is not None:
            eos |= set(tokenizer.eos_token_ids)
        self.eos_token_ids = eos
        self._requests: dict[str, RequestState] = {}
        self._seq_ids = itertools.count()
        self._request_ids = itertools.count()
        self._seed_rng = torch.Generator().manual_seed(config.seed)
        self.default_compression: CompressionConfig | None = default_compression
        self.num_steps = 0
        self.last_stats: StepStats | None = None
        self.num_prompt_tokens_total = 0
        self.num_generated_tokens_total = 0

    # ----- requests -------------------------------------------------------------------
    def tokenize_prompt(self, prompt: str | list[int]) -> tuple[str | None, list[int]]:
        """Validate a prompt (text or token ids) and return (text, token ids)."""
        return tokenize_prompt(prompt, self.tokenizer, self.model_config.vocab_size)

    def validate(self, prompt_len: int, params: SamplingParams) -> None:
        """Raise ValueError if this request can never run to completion (see
        `thinfer.engine.admission.check_request`; a bad DynTS predictor file fails too)."""
        config = self._compression_for(params)
        if config is not None:
            self.compression.resources(config)
        check_request(
            prompt_len,
            params,
            max_model_len=self.max_model_len,
            vocab_size=self.model_config.vocab_size,
            eos_token_ids=self.eos_token_ids,
            capacity_tokens=self.kv_cache.capacity_tokens,
            compression=config,
        )

    def _compression_for(self, params: SamplingParams) -> CompressionConfig | None:
        return params.kv_compression or self.default_compression  # type: ignore[return-value]

    def add_request(
        self,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        request_id: str | None = None,
    ) -> str:
        """Queue a request; returns its id. Raises ValueError (engine unchanged) on bad input."""
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params must be SamplingParams, got {type(params).__name__}")
        text, ids = self.tokenize_prompt(prompt)
        self.validate(len(ids), params)
        request_id = request_id if request_id is not None else str(next(self._request_ids))
        if request_id in self._requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        now = time.monotonic()
        seqs = []
        for index in range(params.n):
            generator = None
            if not params.greedy:
                seed = params.seed + index if params.seed is not None else self._next_seed()
                generator = torch.Generator().manual_seed(seed)
            seq = Sequence(next(self._seq_ids), request_id, index, ids, params, generator, now)
            self.compression.attach(seq, self._compression_for(params))
            start_detokenizer(seq)
            seqs.append(seq)
        metrics = RequestMetrics(
            arrival_time=now,
            sample_peak_kv_slots=[0] * len(seqs),
            kv_bytes_per_slot=self.kv_cache.bytes_per_block // self.kv_cache.block_size,
        )
        request = RequestState(request_id, text, ids, seqs, metrics)
        self._requests[request_id] = request
        for seq in seqs:
            self.scheduler.add(seq)
        self.num_prompt_tokens_total += len(ids)
        return request_id

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Stop a request now and free its KV blocks; returns its final output (full lists,
        finish_reason "abort" on unfinished samples), or None for an unknown or finished id."""
        request = self._requests.get(request_id)
        if request is None:
            return None
        now = time.monotonic()
        self._end_request(request, "abort", now)
        return self._make_output(request, now)

    def _fail_request(self, request_id: str, why: str, now: float) -> RequestState:
        """End a request alone (finish_reason "error", `error` = why), freeing its blocks."""
        request = self._requests[request_id]
        request.error = why
        self._end_request(request, "error", now)
        return request

    def _end_request(self, request: RequestState, reason: str, now: float) -> None:
        for seq in request.seqs:
            if not seq.is_finished:
                seq.finish_reason = reason
                seq.finished_time = now
                self.scheduler.finish(seq)

    def has_unfinished_requests(self) -> bool:
        """True while any request is waiting or running."""
        return bool(self._requests)

    def get_num_unfinished_requests(self) -> int:
        """Requests not yet finished (vLLM's name): running plus waiting."""
        return len(self._requests)

    def get_num_running_requests(self) -> int:
        """Requests with at least one sample admitted to the batch (holding KV blocks)."""
        return len(self.get_running_request_ids())

    def get_running_request_ids(self) -> set[str]:
        """Ids of the requests counted by `get_num_running_requests`."""
        return {seq.request_id for seq in self.scheduler.running}

    def get_num_waiting_requests(self) -> int:
        """Unfinished requests with no sample running (queued, or all samples preempted)."""
        return len(self._requests) - self.get_num_running_requests()

    def kept_positions(self, request_id: str) -> list[torch.Tensor | None]:
        """Per sample of a running request: the token position each KV slot holds
        ([layers, KV heads, slots] under per-head compression, [slots] under shared), None
        under the full cache (slot = position). KeyError for an unknown or finished id."""
        seqs = self._requests[request_id].seqs
        return [None if s.compression is None else s.compression.state.positions for s in seqs]

    def memory_bytes(self) -> dict[str, int]:
        """Bytes this process holds for the model's weights and for its KV cache."""
        weights = {p.data_ptr(): p.numel() * p.element_size() for p in self.model.parameters()}
        return {"weights": sum(weights.values()), "kv_cache": self.kv_cache.storage.nbytes}

    @property
    def num_preemptions(self) -> int:
        """Sequences preempted (swapped out) since the engine started."""
        return self.scheduler.num_preemptions

    def _next_seed(self) -> int:
        return int(torch.randint(0, 2**62, (1,), generator=self._seed_rng))

    # ----- stepping ---------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Run one batch; returns an output for every request that made progress."""
        started = time.perf_counter()
        batch = self.scheduler.schedule()
        if not batch:
            if self.scheduler.has_unfinished:
                # Validation guarantees every request fits an empty cache; never spin silently.
                raise RuntimeError("scheduler could not place any waiting sequence")
            return []
        self.exchange.check_batch(batch)
        kv_before = [item.seq.kv_len for item in batch]
        self.compression.seconds = 0.0
        logits, hidden, capture = self.runner.execute(batch)
        self._record_peak_kv(batch)
        self.compression.observe(batch, capture, hidden)
        sampling = [item.seq for item in batch if item.samples]
        rows = [sampling_row(seq, self.eos_token_ids) for seq in sampling]
        one_by_one = self.config.deterministic  # one shape per sampling call
        chosen, failed = self.exchange.choose_tokens(
            sampling, lambda: choose_tokens_row_by_row(logits, sampling, rows, one_by_one)
        )
        now = time.monotonic()
        touched: dict[str, RequestState] = {}
        for seq, token in chosen:
            self._append_token(seq, token.token_id, token.logprob, token.top_logprobs, now)
            touched[seq.request_id] = self._requests[seq.request_id]
        for seq, why in failed:
            touched[seq.request_id] = self._fail_request(seq.request_id, why, now)
        built = time.perf_counter()
        outputs = [self._make_output(request, now) for request in touched.values()]
        output_seconds = time.perf_counter() - built
        self.num_steps += 1
        self.last_stats = telemetry.collect(
            self.num_steps,
            time.perf_counter() - started,
            batch,
            kv_before,
            len(sampling),
            self.kv_cache,
            self.model_config,
            output_seconds,
            self.compression.seconds,
        )
        return outputs

    def _append_token(
        self,
        seq: Sequence,
        token: int,
        logprob: float | None,
        top_logprobs: dict[int, float] | None,
        now: float,
    ) -> None:
        seq.output_token_ids.append(token)
        self.num_generated_tokens_total += 1
        if seq.first_token_time is None:
            seq.first_token_time = now
        if top_logprobs is not None and logprob is not None:
            if seq.logprobs is None:
                seq.logprobs = []
            seq.logprobs.append(top_logprobs)
            seq.cumulative_logprob += logprob
        new_text = append_text(seq, self.tokenizer) if self.tokenizer is not None else ""
        check_stop(seq, new_text, self.eos_token_ids, self.max_model_len)
        if seq.finish_reason is not None:
            seq.finished_time = now
            self.scheduler.finish(seq)
            return
        self.compression.compress(seq)  # evict before the new token is written

    def _record_peak_kv(self, batch: list[ScheduledSequence]) -> None:
        """Peak KV of every request in the batch, right after the model wrote its tokens."""
        for item in batch:
            request = self._requests.get(item.seq.request_id)
            if request is not None:
                request.record_peak_kv(item.seq)

    def _make_output(self, request: RequestState, now: float) -> RequestOutput:
        output = request.make_output(now)
        if output.finished:
            self._requests.pop(request.request_id, None)
        return output
