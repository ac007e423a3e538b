"""Start the real `thinfer serve` as a subprocess on loopback, and read its /metrics."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time

import httpx

# Small, explicit sizes: fast start-up and a predictable KV pool.
BASE_ARGS = ["--max-model-len", "2048", "--threads", "2", "--log-level", "warning"]


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`python -m thinfer serve ...` on a free loopback port; waits for /health."""

    def __init__(self, *args: str, startup_timeout: float = 180.0) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False)
        cmd = [sys.executable, "-m", "thinfer", "serve", "--host", "127.0.0.1"]
        cmd += ["--port", str(self.port), *BASE_ARGS, *args]
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.output()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.25)
        self.stop()
        raise RuntimeError(f"server did not become healthy:\n{self.output()}")

    def output(self) -> str:
        """Everything the server printed so far."""
        self.log.flush()
        with open(self.log.name, encoding="utf-8", errors="replace") as f:
            return f.read()

    def terminate(self) -> None:
        """Send SIGTERM (graceful shutdown)."""
        self.proc.send_signal(signal.SIGTERM)

    def stop(self) -> None:
        """Stop the process (SIGTERM, then SIGKILL) and remove its log."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        os.unlink(self.log.name)


def metrics(url: str) -> dict[str, float]:
    """/metrics as {name: value} (labels dropped; histograms' series kept by full name)."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    values: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        match = re.match(r"^([^{\s]+)(\{[^}]*\})?\s+(\S+)$", line)
        if match and match.group(1) not in values:
            values[match.group(1)] = float(match.group(3))
    return values


def wait_until_idle(url: str, timeout: float = 60.0) -> dict[str, float]:
    """Poll /metrics until no request runs or waits and no KV block is in use."""
    deadline = time.monotonic() + timeout
    while True:
        m = metrics(url)
        idle = (
            m["vllm:num_requests_running"] == 0
            and m["vllm:num_requests_waiting"] == 0
            and m["thinfer:kv_blocks_in_use"] == 0
        )
        if idle or time.monotonic() > deadline:
            return m
        time.sleep(0.2)
