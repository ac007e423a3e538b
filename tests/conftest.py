"""Shared fixtures: the real default model (SmolLM2-135M GGUF, fp32 CPU) loaded once."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch

if not torch.cuda.is_available():
    # Triton kernels run on CPU through the interpreter; @triton.jit reads this when it
    # decorates, so it must be set before any kernel module is imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from default_model import require_default_model  # noqa: E402

from thinfer import LLM  # noqa: E402
from thinfer.loading.checkpoint import default_model_path  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def llm() -> LLM:
    """The default model with a roomy cache."""
    require_default_model()
    return LLM(dtype="float32", device="cpu", num_kv_blocks=2048)


@pytest.fixture(scope="session")
def hf_model() -> torch.nn.Module:
    """HF transformers on the same GGUF file: the correctness oracle."""
    transformers = pytest.importorskip("transformers")
    require_default_model()
    path = default_model_path()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32
    )
    model.generation_config.eos_token_id = None  # run to max_new_tokens, EOS not masked
    return model.eval()


def with_engine(llm: LLM, num_kv_blocks: int = 2048, **config: object) -> LLM:
    """A new LLM sharing `llm`'s loaded weights, with its own engine and KV cache. It keeps
    `llm`'s attention backend and fused ops unless told otherwise (building an engine sets
    them on the shared model)."""
    config.setdefault("attention_backend", llm.engine.config.attention_backend)
    config.setdefault("fused_ops", llm.engine.config.fused_ops)
    return LLM(llm.loaded, num_kv_blocks=num_kv_blocks, **config)  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def english_prompts() -> list[str]:
    """Real English prompts of clearly different lengths."""
    return [
        "The capital of France is",
        "Once upon a time, in a small village by the sea, there lived an old fisherman who",
        "Photosynthesis is the process by which green plants",
        "Write a short poem about the autumn wind.",
        "Q: What is the boiling point of water at sea level in Celsius?\nA:",
        (
            "The history of the printing press begins in the fifteenth century, when Johannes "
            "Gutenberg combined movable metal type, oil-based ink and a wooden press adapted from "
            "those used for wine. Within fifty years printing had spread to more than two hundred "
            "cities across Europe, and the price of books fell sharply. Scholars argue that"
        ),
        'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n',
        "Rain",
        (
            "Dear diary, today I finally climbed the hill behind our house. From the top I could "
            "see the whole valley, the river, the old mill and"
        ),
        (
            "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer "
            "the slings and arrows of outrageous fortune, or to take arms against a sea of "
            "troubles and by opposing end them. To die, to sleep, no more; and by a sleep to say "
            "we end the heart-ache and the thousand natural shocks that flesh is heir to. In this"
        ),
    ]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    """Run the real `thinfer` command (or `python -m thinfer`) and capture its output."""
    exe = shutil.which("thinfer")
    cmd = [exe] if exe else [sys.executable, "-m", "thinfer"]
    return subprocess.run(cmd + list(args), capture_output=True, text=True, timeout=300)
