"""Errors as types, mapped to HTTP once. The seed API's shape is `{"detail": ...}` for every status.

- 503 `{"detail": "Model or tokenizer not loaded"}` while the model loads or after its engine died;
- 500 `{"detail": "Generation failed: ..."}` when generation fails;
- 422 in FastAPI's validation shape (a list of `{loc, msg, type}`) for any bad request, including the
  checks that need the model (context length) or the settings (caps).
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from qwen_api.engine.base import EngineError
from qwen_api.runtime import ModelNotReady
from qwen_api.textgen import PromptTooLong

NOT_LOADED = "Model or tokenizer not loaded"


def invalid_field(field: str, message: str, value: Any) -> RequestValidationError:
    """A 422 for one body field, in the same shape as pydantic's own validation errors."""
    return RequestValidationError([{"type": "value_error", "loc": ("body", field), "msg": message, "input": value}])


async def _not_ready(request: Request, exc: Exception) -> JSONResponse:
    return JSONResponse({"detail": NOT_LOADED}, status_code=503)


async def _generation_failed(request: Request, exc: Exception) -> JSONResponse:
    return JSONResponse({"detail": f"Generation failed: {exc}"}, status_code=500)


async def _prompt_too_long(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, PromptTooLong)
    detail = [{"type": "value_error", "loc": ["body", "prompt"], "msg": str(exc), "input": exc.prompt_tokens}]
    return JSONResponse({"detail": detail}, status_code=422)


def register_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ModelNotReady, _not_ready)
    app.add_exception_handler(EngineError, _generation_failed)
    app.add_exception_handler(PromptTooLong, _prompt_too_long)
