"""thinfer: an inference engine for large reasoning models."""

from thinfer.llm import LLM
from thinfer.outputs import CompletionOutput, RequestMetrics, RequestOutput, RequestOutputKind
from thinfer.sampling_params import SamplingParams

__all__ = [
    "LLM",
    "SamplingParams",
    "RequestOutput",
    "CompletionOutput",
    "RequestMetrics",
    "RequestOutputKind",
]
__version__ = "0.1.0"
