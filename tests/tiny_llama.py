"""The tiny random Llama checkpoint the pruning tests prune: GQA (4 query heads in 2 KV
groups), 8 blocks, hidden 32, with the default model's real tokenizer (vocabulary 49152)."""

from __future__ import annotations

import torch
from default_model import require_default_model

from thinfer.loading import load_checkpoint


def save_tiny_llama(directory: str) -> str:
    """Write the checkpoint (seeded, so always the same weights) to `directory`."""
    import transformers

    require_default_model()
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=49152,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=8,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        initializer_range=0.2,
    )
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(directory)
    load_checkpoint(None).tokenizer.save(directory)
    return directory
