"""Errors as types, mapped to HTTP once, in the shape of the API family the request came to.

Seed API (`/`, `/health`, `/generate`): `{"detail": ...}` as the specification shows it:
- 503 `{"detail": "Model or tokenizer not loaded"}` while the model loads or after its engine died;
- 500 `{"detail": "Generation failed: ..."}` when generation fails;
- 422 in FastAPI's validation shape (a list of `{loc, msg, type}`) for any bad request, including the
  checks that need the model (context length) or the settings (caps).

OpenAI API (`/v1/...`): `{"error": {"message", "type", "param", "code"}}`, 400 for any bad request.

Both families: 401 without the API key (when one is set), 429 + Retry-After when overloaded, 503 +
Retry-After while draining, 504 past the request deadline, 413 for a body over the limit.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from types import NoneType, UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from qwen_api.admission import Draining, Overloaded
from qwen_api.api.guard import ClientDisconnected, CutOff, RequestTimeout
from qwen_api.api.openai_protocol import Unsupported, error_body
from qwen_api.api.schema import MAX_NESTING
from qwen_api.engine.base import ConstraintFailed, EngineError
from qwen_api.runtime import ModelNotReady
from qwen_api.structured.grammar import CompilerBusy
from qwen_api.textgen import EmptyPrompt, PromptTooLong

NOT_LOADED = "Model or tokenizer not loaded"


class ModelNotFound(Exception):
    """An OpenAI request named a model this server does not serve."""

    def __init__(self, requested: str, served: str) -> None:
        super().__init__(f"The model {requested!r} does not exist on this server; it serves {served!r}")


def invalid_field(field: str, message: str, value: Any) -> RequestValidationError:
    """A 422 for one body field, in the same shape as pydantic's own validation errors."""
    return RequestValidationError([{"type": "value_error", "loc": ("body", field), "msg": message, "input": value}])


def failure_detail(exc: Exception) -> str:
    """The seed API's text for a failed generation."""
    return f"Generation failed: {exc}"


def openai_error_payload(exc: Exception) -> dict[str, Any]:
    """OpenAI's error object for a failure after a stream began: the same type and code as before it began."""
    type_, code = stream_error_kind(exc)
    return error_body(str(exc), type_, code=code)


def stream_error_kind(exc: Exception) -> tuple[str, str | None]:
    """(type, code) of a failure after an OpenAI-style stream began, as the same failure has them before it began:
    a timeout, a schema the grammar engine gave up on (the request's fault: `_constraint_failed`), or the server's."""
    if isinstance(exc, RequestTimeout):
        return "timeout", "request_timeout"
    if isinstance(exc, CutOff):
        return "service_unavailable", "shutting_down"
    if isinstance(exc, ConstraintFailed):
        return "invalid_request_error", "schema_not_followed"
    return "server_error", None


def _json_safe(value: Any, depth: int = 0) -> Any:
    """Make a bad input that is echoed back encodable: strict JSON has no NaN (non-finite floats become their text),
    UTF-8 has no lone surrogates (they become their escapes, in keys too), and what nests past `MAX_NESTING` levels
    (which the schemas refuse) is cut there, so that neither this nor the JSON encoder recurses without bound."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, str):
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    if isinstance(value, list | dict) and depth >= MAX_NESTING:
        return f"(nested deeper than {MAX_NESTING} levels)"
    if isinstance(value, list):
        return [_json_safe(v, depth + 1) for v in value]
    if isinstance(value, dict):
        return {_json_safe(k): _json_safe(v, depth + 1) for k, v in value.items()}
    return value


Family = Literal["seed", "openai", "anthropic"]


def error_family(path: str) -> Family:
    """Whose error shape a path answers in: Anthropic's for /v1/messages, OpenAI's for the rest of /v1 (and
    vLLM's /tokenize, /detokenize), else the seed API's."""
    if path == "/v1/messages" or path.startswith("/v1/messages/"):
        return "anthropic"
    if path in ("/tokenize", "/detokenize", "/tokenizer_info"):  # vLLM's routes, beside /v1 but answering as it does
        return "openai"
    return "openai" if path == "/v1" or path.startswith("/v1/") else "seed"


def anthropic_error_body(message: str, type_: str) -> dict[str, Any]:
    """Anthropic's error shape."""
    return {"type": "error", "error": {"type": type_, "message": message}}


# Anthropic names its error types by status.
_ANTHROPIC_TYPES = {
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
    504: "timeout_error",
}


def _anthropic_type(status: int) -> str:
    return _ANTHROPIC_TYPES.get(status, "invalid_request_error" if status < 500 else "api_error")


def _is_openai(request: Request) -> bool:
    return error_family(request.url.path) != "seed"


def _reply(
    request: Request,
    status: int,
    message: str,
    type_: str,
    code: str | None = None,
    param: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    """One error, in the shape of the route family it came to."""
    body = error_payload(request.url.path, status, message, type_, code, param)
    return JSONResponse(body, status_code=status, headers=headers)


def error_payload(
    path: str, status: int, message: str, type_: str, code: str | None = None, param: str | None = None
) -> dict[str, Any]:
    """The body of one error in the shape of `path`'s family: the one place each shape is built."""
    family = error_family(path)
    if family == "anthropic":
        return anthropic_error_body(message, _anthropic_type(status))
    if family == "openai":
        return error_body(message, type_, param, code)
    return {"detail": message}


def _count_rejection(request: Request, reason: str) -> None:
    metrics = getattr(request.app.state, "metrics", None)
    if metrics is not None:
        metrics.rejections.labels(reason).inc()


async def _not_ready(request: Request, exc: Exception) -> JSONResponse:
    _count_rejection(request, "not_ready")
    wait = request.app.state.runtime.retry_after
    return _reply(request, 503, NOT_LOADED, "service_unavailable", headers={"Retry-After": wait} if wait else None)


async def _generation_failed(request: Request, exc: Exception) -> JSONResponse:
    message = str(exc) if _is_openai(request) else failure_detail(exc)
    return _reply(request, 500, message, "server_error")


async def _constraint_failed(request: Request, exc: Exception) -> JSONResponse:
    """A schema that compiled but that the grammar engine gave up on while generating: the request's fault, a 400 in
    the OpenAI-style dialects (where schemas come from); the seed API keeps its one failure answer."""
    if not _is_openai(request):
        return await _generation_failed(request, exc)
    return _reply(request, 400, str(exc), "invalid_request_error", "schema_not_followed")


async def _overloaded(request: Request, exc: Exception) -> JSONResponse:
    _count_rejection(request, "overloaded")
    return _reply(request, 429, str(exc), "server_overloaded", "overloaded", headers={"Retry-After": "1"})


async def _draining(request: Request, exc: Exception) -> JSONResponse:
    _count_rejection(request, "draining")
    return _reply(request, 503, str(exc), "service_unavailable", "shutting_down", headers={"Retry-After": "5"})


async def _cut_off(request: Request, exc: Exception) -> JSONResponse:
    """A request in flight when the drain's time ran out: as a refusal while draining, it may be retried elsewhere."""
    return _reply(request, 503, str(exc), "service_unavailable", "shutting_down", headers={"Retry-After": "5"})


async def _timed_out(request: Request, exc: Exception) -> JSONResponse:
    message = str(exc) if _is_openai(request) else failure_detail(exc)
    return _reply(request, 504, message, "timeout", "request_timeout")


async def _client_gone(request: Request, exc: Exception) -> JSONResponse:
    return _reply(request, 499, "client closed the request", "client_closed_request")


async def _unauthorized(request: Request, exc: Exception) -> JSONResponse:
    _count_rejection(request, "unauthorized")
    headers = {"WWW-Authenticate": "Bearer"}
    return _reply(request, 401, str(exc), "authentication_error", "invalid_api_key", headers=headers)


def _prompt_param(request: Request) -> str:
    """The field that holds the prompt on the route the request came to."""
    path = request.url.path
    if path == "/v1/responses":
        return "input"
    return "prompt" if path.endswith("/completions") and "/chat/" not in path else "messages"


async def _prompt_too_long(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, PromptTooLong)
    if _is_openai(request):
        return _reply(
            request, 400, str(exc), "invalid_request_error", "context_length_exceeded", _prompt_param(request)
        )
    detail = [{"type": "value_error", "loc": ["body", "prompt"], "msg": str(exc), "input": exc.prompt_tokens}]
    return JSONResponse({"detail": detail}, status_code=422)


async def _empty_prompt(request: Request, exc: Exception) -> JSONResponse:
    if _is_openai(request):
        return _reply(request, 400, str(exc), "invalid_request_error", "empty_prompt", _prompt_param(request))
    detail = [{"type": "value_error", "loc": ["body", "prompt"], "msg": str(exc), "input": ""}]
    return JSONResponse({"detail": detail}, status_code=422)


def _body_model(request: Request) -> Any:
    """The type the matched route reads its JSON body as (a request model), or None."""
    field = getattr(request.scope.get("route"), "body_field", None)
    return getattr(getattr(field, "field_info", None), "annotation", None)


def _arms(type_: Any) -> list[Any]:
    """The types a value of `type_` may be: `Annotated` unwrapped, a union's arms without None."""
    while get_origin(type_) is Annotated:
        type_ = get_args(type_)[0]
    if get_origin(type_) in (Union, UnionType):
        return [arm for t in get_args(type_) if t is not NoneType for arm in _arms(t)]
    return [type_]


def _step(type_: Any, part: Any) -> Any:
    """The type at `part` inside a value of `type_` (a model's field, a list's item, a dict's value), or None."""
    origin = get_origin(type_)
    if isinstance(type_, type) and issubclass(type_, BaseModel):
        field = type_.model_fields.get(part) if isinstance(part, str) else None
        return None if field is None else field.annotation
    if origin in (list, tuple, set, frozenset) and isinstance(part, int):
        return get_args(type_)[0] if get_args(type_) else None
    if origin is dict and isinstance(part, str):
        return get_args(type_)[1] if len(get_args(type_)) == 2 else None
    return None


def _field_path(loc: Sequence[Any], model: Any) -> list[str]:
    """A validation error's location as the request's field path: without FastAPI's leading `body`, and without
    the tags pydantic puts in it for the arm of a union that failed (`prompt.str`, `input.constrained-str`,
    `messages.0.content.list[TextPart].0.text`), which are no fields. The body's model says where a union is: the
    part after one is its arm's tag; the arm is then the one whose fields (or items) the rest of the path walks."""
    parts = list(loc[1:] if loc and loc[0] == "body" else loc)
    path: list[str] = []
    type_ = model
    i = 0
    while i < len(parts):
        arms = _arms(type_) if type_ is not None else []
        if len(arms) > 1:  # a union: parts[i] is the tag of the arm that failed
            i += 1
            if i == len(parts):
                break
            type_ = next((arm for arm in arms if _step(arm, parts[i]) is not None), None)
            continue
        type_ = _step(arms[0], parts[i]) if arms else None
        path.append(str(parts[i]))
        i += 1
    return path


def _error_text(error: Any, model: Any = None) -> str:
    where = ".".join(_field_path(error.get("loc", ()), model))
    what = str(error.get("msg", "invalid")).removeprefix("Value error, ")
    if error.get("type") == "json_invalid":
        at = f" at position {where}" if where else ""
        return f"the body is not valid JSON ({error.get('ctx', {}).get('error', 'parse error')}{at})"
    return f"{where}: {what}" if where else what


def _not_sent_as_json(request: Request, errors: Sequence[Any]) -> list[Any]:
    """FastAPI reads a body as JSON only when its Content-Type says so: `curl -d '{...}'` (form-encoded), or no
    Content-Type at all, gave "Input should be a valid dictionary", which does not say what to change."""
    kind = request.headers.get("content-type")
    whole_body = len(errors) == 1 and tuple(errors[0].get("loc", ())) == ("body",)
    if not whole_body or errors[0].get("type") != "model_attributes_type" or (kind and "json" in kind.lower()):
        return list(errors)  # (a JSON body that is no object, `[1]`, is told so as it is)
    got = f"it was sent as {kind.split(';')[0]!r}" if kind else "it was sent with none"
    msg = f"the body must be JSON sent with 'Content-Type: application/json'; {got}"
    return [{**errors[0], "msg": msg}]


async def _invalid_request(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = _not_sent_as_json(request, exc.errors())
    if not _is_openai(request):  # FastAPI's own shape, but NaN/inf inputs must not break the JSON encoder
        # cut before the encoder too: it recurses into the inputs as well
        detail = jsonable_encoder(_json_safe(errors))
        return JSONResponse({"detail": _json_safe(detail)}, status_code=422)
    model = _body_model(request)
    first = errors[0] if errors else {}
    loc = _field_path(first.get("loc", ()), model)
    param = None if first.get("type") == "json_invalid" else ".".join(loc) or None
    # one text per distinct message: the arms of a union can fail alike at the same field
    message = "; ".join(dict.fromkeys(_error_text(e, model) for e in errors))
    return _reply(request, 400, message or "invalid request", "invalid_request_error", param=param)


async def _http_error(request: Request, exc: Exception) -> Response:
    """Starlette's own errors (404 no such route, 405 wrong method, 400 a body that cannot be read) in the shape
    of the family the path belongs to; the seed API keeps FastAPI's `{"detail": ...}`."""
    assert isinstance(exc, StarletteHTTPException)
    if not _is_openai(request):  # the seed API answers as FastAPI does, a body it cannot read included (400)
        return await http_exception_handler(request, exc)
    if exc.status_code == 400 and isinstance(exc.__cause__, RecursionError | ValueError):
        # FastAPI's "There was an error parsing the body", for a body json.loads failed on other than with a
        # JSONDecodeError: nested too deeply, an integer past CPython's 4,300 digits, bytes that are not UTF-8.
        # Say which, as for any other invalid JSON.
        return await _invalid_request(request, _unreadable_json(exc.__cause__))
    type_ = "invalid_request_error" if exc.status_code < 500 else "server_error"
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
    return _reply(request, exc.status_code, str(exc.detail), type_, code, headers=getattr(exc, "headers", None))


def _unreadable_json(cause: BaseException) -> RequestValidationError:
    why = "nested too deeply" if isinstance(cause, RecursionError) else str(cause).split(";")[0]
    return RequestValidationError(
        [{"type": "json_invalid", "loc": ("body",), "msg": "JSON decode error", "input": {}, "ctx": {"error": why}}]
    )


async def _unsupported(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, Unsupported)
    return _reply(request, 400, str(exc), "invalid_request_error", "unsupported_parameter", exc.param)


async def _model_not_found(request: Request, exc: Exception) -> JSONResponse:
    return _reply(request, 404, str(exc), "invalid_request_error", "model_not_found", "model")


class Unauthorized(Exception):
    def __init__(self) -> None:
        super().__init__("Invalid or missing API key: send 'Authorization: Bearer <key>'")


def register_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(Overloaded, _overloaded)
    app.add_exception_handler(CompilerBusy, _overloaded)  # grammars queued past the compiler's bound: busy too
    app.add_exception_handler(Draining, _draining)
    app.add_exception_handler(RequestTimeout, _timed_out)
    app.add_exception_handler(CutOff, _cut_off)
    app.add_exception_handler(ClientDisconnected, _client_gone)
    app.add_exception_handler(Unauthorized, _unauthorized)
    app.add_exception_handler(ModelNotReady, _not_ready)
    app.add_exception_handler(EngineError, _generation_failed)
    app.add_exception_handler(ConstraintFailed, _constraint_failed)
    app.add_exception_handler(PromptTooLong, _prompt_too_long)
    app.add_exception_handler(EmptyPrompt, _empty_prompt)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _invalid_request)
    app.add_exception_handler(Unsupported, _unsupported)
    app.add_exception_handler(ModelNotFound, _model_not_found)
