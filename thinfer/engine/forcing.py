"""Forced tokens (trace replay): a request may dictate its first output tokens.

`SamplingParams.forced_tokens` are fed one per decoding step through the ordinary decode
path, with the request's compression policy active, exactly as if the model had sampled
them; what the model thought of each one (its log-probability under the raw logits) is
recorded. Afterwards the sequence samples as usual. Stop conditions are not checked while a
forced token is being appended, so a trace containing EOS or a stop string replays whole.
"""

from __future__ import annotations

import torch

from thinfer.engine.sampler import SampledToken, SamplingRow, sample
from thinfer.engine.sequence import Sequence


def is_forcing(seq: Sequence) -> bool:
    """True while `seq`'s next output token is dictated by its params."""
    return len(seq.output_token_ids) < len(seq.params.forced_tokens)


def sampling_row(seq: Sequence, eos_token_ids: set[int]) -> SamplingRow:
    """The sampler's input for `seq` this step: EOS and stop ids are banned until
    `min_tokens` tokens were generated."""
    params = seq.params
    seen = seq.all_token_ids if params.repetition_penalty != 1.0 else []
    banned: list[int] = []
    if len(seq.output_token_ids) < params.min_tokens:
        banned = sorted(eos_token_ids | set(params.stop_token_ids))
    return SamplingRow(params, seq.generator, seen, banned)


def choose_tokens_row_by_row(
    logits: torch.Tensor,
    seqs: list[Sequence],
    rows: list[SamplingRow],
    always_row_by_row: bool = False,
) -> tuple[list[tuple[Sequence, SampledToken]], list[tuple[Sequence, str]]]:
    """`choose_tokens` for the batch, or, if that raises, row by row, so a row that cannot be
    sampled fails alone: ((sequence, token) of the rows that could, (sequence, why) of those
    that could not). A row retried after a failed batch may have advanced its seeded
    generator already, so only greedy rows are guaranteed the tokens the batch would give.
    `always_row_by_row` (the deterministic mode) skips the batch: each row is then sampled
    by calls of one shape, [1, vocab], whatever the batch."""
    if not always_row_by_row:
        try:
            return list(zip(seqs, choose_tokens(logits, seqs, rows), strict=True)), []
        except Exception:  # noqa: BLE001 - whatever broke, find the row that broke it
            pass
    chosen: list[tuple[Sequence, SampledToken]] = []
    failed: list[tuple[Sequence, str]] = []
    for i, seq in enumerate(seqs):
        try:
            chosen.append((seq, choose_tokens(logits[i : i + 1], [seq], [rows[i]])[0]))
        except Exception as exc:  # noqa: BLE001 - reported to that request alone
            failed.append((seq, f"sampling failed: {type(exc).__name__}: {exc}"))
    return chosen, failed


def choose_tokens(
    logits: torch.Tensor, seqs: list[Sequence], rows: list[SamplingRow]
) -> list[SampledToken]:
    """One token per sampling row: the forced one where a sequence is replaying (with its
    log-probability), a sampled one elsewhere (only those rows reach the sampler)."""
    forced = [i for i, seq in enumerate(seqs) if is_forcing(seq)]
    if not forced:
        return sample(logits, rows)
    forced_set = set(forced)
    free = [i for i in range(len(seqs)) if i not in forced_set]
    chosen: list[SampledToken | None] = [None] * len(seqs)
    if free:
        picked = sample(logits[free], [rows[i] for i in free])
        for i, token in zip(free, picked, strict=True):
            chosen[i] = token
    index = torch.tensor(forced, device=logits.device)
    log_probs = torch.log_softmax(logits.index_select(0, index).float(), dim=-1)
    for row, i in enumerate(forced):
        seq = seqs[i]
        token = seq.params.forced_tokens[len(seq.output_token_ids)]
        logprob = float(log_probs[row, token])
        seq.forced_logprobs.append(logprob)
        top = {token: logprob} if seq.params.logprobs is not None else None
        chosen[i] = SampledToken(token, logprob, top)
    return [token for token in chosen if token is not None]
