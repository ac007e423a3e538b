"""OpenAI-compatible HTTP server over `LLM` (`thinfer serve`; see docs/serving.md).

`create_app(llm, model_name, api_key, max_waiting)` builds the FastAPI app; FastAPI is
imported on first use, so `thinfer --help` stays fast.
"""

from __future__ import annotations

from typing import Any

__all__ = ["AsyncEngine", "create_app"]


def __getattr__(name: str) -> Any:
    if name == "create_app":
        from thinfer.server.app import create_app

        return create_app
    if name == "AsyncEngine":
        from thinfer.server.async_engine import AsyncEngine

        return AsyncEngine
    raise AttributeError(name)
