"""llama.cpp as a benchmark peer (`thinfer bench throughput --peer llama.cpp`), through
llama-cpp-python, the optional extra `pip install -e ".[llamacpp]"` (it builds llama.cpp
from source: a few minutes on two cores).

The peer runs the very GGUF file thinfer loads, with as many threads, greedy, EOS ignored,
from the same prompt token ids. llama-cpp-python's `Llama` decodes one sequence at a time,
so a "batch" of N prompts is N sequences one after another: what its users get without a
server; the record says so (`peer_batching`).
"""

from __future__ import annotations

import os
import time
from typing import Any

PEER_BATCHING = "sequential: llama-cpp-python's Llama decodes one sequence at a time"


def load_llamacpp_peer(gguf_path: str, threads: int | None, context: int) -> Any:
    """A llama_cpp.Llama over `gguf_path` with `threads` threads (default: all cores) and a
    `context`-token window. ValueError if llama-cpp-python is missing or the model is not a
    GGUF file."""
    if not str(gguf_path).endswith(".gguf") or not os.path.isfile(gguf_path):
        raise ValueError(f"--peer llama.cpp needs a GGUF file model, got {gguf_path!r}")
    try:
        from llama_cpp import Llama
    except ImportError as exc:
        raise ValueError(
            '--peer llama.cpp needs llama-cpp-python: pip install -e ".[llamacpp]"'
        ) from exc
    threads = threads or os.cpu_count() or 1
    return Llama(
        model_path=str(gguf_path),
        n_ctx=context,
        n_batch=min(512, context),
        n_threads=threads,
        n_threads_batch=threads,
        seed=0,
        verbose=False,
    )


def llamacpp_generate_tokens(
    peer: Any, prompts: list[list[int]], max_tokens: int
) -> tuple[float, list[list[int]]]:
    """Greedy `max_tokens` new tokens (EOS ignored) for each prompt in turn: (seconds, ids)."""
    outputs: list[list[int]] = []
    start = time.perf_counter()
    for prompt in prompts:
        peer.reset()
        tokens: list[int] = []
        for token in peer.generate(prompt, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0):
            tokens.append(int(token))
            if len(tokens) == max_tokens:
                break
        outputs.append(tokens)
    return time.perf_counter() - start, outputs
