"""After a token is appended: incremental detokenization and stop conditions."""

from __future__ import annotations

from thinfer.engine.sequence import Sequence
from thinfer.loading.tokenizer import Tokenizer

# How many prompt tokens to decode as context before the first output token, so that
# tokenizers that drop a leading space on a lone token still produce the right text.
_PREFIX_CONTEXT = 5


def start_detokenizer(seq: Sequence) -> None:
    """Point the incremental detokenizer at the end of the prompt."""
    seq.detok_read_offset = len(seq.prompt_token_ids)
    seq.detok_prefix_offset = max(0, seq.detok_read_offset - _PREFIX_CONTEXT)


def append_text(seq: Sequence, tokenizer: Tokenizer) -> str:
    """Decode what the newest token adds to `seq.text`; returns the added text.

    Text is held back while the tail decodes to an incomplete UTF-8 character.
    """
    skip = seq.params.skip_special_tokens
    prefix = tokenizer.decode(seq.token_ids(seq.detok_prefix_offset, seq.detok_read_offset), skip)
    full = tokenizer.decode(seq.token_ids(seq.detok_prefix_offset), skip)
    if len(full) <= len(prefix) or full.endswith("\ufffd"):
        return ""
    new_text = full[len(prefix) :]
    seq.detok_prefix_offset = seq.detok_read_offset
    seq.detok_read_offset = seq.num_tokens
    seq.text += new_text
    return new_text


def check_stop(seq: Sequence, new_text: str, eos_token_ids: set[int], max_model_len: int) -> None:
    """Set `finish_reason` ("stop" or "length") if the newest token ends the sequence.

    A matched stop string is cut from the text, together with anything after it. Forced
    (replayed) tokens never stop a sequence, except by reaching max_tokens.
    """
    params = seq.params
    token = seq.output_token_ids[-1]
    num_out = len(seq.output_token_ids)
    if num_out >= params.min_tokens and num_out > len(params.forced_tokens):
        if not params.ignore_eos and token in eos_token_ids:
            seq.finish_reason = "stop"
            return
        if token in params.stop_token_ids:
            seq.finish_reason, seq.stop_reason = "stop", token
            return
        if params.stop and new_text and _cut_at_stop_string(seq, new_text):
            return
    if num_out >= params.max_tokens or seq.num_tokens >= max_model_len:
        seq.finish_reason = "length"


def _cut_at_stop_string(seq: Sequence, new_text: str) -> bool:
    assert seq.params.stop is not None
    for stop in seq.params.stop:
        search_from = max(0, len(seq.text) - len(new_text) - len(stop) + 1)
        where = seq.text.find(stop, search_from)
        if where != -1:
            seq.text = seq.text[:where]
            seq.finish_reason, seq.stop_reason = "stop", stop
            return True
    return False
