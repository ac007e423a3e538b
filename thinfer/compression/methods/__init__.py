"""The built-in compression methods, one file each; importing this package registers them."""

from thinfer.compression.methods import (
    dynts,
    dynts_h2o,
    h2o,
    rkv,
    sepllm,
    snapkv,
    streamingllm,
    window,
)

__all__ = ["dynts", "dynts_h2o", "h2o", "rkv", "sepllm", "snapkv", "streamingllm", "window"]
