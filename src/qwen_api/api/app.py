"""`create_app(settings, runtime)`: the FastAPI application, with the model loading in its lifespan.

The server starts listening at once; the runtime loads the model in the background (so `/health` can say
503 meanwhile) and shuts the engine down when the server stops. No module-level app, settings or model.
`with_answer_headers(app, answer)`: the server's own answers at the connection level (server.py) carry the same
X-Request-ID and CORS headers as the app's, from the app's own middleware and settings.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

from fastapi import APIRouter, Depends, FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import Response
from starlette.types import ASGIApp

from qwen_api import __version__
from qwen_api.admission import Admission
from qwen_api.api import anthropic, openai, playground, responses, seed, tokenize
from qwen_api.api.deps import require_api_key
from qwen_api.api.errors import register_error_handlers
from qwen_api.api.guard import Guard
from qwen_api.api.middleware import BodyLimit, CatchAll, HeadAsGet, RequestId, RequestMetrics
from qwen_api.api.schema import ServerCaps
from qwen_api.metrics import Metrics
from qwen_api.runtime import ReadyHook, Runtime
from qwen_api.settings import Settings
from qwen_api.textgen import TextGenerator

# The middleware that only add headers to an answer, whatever the answer is. The server's own answers, written at the
# connection level before any route could run (server.py), pass through them too: a page reads those as well.
HEADER_MIDDLEWARE: tuple[type, ...] = (CORSMiddleware, RequestId)


def with_answer_headers(app: object, answer: ASGIApp) -> ASGIApp:
    """`answer` (an ASGI app) inside `app`'s header middleware (HEADER_MIDDLEWARE) as `app` builds them, with the same
    settings in the same order: an answer given outside `app` then carries the headers that its own answers carry.
    Nothing is put around `answer` for an app without Starlette's middleware list."""
    for cls, args, kwargs in reversed(getattr(app, "user_middleware", [])):
        if cls in HEADER_MIDDLEWARE:
            answer = cls(answer, *args, **kwargs)
    return answer


def observe_with(metrics: Metrics) -> ReadyHook:
    """The runtime's `on_ready` hook that reports a loaded generator's sequences and engine steps to `metrics`
    (the app's `app.state.metrics`). Whoever builds the runtime connects it: `runtime.connect(on_ready=...)`."""

    def observe(generator: TextGenerator) -> None:
        generator.observer = metrics
        generator.engine.on_step = metrics.batch_size.observe

    return observe


def create_app(
    settings: Settings, runtime: Runtime, admission: Admission | None = None, routers: Sequence[APIRouter] = ()
) -> FastAPI:
    """The app over `runtime`, which it starts and closes in its lifespan. It attaches nothing to the runtime: the
    builder connects `observe_with(app.state.metrics)` as the runtime's `on_ready`, or /metrics sees no sequences."""
    admission = admission or Admission(settings.admission_capacity())
    metrics = Metrics(runtime.stats, admitted=lambda: admission.in_use, model_name=lambda: runtime.model_name)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        runtime.start()
        try:
            yield
        finally:
            await runtime.close()

    app = FastAPI(title="Qwen2-7B-Instruct API", version=__version__, lifespan=lifespan)
    app.state.settings = settings
    app.state.runtime = runtime
    app.state.metrics = metrics
    app.state.guard = Guard(admission, metrics, settings.request_timeout)
    register_error_handlers(app)
    for extra in routers:  # first, so that they may answer a path in more detail (the cluster's /health)
        app.include_router(extra)
    app.include_router(seed.router)
    app.include_router(seed.inference_router, dependencies=[Depends(require_api_key)])
    app.include_router(openai.router, dependencies=[Depends(require_api_key)])
    app.include_router(responses.router, dependencies=[Depends(require_api_key)])
    app.include_router(anthropic.router, dependencies=[Depends(require_api_key)])
    app.include_router(tokenize.router, dependencies=[Depends(require_api_key)])
    if settings.playground:
        app.include_router(playground.create_router())

    @app.get("/metrics", include_in_schema=False)
    async def prometheus_metrics() -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    # n is capped by what admission could ever take at once too: past it a request would be told "busy, retry" for good
    choices = min(settings.max_num_return_sequences, settings.admission_capacity())
    # Each add_middleware wraps what was added before: the last added is the outermost.
    app.add_middleware(ServerCaps(settings.max_new_tokens_limit, choices, settings.admission_capacity()).apply)
    app.add_middleware(CatchAll)
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    if settings.cors_allow_origins:
        # Outside BodyLimit and CatchAll, so that their 413 and 500 carry Access-Control-Allow-Origin too (without
        # it a browser shows the page a network error, not the status); inside RequestId, so that preflights get an id.
        # The server's connection-level answers get these same settings through `with_answer_headers`.
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_allow_origins,
            allow_methods=["GET", "POST"],
            # Any request header: the browser SDKs send their own (openai's x-stainless-*, Anthropic's anthropic-*),
            # and the list grows with their releases. Starlette echoes the requested names back. Safe because
            # credentials stay off: the browser sends no cookies, so a page gets only what the key it sends allows.
            allow_headers=["*"],
            allow_credentials=False,
            # Beyond the CORS-safelisted ones, a page reads only the response headers named here.
            expose_headers=["X-Request-ID", "Retry-After"],
        )
    app.add_middleware(RequestId)
    app.add_middleware(RequestMetrics, metrics=metrics)
    # HEAD on every GET route, in one place rather than route by route (a route that takes GET and HEAD would give the
    # OpenAPI schema two operations with one id); outermost, so that all the rest see what the route sees.
    app.add_middleware(HeadAsGet, router=app.router)
    return app
