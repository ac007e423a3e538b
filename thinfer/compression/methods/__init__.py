"""The built-in compression methods, one file each; importing this package registers them."""

from thinfer.compression.methods import dynts, h2o, rkv, sepllm, snapkv, streamingllm, window

__all__ = ["dynts", "h2o", "rkv", "sepllm", "snapkv", "streamingllm", "window"]
