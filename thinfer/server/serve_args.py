"""The options of `thinfer serve` and their checks (all made before the model loads)."""

from __future__ import annotations

import argparse
import os
from typing import Any


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
    from thinfer.server.serve import cmd_serve

    parser.set_defaults(func=cmd_serve)


def check_serve_args(args: argparse.Namespace) -> None:
    """ValueError naming the first bad option."""
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
