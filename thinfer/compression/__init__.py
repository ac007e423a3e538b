"""Decode-time KV-cache compression: per-request configs, the methods that score tokens, and
the schedules that decide what to keep. The engine applies them in one compression stage
(`thinfer.engine.compression`)."""

from thinfer.compression.config import CompressionConfig
from thinfer.compression.method import METHODS, Method, ScoreContext, Signals, register

__all__ = ["METHODS", "CompressionConfig", "Method", "ScoreContext", "Signals", "register"]
