"""`create_app`: the FastAPI app of an OpenAI-compatible server over one `LLM`.

Routes: `/v1/completions`, `/v1/chat/completions`, `/v1/models` (behind the API key when one
is set), `/health` and `/metrics` (Prometheus text). The app's lifespan starts the engine
thread, and at shutdown aborts what is still running and stops the thread.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response
from starlette.middleware.trustedhost import TrustedHostMiddleware

from thinfer.server.async_engine import AsyncEngine
from thinfer.server.compression_policy import CompressionPolicy
from thinfer.server.errors import install_error_handlers
from thinfer.server.limits import ServerLimits
from thinfer.server.metrics import CONTENT_TYPE, ServerMetrics
from thinfer.server.openai_routes import ServerContext, build_router
from thinfer.server.request_stream import EngineStats

if TYPE_CHECKING:
    from thinfer.llm import LLM

DEFAULT_MAX_WAITING = 1024
DEFAULT_MAX_BODY_BYTES = 16 * 2**20
DEFAULT_STALL_SECONDS = 60.0


def create_app(
    llm: LLM,
    model_name: str,
    api_key: str | None = None,
    max_waiting: int | None = DEFAULT_MAX_WAITING,
    *,
    allowed_hosts: list[str] | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    stall_seconds: float = DEFAULT_STALL_SECONDS,
    compression_policy: CompressionPolicy | None = None,
    limits: ServerLimits | None = None,
) -> FastAPI:
    """An app serving `llm` as `model_name`.

    `api_key`: when set, `/v1/*` needs `Authorization: Bearer <api_key>` (else 401); an
    empty key is refused (it would mean no auth). `max_waiting`: bound on requests waiting
    for admission (beyond it: 429); None: unbounded. `allowed_hosts`: the `Host` header
    values served (None: any), so a web page cannot drive a keyless local server through DNS
    rebinding. `max_body_bytes`: larger request bodies get 413. `stall_seconds`: `/health`
    says 503 "stalled" while one engine step has run longer. `compression_policy`: the
    DynTS heads clients may name and whether the server's compression is enforced (default:
    none registered, not enforced). `limits` (`ServerLimits`, whose `max_waiting` then
    replaces the argument) also bound the waiting prompt tokens, each request's lifetime and
    a chat's default max. The engine
    (`app.state.engine`, an `AsyncEngine`) runs while the app's lifespan runs.
    """
    if max_waiting is not None and max_waiting < 1:
        raise ValueError(f"max_waiting must be >= 1 or None, got {max_waiting}")
    if api_key is not None and not api_key.strip():
        raise ValueError("api_key is empty: pass a real key, or None for no authentication")
    if max_body_bytes < 1 or stall_seconds <= 0:
        raise ValueError("max_body_bytes must be >= 1 and stall_seconds > 0")

    def live_stats() -> EngineStats:  # read at scrape time, also during a long step
        return dataclasses.replace(engine.stats, step_running_seconds=engine.step_running_seconds)

    metrics = ServerMetrics(model_name, live_stats)
    limits = limits or ServerLimits(max_waiting=max_waiting)
    engine = AsyncEngine(llm.engine, on_output=metrics.on_output, limits=limits)
    tokenizer = llm.tokenizer

    @functools.lru_cache(maxsize=65536)
    def token_text(token_id: int) -> str:
        if tokenizer is None:
            return f"<{token_id}>"
        return tokenizer.decode([token_id], skip_special_tokens=False)

    ctx = ServerContext(
        engine=engine,
        model_name=model_name,
        max_model_len=llm.max_model_len,
        token_text=token_text,
        api_key=api_key,
        created=int(time.time()),
        max_body_bytes=max_body_bytes,
        compression_policy=compression_policy or CompressionPolicy(),
    )

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        engine.start()
        try:
            yield
        finally:
            await engine.shutdown(grace=0.0)
            await asyncio.to_thread(engine.stop)

    # No /openapi.json: the schema would be open without the key. No trailing-slash redirects:
    # Starlette builds them from the client's Host header.
    app = FastAPI(
        title="thinfer", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None
    )
    app.router.redirect_slashes = False
    if allowed_hosts is not None:
        app.add_middleware(TrustedHostMiddleware, allowed_hosts=allowed_hosts)
    app.state.engine = engine
    app.state.metrics = metrics
    install_error_handlers(app)
    app.include_router(build_router(ctx))

    @app.get("/health")
    async def health() -> JSONResponse:
        if engine.failure is not None:
            return JSONResponse({"status": "failed", "error": engine.failure}, status_code=503)
        step = engine.step_running_seconds
        if step > stall_seconds:
            return JSONResponse({"status": "stalled", "step_seconds": step}, status_code=503)
        if engine.is_alive and engine.accepting:
            return JSONResponse({"status": "ok"})
        return JSONResponse({"status": "unavailable"}, status_code=503)

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    return app
