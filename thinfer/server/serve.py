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

    from thinfer.llm import LLM
    from thinfer.server.async_engine import AsyncEngine
    from thinfer.server.compression_policy import CompressionPolicy
    from thinfer.server.limits import ServerLimits

logger = logging.getLogger("thinfer.server")


def _default_model_name(source: str) -> str:
    """The API's model id: the checkpoint's file or folder name, never a server path."""
    base = os.path.basename(source.rstrip("/"))
    return base[: -len(".gguf")] if base.endswith(".gguf") else base


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
    from thinfer.server.limits import ServerLimits
    from thinfer.server.serve_args import allowed_hosts_of, api_key_of, check_serve_args

    check_serve_args(args)
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
    try:
        return _serve(args, llm, api_key, allowed_hosts, policy, limits)
    finally:
        llm.close()  # stops the other ranks of a tensor-parallel engine


def _serve(
    args: argparse.Namespace,
    llm: LLM,
    api_key: str | None,
    allowed_hosts: list[str] | None,
    policy: CompressionPolicy,
    limits: ServerLimits,
) -> int:
    """Serve `llm` as `cmd_serve` was asked to."""
    from thinfer.server.app import create_app
    from thinfer.server.connections import guarded_h11

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
    uvicorn_limits: dict[str, Any] = {"limit_concurrency": args.limit_concurrency}
    uvicorn_limits["timeout_keep_alive"] = args.timeout_keep_alive
    uvicorn_limits["http"] = guarded_h11(args.timeout_idle_connection)
    return serve_app(app, args.host, args.port, args.shutdown_grace, args.log_level, uvicorn_limits)


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
