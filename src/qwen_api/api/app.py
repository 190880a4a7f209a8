"""`create_app(settings, runtime)`: the FastAPI application, with the model loading in its lifespan.

The server starts listening at once; the runtime loads the model in the background (so `/health` can say
503 meanwhile) and shuts the engine down when the server stops. No module-level app, settings or model.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from qwen_api import __version__
from qwen_api.api import openai, seed
from qwen_api.api.errors import register_error_handlers
from qwen_api.runtime import Runtime
from qwen_api.settings import Settings


def create_app(settings: Settings, runtime: Runtime) -> FastAPI:
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
    register_error_handlers(app)
    app.include_router(seed.router)
    app.include_router(openai.router)
    return app
