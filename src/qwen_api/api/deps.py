"""Dependency aliases shared by the routers (settings, runtime, guard, a ready text generator) and the API-key check.

Every dependency is `async def`, though none awaits: FastAPI runs a plain `def` dependency in its thread pool, and a
chat request has six of them, so each request made six round trips to a worker thread before reaching its route.
On two cores shared with the engine's compute threads each trip waits for the scheduler, and the time to first
token paid for it."""

from __future__ import annotations

import hmac
import logging
from typing import Annotated

from fastapi import Depends, Request

from qwen_api.api.errors import Unauthorized
from qwen_api.api.guard import Guard
from qwen_api.runtime import Runtime
from qwen_api.settings import Settings
from qwen_api.textgen import TextGenerator

log = logging.getLogger("qwen_api.requests")


async def _settings(request: Request) -> Settings:
    return request.app.state.settings


async def _runtime(request: Request) -> Runtime:
    return request.app.state.runtime


async def _generator(request: Request) -> TextGenerator:
    runtime: Runtime = request.app.state.runtime
    return runtime.generator()


async def _guard(request: Request) -> Guard:
    return request.app.state.guard


async def require_api_key(request: Request) -> None:
    """When an API key is configured, inference routes need it as `Authorization: Bearer <key>` or, as Anthropic's
    clients send it, `x-api-key: <key>` (constant-time checks)."""
    settings: Settings = request.app.state.settings
    key = settings.api_key
    if key is None:
        return
    expected = key.get_secret_value().encode()
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    bearer_ok = scheme.lower() == "bearer" and hmac.compare_digest(given.encode(), expected)
    header_ok = hmac.compare_digest(request.headers.get("x-api-key", "").encode(), expected)
    if not (bearer_ok or header_ok):
        raise Unauthorized()


def log_prompt(settings: Settings, prompt: object) -> None:
    """Prompts reach the log only when the operator asked for it (--log-prompts)."""
    if settings.log_prompts:
        log.info("prompt: %r", prompt)


def log_outputs(settings: Settings, texts: list[str]) -> None:
    if settings.log_prompts:
        log.info("generated: %r", texts)


SettingsDep = Annotated[Settings, Depends(_settings)]
RuntimeDep = Annotated[Runtime, Depends(_runtime)]
GeneratorDep = Annotated[TextGenerator, Depends(_generator)]
GuardDep = Annotated[Guard, Depends(_guard)]
