"""The seed API, exactly as the specification shows it: GET /, GET /health, POST /generate."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncGenerator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from qwen_api import __version__
from qwen_api.admission import Draining, Overloaded
from qwen_api.api.deps import GeneratorDep, GuardDep, RuntimeDep, SettingsDep, log_outputs, log_prompt
from qwen_api.api.errors import NOT_LOADED, failure_detail, invalid_field
from qwen_api.api.guard import ClientDisconnected, CutOff, RequestTimeout
from qwen_api.api.protocol import GenerateRequest, GenerateResponse, HealthResponse, RootResponse
from qwen_api.api.sse import sse_response
from qwen_api.engine.base import EngineError
from qwen_api.runtime import Runtime
from qwen_api.structured.grammar import GrammarError, response_format_grammar
from qwen_api.textgen import TextDelta

router = APIRouter()  # open to all
inference_router = APIRouter()  # behind the API key when one is set


# HEAD too: load balancers probe with it. Its own route, out of the OpenAPI schema: a GET+HEAD route gives the
# schema two operations with one id (a warning on every /openapi.json).
@router.head("/", include_in_schema=False, response_model=None)
@router.get("/", response_model=RootResponse)
async def root(runtime: RuntimeDep) -> RootResponse:
    return RootResponse(name="Qwen2-7B-Instruct API", version=__version__, status="active", model=runtime.model_name)


@router.head("/health", include_in_schema=False, response_model=None)
@router.get(
    "/health",
    response_model=HealthResponse,
    responses={503: {"description": "The model is loading, failed to load, its engine died, or it is shutting down."}},
)
async def health(runtime: RuntimeDep) -> HealthResponse | JSONResponse:
    return unhealthy(runtime) or HealthResponse(status="healthy")


def unhealthy(runtime: Runtime, **extra: Any) -> JSONResponse | None:
    """/health's 503, when there is one (`extra` joins its body): shutting down, with Retry-After (a balancer
    should try another instance), or no model to serve (loading, or a cluster's replicas restarting, with
    Retry-After; failed, or its engine died, without)."""
    if runtime.draining:
        return JSONResponse({"detail": str(Draining()), **extra}, status_code=503, headers={"Retry-After": "5"})
    if not runtime.healthy():
        headers = {"Retry-After": wait} if (wait := runtime.retry_after) else None
        return JSONResponse({"detail": NOT_LOADED, **extra}, status_code=503, headers=headers)
    return None


@inference_router.post(
    "/generate",
    response_model=GenerateResponse,
    responses={
        200: {"content": {"text/event-stream": {}}, "description": "JSON, or server-sent events with stream"},
        500: {"description": "Generation failed"},
        503: {"description": NOT_LOADED},
    },
)
async def generate(
    body: GenerateRequest, request: Request, settings: SettingsDep, generator: GeneratorDep, guard: GuardDep
) -> GenerateResponse | StreamingResponse:
    prompt_ids = await generator.off_loop(lambda: generator.chat_prompt_ids([{"role": "user", "content": body.prompt}]))
    params, n = body.to_sampling_params(), body.num_return_sequences
    generator.check_fits(prompt_ids, params.max_new_tokens)
    try:
        if (grammar := response_format_grammar(body.response_format)) is not None:
            params = dataclasses.replace(params, constraint=await generator.grammars.compile(grammar))
    except GrammarError as exc:
        raise invalid_field("response_format", str(exc), body.response_format) from None
    log_prompt(settings, body.prompt)
    ticket = guard.admit(n, len(prompt_ids))
    if body.stream:
        deltas = generator.stream(prompt_ids, params, n=n)
        events = guard.stream(ticket, _generate_events(deltas, len(prompt_ids)))
        return sse_response(events, lambda e: {"detail": failure_detail(e)}, on_close=ticket.release)
    try:
        completions = await guard.complete(request, ticket, generator.complete(prompt_ids, params, n=n))
    except (EngineError, ValueError, RequestTimeout, ClientDisconnected, CutOff, Overloaded):
        raise
    except Exception as exc:  # anything else the engine throws is still "generation failed", never a bare 500
        raise EngineError(f"{type(exc).__name__}: {exc}") from exc
    log_outputs(settings, [c.text for c in completions])
    return GenerateResponse(generated_texts=[c.text for c in completions], parameters=body.parameters())


async def _generate_events(
    deltas: AsyncGenerator[TextDelta, None], prompt_tokens: int
) -> AsyncGenerator[dict[str, Any], None]:
    """/generate's stream: {"index", "text"} per delta, then per sequence {"index", "finish_reason", counts}."""
    try:
        async for delta in deltas:
            if delta.text:
                yield {"index": delta.index, "text": delta.text}
            if delta.finish_reason is not None:
                yield {
                    "index": delta.index,
                    "finish_reason": delta.finish_reason,
                    "prompt_tokens": prompt_tokens,
                    "completion_tokens": delta.completion_tokens,
                }
    finally:
        await deltas.aclose()
