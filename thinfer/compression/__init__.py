"""Decode-time KV-cache compression: per-request configs and the policies that apply them."""

from thinfer.compression.config import CompressionConfig
from thinfer.compression.policies import CompressionPolicy, make_policy

__all__ = ["CompressionConfig", "CompressionPolicy", "make_policy"]
