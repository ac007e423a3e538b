"""The OpenAI-compatible server, run as a real `thinfer serve` subprocess on loopback.

One server (API key set) serves every test of this module; tests use the official `openai`
client and raw httpx requests.
"""

from __future__ import annotations

import json
import os
import threading
import time

import httpx
import openai
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from server_utils import ServerProcess, metrics, wait_until_idle

from thinfer.loading.checkpoint import default_model_path
from thinfer.loading.tokenizer import Tokenizer

KEY = "sk-thinfer-test"
MODEL = "smollm2-test"
AUTH = {"Authorization": f"Bearer {KEY}"}
PROMPT = "The capital of France is"
MESSAGES = [{"role": "user", "content": "Name three colours."}]


@pytest.fixture(scope="module")
def server():
    proc = ServerProcess(
        "--api-key", KEY, "--served-model-name", MODEL, "--num-kv-blocks", "512",
        "--max-body-bytes", "200000",
    )  # fmt: skip
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def tokenizer():
    path = default_model_path()
    return Tokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))


def test_models_lists_the_served_model(client):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]


def test_completion_text_and_usage(client, tokenizer):
    out = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0)
    choice = out.choices[0]
    assert choice.text and choice.finish_reason in ("length", "stop")
    assert out.usage.prompt_tokens == len(tokenizer.encode(PROMPT))
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens
    if choice.finish_reason == "length":
        assert out.usage.completion_tokens == 8
    streamed = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0, stream=True
    )
    assert "".join(chunk.choices[0].text for chunk in streamed) == choice.text


def test_chat_stream_equals_greedy_chat(client, tokenizer):
    full = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=12, temperature=0
    )
    text = full.choices[0].message.content
    assert text and full.choices[0].message.role == "assistant"
    prompt = tokenizer.apply_chat_template(MESSAGES)
    assert full.usage.prompt_tokens == len(tokenizer.encode(prompt))
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=MESSAGES,
            max_tokens=12,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == text
    finals = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finals[-1] == full.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage == full.usage


def test_n_batched_prompts_stop_and_seed(client):
    out = client.completions.create(
        model=MODEL, prompt=[PROMPT, "Once upon a time"], n=2, max_tokens=5, temperature=0
    )
    assert sorted(c.index for c in out.choices) == [0, 1, 2, 3]
    by_index = {c.index: c.text for c in out.choices}
    assert by_index[0] == by_index[1] and by_index[2] == by_index[3]
    greedy = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=10, temperature=0)
    text = greedy.choices[0].text
    stop = text.strip().split()[1] if len(text.strip().split()) > 1 else text.strip()[:2]
    stopped = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=10, temperature=0, stop=[stop]
    )
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].text == text[: text.index(stop)]
    seeded = [
        client.completions.create(
            model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0.9, top_p=0.9, seed=7
        )
        .choices[0]
        .text
        for _ in range(2)
    ]
    assert seeded[0] == seeded[1]


def test_logprobs(client):
    out = client.completions.create(
        model=MODEL,
        prompt=PROMPT,
        max_tokens=4,
        temperature=0,
        logprobs=2,
        extra_body={"ignore_eos": True},
    )
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4
    assert "".join(lp.tokens) == out.choices[0].text
    assert all(len(top) >= 1 and v <= 0 for top, v in zip(lp.top_logprobs, lp.token_logprobs))
    chat = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=3, temperature=0, logprobs=True, top_logprobs=3
    )
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens
    assert all(len(item.top_logprobs) == 3 for item in content)
    assert all(item.logprob == item.top_logprobs[0].logprob for item in content)  # greedy


def test_kv_compression_and_vllm_extras(client):
    out = client.completions.create(
        model=MODEL,
        prompt=PROMPT,
        max_tokens=30,
        temperature=0,
        extra_body={
            "kv_compression": {"method": "window", "budget": 16},
            "ignore_eos": True,
            "min_tokens": 2,
            "repetition_penalty": 1.1,
            "top_k": 20,
        },
    )
    assert out.usage.completion_tokens == 30 and out.choices[0].finish_reason == "length"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"temperature": -1}, "temperature"),
        ({"max_tokens": "x"}, "max_tokens"),
        ({"model": "no-such-model"}, "model"),
        ({"max_tokens": 2047}, "max_tokens"),  # prompt + max_tokens beyond the 2048 context
        ({"kv_compression": {"method": "bogus", "budget": 8}}, "kv_compression"),
        (
            {"kv_compression": {"method": "dynts", "budget": 64, "predictor": "/no/such/head"}},
            "kv_compression",
        ),
        ({"top_p": 0}, "top_p"),
        ({"n": 0}, "n"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": [1, "x"]}, "prompt"),
        ({"frobnicate": 1}, "frobnicate"),
    ],
)
def test_bad_requests_are_400_naming_the_field(server, body, param):
    payload = {"model": MODEL, "prompt": PROMPT, "max_tokens": 4, **body}
    r = httpx.post(f"{server.url}/v1/completions", json=payload, headers=AUTH, timeout=60)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param or param in error["message"], error


def test_malformed_json_and_openai_client_errors(server, client):
    headers = AUTH | {"Content-Type": "application/json"}
    r = httpx.post(
        f"{server.url}/v1/chat/completions", content=b"{not json", headers=headers, timeout=30
    )
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=MESSAGES, temperature=-1)
    assert info.value.body["param"] == "temperature"


def test_api_key_is_required(server):
    url = f"{server.url}/v1/models"
    assert httpx.get(url, timeout=30).status_code == 401
    wrong = httpx.get(url, headers={"Authorization": "Bearer nope"}, timeout=30)
    assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(url, headers=AUTH, timeout=30).status_code == 200
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="bad", max_retries=0).models.list()
    assert httpx.get(f"{server.url}/health", timeout=30).status_code == 200


def test_metrics_exposition(server, client):
    client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=3, temperature=0)
    m = wait_until_idle(server.url)
    for name in (
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:kv_cache_usage_perc",
        "vllm:num_preemptions_total",
        "thinfer:kv_blocks_total",
    ):
        assert name in m, name
    assert m["thinfer:kv_blocks_total"] == 512 and m["thinfer:kv_blocks_in_use"] == 0
    assert m["vllm:prompt_tokens_total"] > 0 and m["vllm:generation_tokens_total"] >= 3
    for hist in ("time_to_first_token", "time_per_output_token", "e2e_request_latency"):
        assert m[f"vllm:{hist}_seconds_count"] >= 1
    # Every finished request held at least its prompt + 2 written tokens at its peak.
    peaks = m["thinfer:request_peak_kv_slots_count"]
    assert peaks >= 1 and m["thinfer:request_peak_kv_slots_sum"] >= 3 * peaks


# ----- fuzzing the request bodies ---------------------------------------------------------
_junk = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=6,
)


def _mostly(valid: st.SearchStrategy, invalid: st.SearchStrategy) -> st.SearchStrategy:
    """`valid` nine times in ten, else `invalid` (out-of-range values)."""
    return st.integers(0, 9).flatmap(lambda i: invalid if i == 0 else valid)


_compression = st.fixed_dictionaries(
    {
        "method": st.sampled_from(["full", "window", "streamingllm", "sepllm", "h2o", "snapkv"])
        | st.sampled_from(["rkv", "dynts", "x"]),
        "budget": _mostly(st.integers(8, 40), st.integers(-1, 7)),
    },
    optional={
        "window": st.integers(-1, 10),
        "interval": st.integers(-1, 10),
        "observation_window": st.integers(-1, 10) | st.just(10**9),
        "pool_kernel": st.integers(-1, 9) | st.just(1_000_000_001),
        "predictor": st.sampled_from(["/etc/passwd", "head", ""]),
        "sink_tokens": st.integers(-1, 6),
        "trigger": st.sampled_from(["native", "uniform", "?"]),
        "ratio": st.floats(-0.5, 1.5),
    },
)
# Plausible values, sometimes out of range; `max_tokens` stays small so that valid requests
# finish fast.
_fields = {
    "model": _mostly(st.just(MODEL), st.text(max_size=5)),
    "max_tokens": _mostly(st.integers(1, 4), st.integers(-1, 0)),
    "n": _mostly(st.integers(1, 3), st.just(0)),
    "temperature": _mostly(st.floats(0, 3), st.sampled_from([-1, 1e-300, 1e300])),
    "top_p": _mostly(st.floats(0.01, 1), st.sampled_from([0, 1.5])),
    "top_k": _mostly(st.integers(-1, 100_000), st.integers(-5, -2)),
    "min_p": _mostly(st.floats(0, 1), st.sampled_from([-0.1, 1.1])),
    "repetition_penalty": _mostly(st.floats(0.01, 1e6), st.sampled_from([-1, 0, 1e-300])),
    "seed": _mostly(st.integers(-(2**63), 2**63 - 1), st.integers(2**63, 2**65)),
    "stop": _mostly(
        st.text(min_size=1, max_size=3) | st.lists(st.text(min_size=1, max_size=3), max_size=3),
        st.just(""),
    ),
    "stream": st.booleans(),
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
    "min_tokens": _mostly(st.integers(0, 1), st.integers(-1, 5)),
    "ignore_eos": st.booleans(),
    "stop_token_ids": _mostly(
        st.lists(st.integers(0, 60_000), max_size=3),
        st.sampled_from([[-1], [2**63 - 1], [2**64], list(range(49_152))]),
    ),
    "kv_compression": _compression,
    "presence_penalty": _mostly(st.just(0), st.just(0.5)),
    "user": st.text(max_size=5),
}
_completion_fields = {
    **_fields,
    "prompt": _mostly(
        st.text(min_size=1, max_size=40)
        | st.lists(st.integers(0, 49_151), min_size=1, max_size=12)
        | st.lists(st.text(min_size=1, max_size=12), min_size=1, max_size=2),
        st.just("") | st.lists(st.integers(-5, 60_000), max_size=3),
    ),
    "logprobs": _mostly(st.integers(0, 5), st.integers(21, 25)),
    "echo": _mostly(st.just(False), st.just(True)),
}
_message = st.fixed_dictionaries(
    {
        "role": _mostly(st.sampled_from(["user", "system"]), st.sampled_from(["assistant", "bot"])),
        "content": st.text(max_size=30)
        | st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": st.text(max_size=10)})),
    }
)
_chat_fields = {
    **_fields,
    "messages": _mostly(st.lists(_message, min_size=1, max_size=3), st.just([])),
    "logprobs": st.booleans(),
    "top_logprobs": _mostly(st.integers(0, 5), st.integers(21, 25)),
}


@st.composite
def _request(draw: st.DrawFn) -> tuple[str, bytes]:
    """A body that is mostly plausible, with 0-2 fields replaced by junk; or not JSON."""
    path = draw(st.sampled_from(["completions", "chat/completions"]))
    if draw(st.integers(0, 19)) == 0:
        return path, draw(st.binary(max_size=30))
    fields = _chat_fields if path == "chat/completions" else _completion_fields
    required = ["messages" if path == "chat/completions" else "prompt", "max_tokens"]
    optional = draw(st.lists(st.sampled_from(sorted(fields)), max_size=6, unique=True))
    body = {name: draw(fields[name]) for name in dict.fromkeys(required + optional)}
    for _ in range(draw(_mostly(st.just(0), st.integers(1, 2)))):
        body[draw(st.sampled_from(sorted(fields)) | st.text(max_size=6))] = draw(_junk)
    max_tokens = body.get("max_tokens")
    if max_tokens is None and path == "chat/completions":
        body["max_tokens"] = 4  # the chat default runs to the end of the context: too slow
    elif isinstance(max_tokens, int) and max_tokens > 4:
        body["max_tokens"] = 4
    return path, json.dumps(body).encode()


class Bystander:
    """Greedy streams run one after another while the fuzz runs; each must give the text it
    gives alone, and no gap between its tokens may exceed a bound."""

    BODY = {"model": MODEL, "prompt": PROMPT, "max_tokens": 64, "temperature": 0}

    def __init__(self, url: str) -> None:
        self.url = url
        self.reference, _ = self._once()
        self.stop = threading.Event()
        self.runs, self.max_gap, self.errors = 0, 0.0, []
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _once(self) -> tuple[str, float]:
        body = self.BODY | {"stream": True, "ignore_eos": True}
        pieces, gap, last = [], 0.0, time.monotonic()
        with httpx.stream(
            "POST", f"{self.url}/v1/completions", json=body, headers=AUTH, timeout=120
        ) as r:
            for line in r.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    now = time.monotonic()
                    gap, last = max(gap, now - last), now
                    pieces.extend(c["text"] for c in json.loads(line[6:])["choices"])
        return "".join(pieces), gap

    def _loop(self) -> None:
        while not self.stop.is_set():
            try:
                text, gap = self._once()
            except Exception as exc:  # reported by finish()
                self.errors.append(repr(exc))
                return
            if text != self.reference:
                self.errors.append(f"text changed: {text!r} != {self.reference!r}")
            self.runs, self.max_gap = self.runs + 1, max(self.max_gap, gap)

    def finish(self) -> tuple[int, float]:
        self.stop.set()
        self.thread.join(timeout=120)
        assert not self.errors, self.errors
        return self.runs, self.max_gap


@pytest.fixture(scope="module")
def bystander(server) -> Bystander:
    return Bystander(server.url)


@settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(case=_request())
def test_fuzzed_bodies_never_get_a_5xx(server, bystander, case):
    path, body = case
    with httpx.Client(timeout=120) as http:
        headers = AUTH | {"Content-Type": "application/json"}
        r = http.post(f"{server.url}/v1/{path}", content=body, headers=headers)
    event(f"HTTP {r.status_code}")
    assert r.status_code < 500, r.text
    if r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream"):
        assert r.text.rstrip().endswith("data: [DONE]") and "internal_server_error" not in r.text
    elif r.status_code != 200:
        assert r.status_code in (400, 413, 429) and r.json()["error"]["message"]


def test_server_healthy_and_idle_after_fuzzing(server, bystander):
    runs, max_gap = bystander.finish()
    assert runs >= 1  # every greedy stream during the fuzz matched the one run alone
    assert max_gap < 10.0, f"a step took {max_gap:.1f} s"  # per-step time stayed bounded
    assert httpx.get(f"{server.url}/health", timeout=30).status_code == 200
    assert wait_until_idle(server.url)["thinfer:kv_blocks_in_use"] == 0
    assert metrics(server.url)["thinfer:kv_blocks_total"] == 512
