"""Generate all samples of all problems through one engine, recording each sample's peak KV.

Every request is submitted at once and the engine is stepped by hand, so continuous batching
runs the whole dataset together. A sample's peak KV length is the most KV slots it held at
any moment: within a step, its slots before the step plus the tokens fed in that step (the
prompt, or one token, before any eviction), and after the step (from `last_stats.kv_lens`).
"""

from __future__ import annotations

from collections.abc import Callable

from thinfer.engine.llm_engine import LLMEngine
from thinfer.engine.sequence import Sequence
from thinfer.eval.scoring import Sample
from thinfer.outputs import RequestOutput
from thinfer.sampling_params import SamplingParams


def _own_sequences(engine: LLMEngine, request_ids: set[str]) -> list[Sequence]:
    queued = list(engine.scheduler.waiting) + list(engine.scheduler.running)
    return [seq for seq in queued if seq.request_id in request_ids]


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
        seqs = {seq.seq_id: seq for seq in _own_sequences(engine, set(ids))}
        peaks = {seq_id: seq.kv_len for seq_id, seq in seqs.items()}
        finals: dict[str, RequestOutput] = {}
        while len(finals) < len(ids):
            before = {
                seq_id: (seq.kv_len, seq.num_computed_tokens)
                for seq_id, seq in seqs.items()
                if not seq.is_finished
            }
            outputs = engine.step()
            stats = engine.last_stats
            if not outputs and not engine.has_unfinished_requests():
                raise RuntimeError(f"{tag}: the engine stopped with requests unfinished")
            for seq_id, kv_after in (stats.kv_lens if stats is not None else {}).items():
                if seq_id in before:
                    kv_before, computed = before[seq_id]
                    fed = seqs[seq_id].num_computed_tokens - computed
                    peaks[seq_id] = max(peaks[seq_id], kv_before + fed, kv_after)
            for out in outputs:
                if out.finished and out.request_id not in finals:
                    finals[out.request_id] = out
                    if on_finish is not None:
                        on_finish(len(finals))
    except BaseException:
        for request_id in ids:
            engine.abort_request(request_id)
        raise
    by_request: dict[tuple[str, int], int] = {
        (seq.request_id, seq.index): seq_id for seq_id, seq in seqs.items()
    }
    results = []
    for request_id in ids:
        out = finals[request_id]
        results.append(
            [
                Sample(
                    text=c.text,
                    num_tokens=len(c.token_ids),
                    finish_reason=c.finish_reason,
                    peak_kv=peaks[by_request[(request_id, c.index)]],
                    token_ids=list(c.token_ids),
                )
                for c in out.outputs
            ]
        )
    return results
