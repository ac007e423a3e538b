"""DynTS labels and hidden states from thinfer's own attention equal HF's explicit attention;
chunking changes nothing; the capture's answer-rows / no-self column sums are exact."""

from __future__ import annotations

import pytest
import torch

from thinfer.attention.torch_paged import decode_column_sums, prefill_column_sums
from thinfer.dynts.features import trace_features
from thinfer.dynts.traces import Trace, think_end_ids

PROMPT = "Question: What is 12 + 7? Think first, then answer.\n"
COMPLETION = (
    "<think>\nI need to add 12 and 7. Twelve plus seven is nineteen, so 12 + 7 = 19. "
    "Check: 19 - 7 = 12, which is right.\n</think>\nThe answer is 19."
)


@pytest.fixture(scope="module")
def trace(llm) -> tuple[list[int], int]:
    """A short real trace (token ids) and its answer start."""
    tok = llm.tokenizer
    t = Trace("t", tok.encode(PROMPT), tok.encode(COMPLETION))
    answer_start = t.answer_start(think_end_ids(tok))
    assert answer_start is not None
    assert 50 <= len(t.token_ids) <= 80 and 5 <= len(t.token_ids) - answer_start <= 15
    return t.token_ids, answer_start


def test_labels_and_hidden_states_equal_hf_eager(llm, hf_model, trace):
    ids, answer_start = trace
    features = trace_features(llm.engine.model, ids, answer_start, chunk=512)
    hf_model.set_attn_implementation("eager")
    try:
        with torch.inference_mode():
            out = hf_model(torch.tensor([ids]), output_attentions=True, output_hidden_states=True)
    finally:
        hf_model.set_attn_implementation("sdpa")
    attn = torch.stack(out.attentions)[:, 0]  # [L, H, T, T]
    rows = attn[:, :, answer_start:].clone()  # [L, H, A, T]
    answer = torch.arange(answer_start, len(ids))
    rows[:, :, torch.arange(len(answer)), answer] = 0  # no attention to itself
    expected = rows.mean((0, 1, 2))
    assert features.labels.shape == (len(ids),)
    torch.testing.assert_close(features.labels, expected, atol=1e-5, rtol=1e-4)
    assert torch.all(features.labels[answer_start:] >= 0)
    # HF's last hidden state is the one after the final norm (it feeds lm_head).
    final = out.hidden_states[-1][0]
    with torch.inference_mode():
        torch.testing.assert_close(hf_model.lm_head(final), out.logits[0])
    assert features.hidden.dtype == torch.float32 and features.hidden.device.type == "cpu"
    torch.testing.assert_close(features.hidden, final, atol=2e-4, rtol=1e-4)


def test_chunking_changes_nothing(llm, trace):
    ids, answer_start = trace
    whole = trace_features(llm.engine.model, ids, answer_start, chunk=512)
    for chunk in (16, 7):  # chunk borders fall elsewhere; answer_start inside a chunk
        parts = trace_features(llm.engine.model, ids, answer_start, chunk=chunk)
        torch.testing.assert_close(parts.labels, whole.labels, atol=1e-7, rtol=1e-5)
        torch.testing.assert_close(parts.hidden, whole.hidden, atol=2e-4, rtol=1e-4)
    edge = trace_features(llm.engine.model, ids, answer_start, chunk=answer_start)
    torch.testing.assert_close(edge.labels, whole.labels, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("answer_start", [0, 10_000])
def test_answer_start_outside_the_trace_is_a_value_error(llm, trace, answer_start):
    ids, _ = trace
    with pytest.raises(ValueError, match="answer_start"):
        trace_features(llm.engine.model, ids, answer_start)


def dense_column_sums(q, keys, scale, first, exclude_self):
    """Plain per-query softmax: column sums over queries in slots >= first."""
    n, c = q.shape[0], keys.shape[0]
    group = q.shape[1] // keys.shape[1]
    sums = torch.zeros(q.shape[1], c)
    for i in range(n):
        slot = c - n + i
        if slot < first:
            continue
        for h in range(q.shape[1]):
            probs = torch.softmax(keys[: slot + 1, h // group] @ q[i, h] * scale, dim=0)
            if exclude_self:
                probs[slot] = 0
            sums[h, : slot + 1] += probs
    return sums


@pytest.mark.parametrize(
    "first,exclude_self", [(0, False), (0, True), (5, True), (9, False), (300, True)]
)
def test_prefill_column_sums_from_a_slot_without_self(first, exclude_self):
    gen = torch.Generator().manual_seed(first)
    q = torch.randn(7, 4, 8, generator=gen)
    keys = torch.randn(12, 2, 8, generator=gen)
    got = prefill_column_sums(q, keys, 8**-0.5, first, exclude_self)
    want = dense_column_sums(q, keys, 8**-0.5, first, exclude_self)
    torch.testing.assert_close(got, want)


def test_decode_column_sums_rules():
    probs = torch.softmax(torch.randn(4, 10), dim=-1)  # padded to 10, context 6
    torch.testing.assert_close(decode_column_sums(probs, 6), probs[:, :6])
    no_self = decode_column_sums(probs, 6, 5, exclude_self=True)
    torch.testing.assert_close(no_self[:, :5], probs[:, :5])
    assert torch.all(no_self[:, 5] == 0) and torch.all(probs[:, 5] > 0)
    assert torch.all(decode_column_sums(probs, 6, 6) == 0)
