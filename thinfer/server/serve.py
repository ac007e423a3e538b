"""`thinfer serve`: run the OpenAI-compatible server under uvicorn.

On SIGTERM (or Ctrl-C) the server stops accepting connections, lets running requests finish
for `--shutdown-grace` seconds, aborts the rest (their streams end with a final chunk whose
finish_reason is "abort"), waits for the responses to go out, stops the engine thread and
exits with status 0.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
from types import FrameType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import uvicorn
    from fastapi import FastAPI

    from thinfer.server.async_engine import AsyncEngine

logger = logging.getLogger("thinfer.server")


def add_serve_parser(sub: Any) -> None:
    """Register `thinfer serve` on the CLI's sub-parsers."""
    from thinfer.cli_args import add_model_args

    parser = sub.add_parser("serve", help="OpenAI-compatible HTTP server (see docs/serving.md)")
    add_model_args(parser)
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument(
        "--api-key",
        default=None,
        help="require 'Authorization: Bearer KEY' on /v1/* (default: $THINFER_API_KEY, if set)",
    )
    parser.add_argument(
        "--served-model-name", default=None, help="model id in the API (default: --model)"
    )
    parser.add_argument(
        "--max-waiting-requests",
        type=int,
        default=1024,
        help="requests allowed to wait for admission; beyond it: HTTP 429 (default 1024)",
    )
    parser.add_argument(
        "--kv-compression",
        default=None,
        help='default KV compression as JSON, e.g. \'{"method": "window", "budget": 1024}\'',
    )
    parser.add_argument(
        "--shutdown-grace",
        type=float,
        default=5.0,
        help="seconds running requests get to finish on SIGTERM before being aborted",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument(
        "--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"]
    )
    parser.set_defaults(func=cmd_serve)


def _default_model_name(model: str | None, source: str) -> str:
    if model is not None:
        return model
    base = os.path.basename(source.rstrip("/"))
    return base[: -len(".gguf")] if base.endswith(".gguf") else base


def _check_args(args: argparse.Namespace) -> None:
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be in [0, 65535], got {args.port}")
    if args.max_waiting_requests < 1:
        raise ValueError(f"--max-waiting-requests must be >= 1, got {args.max_waiting_requests}")
    if args.shutdown_grace < 0:
        raise ValueError(f"--shutdown-grace must be >= 0, got {args.shutdown_grace}")
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")


def _kv_compression(text: str | None) -> dict[str, Any] | None:
    if text is None:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"--kv-compression: invalid JSON ({e.msg})") from e
    if not isinstance(value, dict):
        raise ValueError("--kv-compression must be a JSON object")
    return value


def cmd_serve(args: argparse.Namespace) -> int:
    """Load the model, then serve until SIGTERM / SIGINT; returns the exit status."""
    from thinfer.cli_args import llm_kwargs
    from thinfer.llm import LLM
    from thinfer.server.app import create_app

    _check_args(args)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s:     %(message)s")
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    llm = LLM(**llm_kwargs(args), kv_compression=_kv_compression(args.kv_compression))  # type: ignore[arg-type]
    name = args.served_model_name or _default_model_name(args.model, llm.source)
    api_key = args.api_key if args.api_key is not None else os.environ.get("THINFER_API_KEY")
    app = create_app(llm, name, api_key or None, args.max_waiting_requests)
    logger.info("serving %r on http://%s:%d", name, args.host, args.port)
    return serve_app(app, args.host, args.port, args.shutdown_grace, args.log_level)


def serve_app(
    app: FastAPI, host: str, port: int, shutdown_grace: float = 5.0, log_level: str = "info"
) -> int:
    """Run an app from `create_app` under uvicorn until SIGTERM / SIGINT; returns 0 after a
    graceful shutdown (1 if the server could not start)."""
    import uvicorn

    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        lifespan="on",
        timeout_graceful_shutdown=int(shutdown_grace) + 10,
    )
    server = _graceful_server(config, app.state.engine, shutdown_grace)

    def on_signal(sig: int, frame: FrameType | None) -> None:
        server.should_exit = True

    # uvicorn re-raises the signal that stopped it once it is done; this handler makes a
    # graceful shutdown end with status 0 instead of death by that signal.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    server.run()
    return 0 if server.started else 1


def _graceful_server(config: uvicorn.Config, engine: AsyncEngine, grace: float) -> uvicorn.Server:
    """A uvicorn server that drains the engine before closing connections."""
    import uvicorn

    class GracefulServer(uvicorn.Server):
        async def shutdown(self, sockets: list[Any] | None = None) -> None:
            for listener in getattr(self, "servers", []):
                listener.close()  # stop accepting new connections first
            await engine.shutdown(grace)
            await super().shutdown(sockets)

    return GracefulServer(config)
