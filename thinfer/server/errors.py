"""OpenAI-style error bodies, and the handlers that turn every client error into a 4xx.

Every error leaves the server as `{"error": {"message", "type", "param", "code"}}`. Client
errors (bad JSON, wrong types, out-of-range values, requests that can never fit) are 400s
naming the field in `param`; only a fault of the server itself is a 500.
"""

from __future__ import annotations

import logging
import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger("thinfer.server")

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    429: "rate_limit_error",
    500: "internal_server_error",
    503: "service_unavailable_error",
}
# Strings pydantic puts in an error location for the member of a union it tried.
_UNION_TAG = re.compile(r"^(str|int|float|bool|none|list\[.*\]|dict\[.*\]|.*\[.*\].*)$")
_UNION_HINTS = {
    "prompt": "a string, a list of token ids, a list of strings or a list of token-id lists",
    "stop": "a string or a list of strings",
    "content": 'a string or a list of {"type": "text", "text": ...} parts',
}


class APIError(Exception):
    """An error with an HTTP status and an OpenAI-style body."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
        err_type: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers
        self.err_type = err_type or _TYPES.get(status, "invalid_request_error")

    def body(self) -> dict[str, Any]:
        """The JSON body: `{"error": {...}}`."""
        return error_body(self.message, self.err_type, self.param, self.code)

    def response(self) -> JSONResponse:
        """This error as a JSON response."""
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def error_body(
    message: str,
    err_type: str = "invalid_request_error",
    param: str | None = None,
    code: str | None = None,
) -> dict[str, Any]:
    """OpenAI's error object."""
    return {"error": {"message": message, "type": err_type, "param": param, "code": code}}


def bad_request(message: str, param: str | None = None) -> APIError:
    """A 400 `invalid_request_error`."""
    return APIError(400, message, param)


def from_value_error(exc: ValueError, prompt_field: str = "prompt") -> APIError:
    """A 400 for a ValueError raised by SamplingParams, CompressionConfig or the engine.

    `param` is recovered from the message ("SamplingParams.top_p must be ...",
    "kv_compression.budget must be ...", "prompt (9 tokens) + max_tokens (5000) exceeds ...").
    """
    message = str(exc)
    match = re.search(r"SamplingParams\.(\w+)", message)
    if match:
        param: str | None = match.group(1)
        message = message.replace("SamplingParams.", "")
    elif message.startswith("kv_compression"):
        param = "kv_compression"
    elif "max_tokens" in message:
        param = "max_tokens"
    elif "prompt" in message or "chat template" in message:
        param = prompt_field
    else:
        param = None
    return bad_request(message, param)


def from_validation_errors(errors: list[Any]) -> APIError:
    """A 400 from pydantic's error list: the first error, its field as `param`."""
    if not errors:
        return bad_request("invalid request body")
    err = errors[0]
    kind = err.get("type", "")
    if kind == "json_invalid":
        detail = err.get("ctx", {}).get("error", "")
        return bad_request(f"the request body is not valid JSON ({detail})".replace(" ()", ""))
    loc = [part for part in err.get("loc", ()) if part != "body"]
    tag = next((i for i, p in enumerate(loc) if isinstance(p, str) and _UNION_TAG.match(p)), None)
    if tag is not None and tag > 0:  # one of several accepted types: say which ones
        path = _render_loc(loc[:tag])
        hint = _UNION_HINTS.get(str(loc[tag - 1]), "one of the accepted types")
        return bad_request(f"{path} must be {hint}", path)
    path = _render_loc(loc)
    if not path:
        if kind in ("model_type", "model_attributes_type", "dict_type"):
            return bad_request("the request body must be a JSON object")
        return bad_request(f"invalid request body: {err.get('msg', '')}")
    if kind == "extra_forbidden":
        return bad_request(f"unknown field {path!r}", path)
    if kind == "missing":
        return bad_request(f"{path}: field required", path)
    message = str(err.get("msg", "invalid value"))
    message = message.removeprefix("Value error, ")
    return bad_request(f"{path}: {message}", path)


def _render_loc(loc: list[Any]) -> str:
    """`["messages", 0, "content", "str"]` -> "messages[0].content" (union tags dropped)."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif isinstance(part, str) and not _UNION_TAG.match(part) and part.isidentifier():
            out += f".{part}" if out else part
    return out


def install_error_handlers(app: FastAPI) -> None:
    """Register handlers so that every error response is an OpenAI error body."""

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _request_validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return from_validation_errors(list(exc.errors())).response()

    @app.exception_handler(ValidationError)
    async def _validation(_: Request, exc: ValidationError) -> JSONResponse:
        return from_validation_errors(exc.errors()).response()

    @app.exception_handler(ValueError)
    async def _value_error(_: Request, exc: ValueError) -> JSONResponse:
        return from_value_error(exc).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        status = exc.status_code
        return APIError(status, str(exc.detail), headers=getattr(exc, "headers", None)).response()

    @app.exception_handler(Exception)
    async def _internal(_: Request, exc: Exception) -> JSONResponse:
        logger.exception("internal error while serving a request", exc_info=exc)
        return APIError(500, f"internal server error: {type(exc).__name__}").response()
