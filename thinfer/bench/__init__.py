"""Benchmarks of thinfer against HF transformers: throughput and latency, with plots and JSON."""
