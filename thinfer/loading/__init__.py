"""Checkpoint loading: GGUF files, HF safetensors directories, dummy presets, tokenizers."""

from thinfer.loading.checkpoint import Checkpoint, load_checkpoint
from thinfer.loading.dummy import PRESETS
from thinfer.loading.tokenizer import Tokenizer

__all__ = ["PRESETS", "Checkpoint", "Tokenizer", "load_checkpoint"]
