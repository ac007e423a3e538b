"""What a hostile client or web page meets: JSON-only POSTs, a body-size limit, no schema or
Host-built redirects, a refused empty API key, a Host allow-list by default on a keyless
loopback server, and a stuck engine step visible in /health and /metrics."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest
from fastapi.testclient import TestClient
from server_utils import ServerProcess

from thinfer import LLM
from thinfer.compression.predictor import ImportancePredictor, save_predictor
from thinfer.loading.checkpoint import default_model_path
from thinfer.server.app import create_app
from thinfer.server.compression_policy import CompressionPolicy

BODY = {"prompt": "hello", "max_tokens": 2}


@pytest.fixture(scope="module")
def keyless():
    """A keyless server on loopback: only localhost hosts by default, small body limit, the
    model given by its full path."""
    model = default_model_path()
    proc = ServerProcess("--model", model, "--max-body-bytes", "4096", "--num-kv-blocks", "64")
    yield proc
    proc.stop()


def test_posts_must_be_json_and_bounded(keyless):
    url = f"{keyless.url}/v1/completions"
    plain = httpx.post(url, content=b'{"prompt": "hi"}', headers={"Content-Type": "text/plain"})
    assert plain.status_code == 415 and "application/json" in plain.json()["error"]["message"]
    form = httpx.post(url, data={"prompt": "hi"})  # what an HTML form sends
    assert form.status_code == 415
    big = httpx.post(url, json=BODY | {"prompt": "x" * 5000})
    assert big.status_code == 413 and "4096" in big.json()["error"]["message"]
    chunked = httpx.post(  # no Content-Length: the limit holds while reading
        url,
        content=iter([b'{"prompt": "', b"x" * 5000, b'"}']),
        headers={"Content-Type": "application/json"},
    )
    assert chunked.status_code == 413
    assert httpx.post(url, json=BODY).status_code == 200


def test_no_schema_no_host_built_redirects_and_foreign_hosts_refused(keyless):
    assert httpx.get(f"{keyless.url}/openapi.json").status_code == 404
    (card,) = httpx.get(f"{keyless.url}/v1/models").json()["data"]
    assert card["id"] == "SmolLM2-135M-Instruct.Q4_1"  # the file's name, not the server path
    slash = httpx.get(f"{keyless.url}/v1/models/", headers={"Host": "evil.example"})
    assert slash.status_code in (400, 404) and "location" not in slash.headers
    rebound = httpx.post(
        f"{keyless.url}/v1/completions", json=BODY, headers={"Host": "evil.example:8000"}
    )
    assert rebound.status_code == 400  # DNS rebinding: a page's origin is not localhost
    local = httpx.post(
        f"{keyless.url}/v1/completions", json=BODY, headers={"Host": f"localhost:{keyless.port}"}
    )
    assert local.status_code == 200


@pytest.mark.parametrize(
    ("argv", "env", "message"),
    [
        (["--api-key", ""], {}, "--api-key is empty"),
        ([], {"THINFER_API_KEY": " "}, "$THINFER_API_KEY is empty"),
        (["--allowed-hosts", ","], {}, "--allowed-hosts is empty"),
        (["--max-body-bytes", "0"], {}, "--max-body-bytes must be >= 1"),
        (["--dynts-predictor", "head"], {}, "expected NAME=PATH"),
        (["--dynts-predictor", "head=/nonexistent.safetensors"], {}, "--dynts-predictor head="),
        (["--enforce-kv-compression"], {}, "--enforce-kv-compression needs --kv-compression"),
    ],
)
def test_unsafe_settings_are_refused_before_loading(argv, env, message):
    done = subprocess.run(
        [sys.executable, "-m", "thinfer", "serve", *argv],
        capture_output=True,
        text=True,
        timeout=60,
        env={**__import__("os").environ, **env},
    )
    assert done.returncode == 2 and message in done.stderr


def test_a_stuck_step_shows_in_health_and_metrics():
    llm = LLM(model="tiny", load_format="dummy", device="cpu", num_kv_blocks=32)
    app = create_app(llm, "tiny", stall_seconds=0.3)
    real_step = llm.engine.step
    release = threading.Event()

    def slow_step():
        release.wait(timeout=30)
        return real_step()

    llm.engine.step = slow_step
    with TestClient(app) as client:
        assert client.get("/health").json() == {"status": "ok"}
        ids = {"prompt": [5, 6, 7], "max_tokens": 2}  # the dummy model has no tokenizer
        worker = threading.Thread(target=lambda: client.post("/v1/completions", json=ids))
        worker.start()
        time.sleep(1.0)
        health = client.get("/health")
        assert health.status_code == 503 and health.json()["status"] == "stalled"
        assert health.json()["step_seconds"] > 0.3
        metrics = client.get("/metrics").text
        line = next(x for x in metrics.splitlines() if x.startswith("thinfer:engine_step_running"))
        assert float(line.split()[-1]) > 0.3
        release.set()
        worker.join(timeout=30)
        assert client.get("/health").status_code == 200
    with pytest.raises(ValueError, match="api_key is empty"):
        create_app(llm, "tiny", api_key="")


def test_clients_name_registered_heads_never_paths(tmp_path):
    llm = LLM(model="tiny", load_format="dummy", device="cpu", num_kv_blocks=64)
    head = str(tmp_path / "head.safetensors")
    save_predictor(ImportancePredictor(llm.model_config.hidden_size), head)
    policy = CompressionPolicy({"reasoning": head})
    ids = {"prompt": [5, 6, 7], "max_tokens": 40, "ignore_eos": True}
    dynts = {"method": "dynts", "budget": 24, "window": 8}
    with TestClient(create_app(llm, "tiny", compression_policy=policy)) as client:
        named = client.post(
            "/v1/completions", json=ids | {"kv_compression": dynts | {"predictor": "reasoning"}}
        )
        assert named.status_code == 200, named.text
        for probe in (head, "/etc/passwd", "../head.safetensors", 3):
            r = client.post(
                "/v1/completions", json=ids | {"kv_compression": dynts | {"predictor": probe}}
            )
            assert r.status_code == 400 and "it offers: reasoning" in r.text
            assert (
                "exist" not in r.text and "directory" not in r.text and str(tmp_path) not in r.text
            )
    enforced = CompressionPolicy(enforce=True)
    with TestClient(create_app(llm, "tiny", compression_policy=enforced)) as client:
        r = client.post("/v1/completions", json=ids | {"kv_compression": {"method": "full"}})
        assert r.status_code == 400 and "enforces its own" in r.text
        assert client.post("/v1/completions", json=ids).status_code == 200


def test_connections_without_a_request_are_closed_but_streams_are_not():
    server = ServerProcess(
        "--timeout-idle-connection", "1", "--limit-concurrency", "16", "--num-kv-blocks", "64"
    )
    try:
        partial = []
        for _ in range(5):  # headers never finished (slowloris)
            conn = socket.create_connection(("127.0.0.1", server.port))
            conn.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\n")
            partial.append(conn)
        silent = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(5)]
        body = {"prompt": "Once upon a time", "max_tokens": 48, "stream": True}
        body |= {"temperature": 0, "ignore_eos": True}
        with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=60) as r:
            text = "".join(r.iter_text())  # runs past the 1 s idle timeout
        assert text.rstrip().endswith("data: [DONE]")
        for conn in partial + silent:  # closed by the server: recv sees end of stream
            conn.settimeout(5)
            assert conn.recv(100) == b""
        assert httpx.get(f"{server.url}/health").status_code == 200
    finally:
        server.stop()
