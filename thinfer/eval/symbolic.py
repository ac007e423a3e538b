"""`symbolic_equal`: sympy comparisons in a separate, killable process.

sympy can run for ever (or exhaust memory) on inputs such as `10**10**10**10`, and there is no
way to interrupt it from inside the process. So the comparison runs in a worker process
(`sympy_worker.py`, started as a plain script so it does not import thinfer and torch), kept
alive between comparisons; when one takes longer than its timeout the worker is killed and
the answer is False, and the next comparison starts a fresh worker.
"""

from __future__ import annotations

import atexit
import json
import os
import queue
import subprocess
import sys
import threading

WORKER_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sympy_worker.py")
STARTUP_TIMEOUT_S = 120.0  # importing sympy on a busy machine; not charged to a comparison


class SympyWorker:
    """One worker process and the thread that reads its answers."""

    def __init__(self) -> None:
        # -P: do not put the script's folder on sys.path (its siblings are not stdlib).
        self.proc = subprocess.Popen(
            [sys.executable, "-P", "-u", WORKER_SCRIPT],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            encoding="utf-8",
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        first = self._next_line(STARTUP_TIMEOUT_S)
        if first is None or not json.loads(first).get("ready"):
            self.close()
            raise RuntimeError("the sympy worker did not start (is sympy installed?)")

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)  # end of stream: the worker died

    def _next_line(self, timeout: float) -> str | None:
        try:
            return self.lines.get(timeout=max(timeout, 0.0))
        except queue.Empty:
            return None

    def compare(self, a: str, b: str, timeout: float) -> bool | None:
        """True/False from the worker, or None when it timed out or died (then it is dead)."""
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(json.dumps({"a": a, "b": b}) + "\n")
            self.proc.stdin.flush()
        except OSError:
            self.close()
            return None
        line = self._next_line(timeout)
        if line is None:
            self.close()
            return None
        return bool(json.loads(line).get("equal"))

    @property
    def alive(self) -> bool:
        """True while the process runs."""
        return self.proc.poll() is None

    def close(self) -> None:
        """Kill the process and reap it."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout):
            try:
                if stream is not None:
                    stream.close()
            except OSError:
                pass


_lock = threading.Lock()
_worker: SympyWorker | None = None


def symbolic_equal(a: str, b: str, timeout: float) -> bool:
    """True when sympy proves `a == b` within `timeout` seconds (worker start-up excluded);
    False on a timeout, a parse error or any other failure."""
    global _worker
    if timeout <= 0:
        return False
    with _lock:
        if _worker is None or not _worker.alive:
            _worker = SympyWorker()
        result = _worker.compare(a, b, timeout)
        if result is None:
            _worker = None
            return False
        return result


def shutdown_worker() -> None:
    """Stop the worker process, if one is running (also done at exit)."""
    global _worker
    with _lock:
        if _worker is not None:
            _worker.close()
            _worker = None


atexit.register(shutdown_worker)
