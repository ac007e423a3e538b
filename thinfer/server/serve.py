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
    from thinfer.server.compression_policy import CompressionPolicy

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
        "--max-waiting-tokens",
        type=int,
        default=None,
        help="prompt tokens allowed to wait for admission; beyond it: HTTP 429 (default: no bound)",
    )
    parser.add_argument(
        "--request-timeout",
        type=float,
        default=None,
        help="seconds after which a running request is aborted (default: none)",
    )
    parser.add_argument(
        "--default-max-tokens",
        type=int,
        default=None,
        help="max_tokens of a chat request that sets none (default: the room left in the context)",
    )
    parser.add_argument(
        "--kv-compression",
        default=None,
        help='default KV compression as JSON, e.g. \'{"method": "window", "budget": 1024}\'',
    )
    parser.add_argument(
        "--dynts-predictor",
        action="append",
        metavar="NAME=PATH",
        help="register a DynTS head under NAME (repeatable); requests name heads, never paths",
    )
    parser.add_argument(
        "--enforce-kv-compression",
        action="store_true",
        help="apply --kv-compression to every request and refuse requests that set their own",
    )
    parser.add_argument(
        "--shutdown-grace",
        type=float,
        default=5.0,
        help="seconds running requests get to finish on SIGTERM before being aborted",
    )
    parser.add_argument(
        "--allowed-hosts",
        default=None,
        help="comma-separated Host header values served ('*': any). Default: without an API "
        "key on a loopback address, only localhost and 127.0.0.1 (no DNS rebinding); else any",
    )
    parser.add_argument(
        "--max-body-bytes",
        type=int,
        default=16 * 2**20,
        help="larger request bodies get 413 (default 16 MiB)",
    )
    parser.add_argument(
        "--stall-seconds",
        type=float,
        default=60.0,
        help="/health says 503 'stalled' while one engine step runs longer (default 60)",
    )
    parser.add_argument(
        "--limit-concurrency",
        type=int,
        default=1024,
        help="open connections beyond which new requests get 503 (default 1024)",
    )
    parser.add_argument(
        "--timeout-idle-connection",
        type=float,
        default=10.0,
        help="seconds a connection may stay open without a request in flight (no request yet, "
        "headers still arriving, or idle between requests) before it is closed (default 10)",
    )
    parser.add_argument(
        "--timeout-keep-alive",
        type=int,
        default=5,
        help="seconds an idle connection stays open (default 5)",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument(
        "--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"]
    )
    parser.set_defaults(func=cmd_serve)


def _default_model_name(source: str) -> str:
    """The API's model id: the checkpoint's file or folder name, never a server path."""
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
    for name in ("max_body_bytes", "limit_concurrency", "timeout_keep_alive"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.timeout_idle_connection <= 0:
        raise ValueError(
            f"--timeout-idle-connection must be > 0, got {args.timeout_idle_connection}"
        )
    if args.stall_seconds <= 0:
        raise ValueError(f"--stall-seconds must be > 0, got {args.stall_seconds}")


LOOPBACK = ("127.0.0.1", "localhost", "::1")


def api_key_of(args: argparse.Namespace) -> str | None:
    """--api-key, else $THINFER_API_KEY, else None; an empty key is an error (it would turn
    authentication off, e.g. `--api-key "$KEY"` with KEY unset)."""
    for key, where in ((args.api_key, "--api-key"), (os.environ.get("THINFER_API_KEY"), None)):
        if key is None:
            continue
        if not key.strip():
            source = where or "$THINFER_API_KEY"
            raise ValueError(f"{source} is empty: give a real key, or leave it unset for no auth")
        return key
    return None


def allowed_hosts_of(args: argparse.Namespace, api_key: str | None) -> list[str] | None:
    """The Host header values to serve (None: any); see --allowed-hosts."""
    if args.allowed_hosts is not None:
        hosts = [h.strip() for h in args.allowed_hosts.split(",") if h.strip()]
        if not hosts:
            raise ValueError("--allowed-hosts is empty")
        return None if "*" in hosts else hosts
    if api_key is None and args.host in LOOPBACK:
        return ["localhost", "127.0.0.1"]
    return None


def compression_policy_of(
    args: argparse.Namespace,
) -> tuple[CompressionPolicy, dict[str, Any] | None]:
    """The policy from --dynts-predictor / --enforce-kv-compression (every head loaded now,
    so a bad file stops the start) and the default compression, its predictor name resolved."""
    import torch

    from thinfer.compression.predictor import load_predictor
    from thinfer.server.compression_policy import CompressionPolicy, parse_predictor_flags

    heads = parse_predictor_flags(args.dynts_predictor)
    for name, path in heads.items():
        try:
            load_predictor(path, torch.float32, "cpu")
        except (OSError, ValueError, RuntimeError) as e:
            raise ValueError(f"--dynts-predictor {name}={path}: {e}") from e
    default = _kv_compression(args.kv_compression)
    if args.enforce_kv_compression and default is None:
        raise ValueError("--enforce-kv-compression needs --kv-compression")
    if default is not None and default.get("predictor") in heads:
        default = default | {"predictor": heads[default["predictor"]]}
    return CompressionPolicy(heads, args.enforce_kv_compression), default


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
    from thinfer.server.connections import guarded_h11
    from thinfer.server.limits import ServerLimits

    _check_args(args)
    api_key = api_key_of(args)  # before loading: a bad key fails at once
    allowed_hosts = allowed_hosts_of(args, api_key)
    policy, default_compression = compression_policy_of(args)
    limits = ServerLimits(
        args.max_waiting_requests,
        args.max_waiting_tokens,
        args.request_timeout,
        args.default_max_tokens,
    )
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s:     %(message)s")
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    llm = LLM(**llm_kwargs(args), kv_compression=default_compression)  # type: ignore[arg-type]
    name = args.served_model_name or _default_model_name(args.model or llm.source)
    app = create_app(
        llm,
        name,
        api_key,
        args.max_waiting_requests,
        allowed_hosts=allowed_hosts,
        max_body_bytes=args.max_body_bytes,
        stall_seconds=args.stall_seconds,
        compression_policy=policy,
        limits=limits,
    )
    logger.info("serving %r on http://%s:%d", name, args.host, args.port)
    limits: dict[str, Any] = {"limit_concurrency": args.limit_concurrency}
    limits["timeout_keep_alive"] = args.timeout_keep_alive
    limits["http"] = guarded_h11(args.timeout_idle_connection)
    return serve_app(app, args.host, args.port, args.shutdown_grace, args.log_level, limits)


def serve_app(
    app: FastAPI,
    host: str,
    port: int,
    shutdown_grace: float = 5.0,
    log_level: str = "info",
    limits: dict[str, Any] | None = None,
) -> int:
    """Run an app from `create_app` under uvicorn until SIGTERM / SIGINT; returns 0 after a
    graceful shutdown (1 if the server could not start). `limits`: uvicorn settings
    (`limit_concurrency`, `timeout_keep_alive`, `http`: the protocol class, see
    `thinfer.server.connections`)."""
    import uvicorn

    from thinfer.server.async_engine import ABORT_WAIT_S

    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        lifespan="on",
        timeout_graceful_shutdown=int(shutdown_grace + ABORT_WAIT_S) + 10,
        **(limits or {}),
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
