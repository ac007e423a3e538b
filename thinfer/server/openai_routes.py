"""`/v1/completions`, `/v1/chat/completions` and `/v1/models`.

A handler validates the body (400 on any client error), queues one engine request per prompt
(429 when the waiting queue is full, 503 while shutting down), then either collects the
final outputs into one JSON response or streams server-sent events in OpenAI's chunk format
ending with `data: [DONE]`. A client that disconnects aborts its requests, which frees their
KV blocks.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel

from thinfer.sampling_params import SamplingParams
from thinfer.server.async_engine import AsyncEngine
from thinfer.server.compression_policy import CompressionPolicy
from thinfer.server.errors import APIError, error_body, from_value_error
from thinfer.server.protocol import ChatCompletionRequest, CompletionRequest
from thinfer.server.request_stream import (
    ChatPrompt,
    Prompt,
    QueueFullError,
    RequestStream,
    ShuttingDownError,
    StreamError,
)
from thinfer.server.responses import Kind, ResponseBuilder, TokenText

logger = logging.getLogger("thinfer.server")
Body = TypeVar("Body", bound=BaseModel)
RETRY_AFTER_S = "1"


@dataclass
class ServerContext:
    """What the routes need: the engine, the served model's name, the API key."""

    engine: AsyncEngine
    model_name: str
    max_model_len: int
    token_text: TokenText
    api_key: str | None = None
    max_body_bytes: int = 16 * 2**20
    created: int = 0
    compression_policy: CompressionPolicy = field(default_factory=CompressionPolicy)


def build_router(ctx: ServerContext) -> APIRouter:
    """The OpenAI routes, behind the API key when one is set."""

    async def check_api_key(request: Request) -> None:
        if ctx.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(
            token.strip().encode(), ctx.api_key.encode()
        ):
            raise APIError(
                401,
                "missing or invalid API key (send 'Authorization: Bearer <key>')",
                code="invalid_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )

    router = APIRouter(prefix="/v1", dependencies=[Depends(check_api_key)])

    @router.get("/models")
    async def list_models() -> dict[str, Any]:
        card = {
            "id": ctx.model_name,
            "object": "model",
            "created": ctx.created,
            "owned_by": "thinfer",
            "max_model_len": ctx.max_model_len,
        }
        return {"object": "list", "data": [card]}

    @router.post("/completions", response_model=None)
    async def completions(request: Request) -> JSONResponse | StreamingResponse:
        body = await _parse(request, CompletionRequest, ctx.max_body_bytes)
        _check_model(ctx, body.model)
        body.kv_compression = ctx.compression_policy.resolve(body.kv_compression)
        params = _params(body.to_sampling_params, "prompt")
        prompts: list[Prompt] = list(body.prompts())
        return await _serve(ctx, request, "completion", "cmpl", body, prompts, params, False)

    @router.post("/chat/completions", response_model=None)
    async def chat_completions(request: Request) -> JSONResponse | StreamingResponse:
        body = await _parse(request, ChatCompletionRequest, ctx.max_body_bytes)
        _check_model(ctx, body.model)
        body.kv_compression = ctx.compression_policy.resolve(body.kv_compression)
        params = _params(body.to_sampling_params, "messages")
        prompts: list[Prompt] = [ChatPrompt(body.message_dicts())]
        fill = body.requested_max_tokens is None
        return await _serve(ctx, request, "chat", "chatcmpl", body, prompts, params, fill)

    return router


async def _parse(request: Request, model: type[Body], max_bytes: int) -> Body:
    """The body validated from raw JSON (pydantic's errors become 400s): only
    `application/json` (415 otherwise: a web page's form or text/plain POST is not served),
    at most `max_bytes` (413, read no further)."""
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type != "application/json":
        raise APIError(415, f"Content-Type must be application/json, got {media_type!r}")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise APIError(413, f"request body of {declared} bytes exceeds the limit of {max_bytes}")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > max_bytes:
            raise APIError(413, f"request body exceeds the limit of {max_bytes} bytes")
    return model.model_validate_json(bytes(body))


def _check_model(ctx: ServerContext, model: str | None) -> None:
    if model is not None and model != ctx.model_name:
        raise APIError(
            400,
            f"model {model!r} does not exist; this server serves {ctx.model_name!r}",
            param="model",
            code="model_not_found",
        )


def _params(build: Callable[[], SamplingParams], prompt_field: str) -> SamplingParams:
    try:
        return build()
    except (ValueError, TypeError) as e:  # SamplingParams / CompressionConfig validation
        raise from_value_error(ValueError(str(e)), prompt_field) from e


async def _serve(
    ctx: ServerContext,
    request: Request,
    kind: Kind,
    prefix: str,
    body: CompletionRequest | ChatCompletionRequest,
    prompts: list[Prompt],
    params: SamplingParams,
    fill_max_tokens: bool,
) -> JSONResponse | StreamingResponse:
    response_id = f"{prefix}-{uuid.uuid4().hex}"
    request_ids = [f"{response_id}-{i}" for i in range(len(prompts))]
    prompt_field = "messages" if kind == "chat" else "prompt"
    try:
        stream = await ctx.engine.add(request_ids, prompts, params, fill_max_tokens)
    except QueueFullError as e:
        raise APIError(429, str(e), headers={"Retry-After": RETRY_AFTER_S}) from e
    except ShuttingDownError as e:
        raise APIError(503, str(e), headers={"Retry-After": RETRY_AFTER_S}) from e
    except (ValueError, TypeError, OSError) as e:  # the request can never run
        raise from_value_error(ValueError(str(e)), prompt_field) from e
    builder = ResponseBuilder(
        kind, response_id, ctx.model_name, request_ids, params.n, params.logprobs, ctx.token_text
    )
    watcher = asyncio.create_task(_abort_on_disconnect(request, ctx.engine, request_ids))
    if body.stream:
        events = _events(ctx.engine, stream, builder, body.include_usage, watcher)
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        return StreamingResponse(events, media_type="text/event-stream", headers=headers)
    complete = False
    try:
        async for item in stream:
            if isinstance(item, StreamError):
                raise APIError(500, item.message)
            builder.record(item)
        complete = True
    finally:
        watcher.cancel()
        if not complete:
            ctx.engine.abort(request_ids)
    return JSONResponse(builder.response())


async def _abort_on_disconnect(request: Request, engine: AsyncEngine, ids: list[str]) -> None:
    """Wait for the client to go away, then abort its requests (cancelled when done)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            engine.abort(ids)
            return


def _sse(payload: dict[str, Any] | str) -> str:
    if isinstance(payload, str):
        return f"data: {payload}\n\n"
    data = json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
    return f"data: {data}\n\n"


async def _events(
    engine: AsyncEngine,
    stream: RequestStream,
    builder: ResponseBuilder,
    include_usage: bool,
    watcher: asyncio.Task,
) -> AsyncIterator[str]:
    """The server-sent events of one streamed request."""
    complete = False
    try:
        for chunk in builder.first_chunks():
            yield _sse(chunk)
        async for item in stream:
            if isinstance(item, StreamError):
                yield _sse(error_body(item.message, "internal_server_error"))
                break
            for chunk in builder.chunks(item):
                yield _sse(chunk)
        else:
            if include_usage:
                yield _sse(builder.usage_chunk())
        complete = True
        yield _sse("[DONE]")
    finally:
        watcher.cancel()
        if not complete:  # the client went away, or the server is stopping
            engine.abort(stream.request_ids)
