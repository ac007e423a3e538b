"""Prometheus metrics of one server (`GET /metrics`), in their own `CollectorRegistry`.

vLLM's names where they fit, labelled `model_name`:

- gauges `vllm:num_requests_running`, `vllm:num_requests_waiting`, `vllm:kv_cache_usage_perc`
  (fraction of KV blocks in use, 0..1), `thinfer:kv_blocks_in_use`, `thinfer:kv_blocks_total`;
- counters `vllm:prompt_tokens_total`, `vllm:generation_tokens_total`,
  `vllm:num_preemptions_total`, `vllm:request_success_total{finished_reason}`;
- histograms `vllm:time_to_first_token_seconds`, `vllm:time_per_output_token_seconds` (per
  request: mean time between its output tokens), `vllm:e2e_request_latency_seconds`, and
  `thinfer:request_peak_kv_slots` (the engine's `RequestMetrics.peak_kv_slots` of each
  finished request: KV slots held at any time, summed over its samples).

Gauges and counters are read from the engine thread's latest `EngineStats` snapshot at scrape
time; histograms are observed by the engine thread as requests progress.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from thinfer.outputs import RequestOutput
from thinfer.server.request_stream import EngineStats

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)
_TPOT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5)
_KV_BUCKETS = tuple(float(2**i) for i in range(4, 18))
_E2E_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0, 300.0, 600.0)


class _EngineCollector(Collector):
    """Gauges and counters from the newest `EngineStats` snapshot."""

    def __init__(self, model_name: str, stats: Callable[[], EngineStats]) -> None:
        self.model_name = model_name
        self.stats = stats

    def collect(self) -> Iterator[Metric]:
        """One family per metric, each with the `model_name` label."""
        s = self.stats()
        label = [self.model_name]
        gauges = [
            ("vllm:num_requests_running", "Requests running (in the batch).", s.num_running),
            ("vllm:num_requests_waiting", "Requests waiting to be scheduled.", s.num_waiting),
            (
                "vllm:kv_cache_usage_perc",
                "KV-cache usage: fraction of KV blocks in use (1 = full).",
                s.kv_blocks_used / s.kv_blocks_total if s.kv_blocks_total else 0.0,
            ),
            ("thinfer:kv_blocks_in_use", "KV blocks in use.", s.kv_blocks_used),
            ("thinfer:kv_blocks_total", "KV blocks in the pool.", s.kv_blocks_total),
            (
                "thinfer:engine_step_running_seconds",
                "How long the engine step running now has run (0 between steps).",
                s.step_running_seconds,
            ),
        ]
        for name, doc, value in gauges:
            family = GaugeMetricFamily(name, doc, labels=["model_name"])
            family.add_metric(label, float(value))
            yield family
        counters = [
            ("vllm:prompt_tokens", "Prompt tokens of requests added.", s.prompt_tokens_total),
            ("vllm:generation_tokens", "Tokens generated.", s.generation_tokens_total),
            ("vllm:num_preemptions", "Sequences preempted.", s.preemptions_total),
        ]
        for name, doc, value in counters:
            family = CounterMetricFamily(name, doc, labels=["model_name"])
            family.add_metric(label, float(value))
            yield family


class ServerMetrics:
    """The registry of one app, and the hooks the engine thread calls."""

    def __init__(self, model_name: str, stats: Callable[[], EngineStats]) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_EngineCollector(model_name, stats))
        labels = ["model_name"]
        self._ttft = Histogram(
            "vllm:time_to_first_token_seconds",
            "Time from arrival to the first generated token.",
            labels,
            buckets=_TTFT_BUCKETS,
            registry=self.registry,
        ).labels(model_name)
        self._tpot = Histogram(
            "vllm:time_per_output_token_seconds",
            "Per request: mean time between output tokens after the first.",
            labels,
            buckets=_TPOT_BUCKETS,
            registry=self.registry,
        ).labels(model_name)
        self._e2e = Histogram(
            "vllm:e2e_request_latency_seconds",
            "Time from arrival to the last token of finished requests.",
            labels,
            buckets=_E2E_BUCKETS,
            registry=self.registry,
        ).labels(model_name)
        self._peak_kv = Histogram(
            "thinfer:request_peak_kv_slots",
            "Per finished request: the most KV slots it held at any time.",
            labels,
            buckets=_KV_BUCKETS,
            registry=self.registry,
        ).labels(model_name)
        self._success = Counter(
            "vllm:request_success",
            "Requests finished, by finish reason of their first sample.",
            labels + ["finished_reason"],
            registry=self.registry,
        )
        self.model_name = model_name

    def on_output(self, out: RequestOutput, first_token: bool) -> None:
        """Observe one engine output (called in the engine thread)."""
        m = out.metrics
        if first_token and m.time_to_first_token is not None:
            self._ttft.observe(m.time_to_first_token)
        if not out.finished:
            return
        reason = out.outputs[0].finish_reason if out.outputs else None
        if out.error is not None:
            reason = "error"  # the engine failed it (alone, or with its step)
        self._success.labels(self.model_name, reason or "unknown").inc()
        if reason in ("abort", "error"):
            return
        self._peak_kv.observe(m.peak_kv_slots)
        if m.time_per_output_token is not None:
            self._tpot.observe(m.time_per_output_token)
        if m.finished_time is not None:
            self._e2e.observe(m.finished_time - m.arrival_time)

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)
