"""Generate all samples of all problems through one engine, recording each sample's peak KV.

Every request is submitted at once and the engine is stepped by hand, so continuous batching
runs the whole dataset together. A sample's peak KV length is the engine's own figure,
`RequestMetrics.sample_peak_kv_slots`: the most KV slots it held at any time, counting the
tokens being written in a step, before any eviction.
"""

from __future__ import annotations

from collections.abc import Callable

from thinfer.engine.llm_engine import LLMEngine
from thinfer.eval.scoring import Sample
from thinfer.outputs import RequestOutput
from thinfer.sampling_params import SamplingParams


def generate_with_peaks(
    engine: LLMEngine,
    prompts: list[list[int]],
    params: list[SamplingParams],
    tag: str,
    on_finish: Callable[[int], None] | None = None,
) -> list[list[Sample]]:
    """Run every prompt with its params; `result[i][j]` is sample j of prompt i.

    `on_finish(count)` is called each time a request finishes, with the number finished.
    Requests are aborted if anything (a KeyboardInterrupt included) interrupts the run.
    """
    ids: list[str] = []
    try:
        for i, (prompt, p) in enumerate(zip(prompts, params, strict=True)):
            ids.append(engine.add_request(prompt, p, f"{tag}-{i}"))
        finals: dict[str, RequestOutput] = {}
        while len(finals) < len(ids):
            outputs = engine.step()
            if not outputs and not engine.has_unfinished_requests():
                raise RuntimeError(f"{tag}: the engine stopped with requests unfinished")
            for out in outputs:
                if out.finished and out.request_id not in finals:
                    finals[out.request_id] = out
                    if on_finish is not None:
                        on_finish(len(finals))
    except BaseException:
        for request_id in ids:
            engine.abort_request(request_id)
        raise
    results = []
    for request_id in ids:
        out = finals[request_id]
        peaks = out.metrics.sample_peak_kv_slots
        results.append(
            [
                Sample(
                    text=c.text,
                    num_tokens=len(c.token_ids),
                    finish_reason=c.finish_reason,
                    peak_kv=peaks[c.index],
                    token_ids=list(c.token_ids),
                )
                for c in out.outputs
            ]
        )
    return results
