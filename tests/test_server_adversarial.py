"""Issue 17's attacks against a real `thinfer serve` on loopback: each class's example and a
variant get their own 4xx while five greedy streams running alongside finish with their full
token count and the same text as without the attacker."""

from __future__ import annotations

import json
import socket
import threading

import httpx
import pytest
from server_utils import ServerProcess

STREAMS = 5
TOKENS = 24
PROMPTS = [
    "The history of the printing press",
    "A recipe for bread starts with",
    "In mathematics, a prime number",
    "The weather in the mountains",
    "Once upon a time, a fox",
]


@pytest.fixture(scope="module")
def server():
    proc = ServerProcess("--num-kv-blocks", "512", "--max-body-bytes", "65536")
    yield proc
    proc.stop()


def _stream(url: str, prompt: str, out: dict[str, str]) -> None:
    """Stream one greedy completion; record its text, if all TOKENS tokens came."""
    body = {"prompt": prompt, "max_tokens": TOKENS, "temperature": 0, "ignore_eos": True}
    body |= {"stream": True, "stream_options": {"include_usage": True}}
    text, usage = [], None
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120) as r:
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    usage = chunk["usage"]
                for choice in chunk["choices"]:
                    text.append(choice["text"])
    assert usage is not None and usage["completion_tokens"] == TOKENS, usage
    out[prompt] = "".join(text)


def _run_streams(url: str, attack=None) -> tuple[dict[str, str], list]:
    texts: dict[str, str] = {}
    threads = [threading.Thread(target=_stream, args=(url, p, texts)) for p in PROMPTS]
    for t in threads:
        t.start()
    results = attack() if attack else []
    for t in threads:
        t.join(timeout=120)
    return texts, results


@pytest.fixture(scope="module")
def baseline(server) -> dict[str, str]:
    texts, _ = _run_streams(server.url)
    assert len(texts) == STREAMS and all(texts.values())
    return texts


def _post(url: str, body: dict, **kwargs) -> httpx.Response:
    return httpx.post(f"{url}/v1/completions", json=body, timeout=60, **kwargs)


BASE = {"prompt": "Hello", "max_tokens": 8}
ATTACKS = {
    "compression cost": [
        BASE | {"kv_compression": {"method": "snapkv", "budget": 16, "interval": 1,
                                   "pool_kernel": 1000000001}},
        BASE | {"kv_compression": {"method": "snapkv", "budget": 16,
                                   "observation_window": 10**9}},
    ],
    "sampler failure": [
        BASE | {"repetition_penalty": 1e-300},
        BASE | {"stop_token_ids": [2**63 - 1], "min_tokens": 2},
        BASE | {"stop_token_ids": list(range(1024)) + [49151], "min_tokens": 2, "n": 1},
    ],
    "unbounded work": [
        BASE | {"stop": ["x"] * 1000},
        BASE | {"prompt": [[5, 6]] * 300},
        BASE | {"prompt": "y" * 70000},  # over --max-body-bytes
    ],
    "server paths": [
        BASE | {"kv_compression": {"method": "dynts", "budget": 64, "predictor": "/etc/passwd"}},
    ],
}  # fmt: skip


@pytest.mark.parametrize("name", list(ATTACKS))
def test_attacks_fail_alone(server, baseline, name):
    def attack() -> list[int]:
        return [_post(server.url, body).status_code for body in ATTACKS[name]]

    texts, codes = _run_streams(server.url, attack)
    assert all(400 <= code < 500 for code in codes), codes
    assert texts == baseline


def test_browser_and_connection_attacks_fail_alone(server, baseline):
    def attack() -> list[int]:
        held = []
        for _ in range(20):
            conn = socket.create_connection(("127.0.0.1", server.port))
            conn.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\n")
            held.append(conn)
        url = f"{server.url}/v1/completions"
        plain = httpx.post(url, content=b'{"prompt": "hi"}', headers={"Content-Type": "text/plain"})
        form = httpx.post(url, data={"prompt": "hi"}, timeout=60)
        for conn in held:
            conn.close()
        return [plain.status_code, form.status_code]

    texts, codes = _run_streams(server.url, attack)
    assert codes == [415, 415]
    assert texts == baseline
