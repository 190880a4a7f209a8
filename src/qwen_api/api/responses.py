"""OpenAI's Responses API: `POST /v1/responses`, stateless, plain or streamed as Responses events.

The route works as the chat completions route does: check the model and the caps, put the conversation
through the chat template, check the context, take an admission ticket, then either await the one answer
(cancelled if the client leaves) or stream it. A stream is the Responses event sequence, each event named by
its `type` and numbered by `sequence_number`; it ends with `response.completed`, or `response.incomplete`
when `max_output_tokens` cut the answer. A failure after the stream began is one `error` event.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
import uuid
from collections.abc import AsyncGenerator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from qwen_api.api.deps import GeneratorDep, GuardDep, RuntimeDep, SettingsDep, log_outputs, log_prompt
from qwen_api.api.errors import ModelNotFound, stream_error_kind
from qwen_api.api.openai_protocol import Unsupported
from qwen_api.api.responses_protocol import (
    ResponsesRequest,
    Status,
    message_item,
    response_object,
    text_part,
    usage,
)
from qwen_api.api.sse import sse_response
from qwen_api.engine.base import EngineError, SamplingParams
from qwen_api.structured.grammar import GrammarError
from qwen_api.textgen import Completion, TextDelta

router = APIRouter(prefix="/v1")


@router.post("/responses", response_model=None)
async def create_response(
    body: ResponsesRequest,
    request: Request,
    settings: SettingsDep,
    runtime: RuntimeDep,
    generator: GeneratorDep,
    guard: GuardDep,
) -> dict[str, Any] | StreamingResponse:
    if body.model != runtime.model_name:
        raise ModelNotFound(body.model, runtime.model_name)
    body.check_supported()
    cap = settings.max_new_tokens_limit
    messages = body.chat_messages()
    log_prompt(settings, messages)
    prompt_ids = await generator.off_loop(lambda: generator.chat_prompt_ids(messages))
    # Left out: as much as fits, up to the cap (a prompt that leaves no room fails the context check below).
    max_new = body.max_output_tokens or max(1, min(cap, generator.engine.max_context_tokens - len(prompt_ids)))
    params = body.sampling_params(max_new, generator.sampling_defaults)
    generator.check_fits(prompt_ids, max_new)
    if (grammar := body.grammar()) is not None:  # structured outputs, enforced while decoding
        try:
            params = dataclasses.replace(params, constraint=await generator.grammars.compile(grammar, "text.format"))
        except GrammarError as exc:
            raise Unsupported("text.format", str(exc)) from None
    ticket = guard.admit(1, len(prompt_ids))
    shape = _Shape(body, params, len(prompt_ids))
    if body.stream:
        events = guard.stream(ticket, shape.events(generator.stream(prompt_ids, params)))
        return sse_response(events, shape.error_event, on_close=ticket.release, typed=True)
    [result] = await guard.complete(request, ticket, generator.complete(prompt_ids, params))
    log_outputs(settings, [result.text])
    return shape.final(result)


class _Shape:
    """One response's ids and echoed settings, as a finished Response object or as its stream of events."""

    def __init__(self, body: ResponsesRequest, params: SamplingParams, input_tokens: int) -> None:
        self.body, self.params, self.input_tokens = body, params, input_tokens
        self.response_id, self.item_id = f"resp_{uuid.uuid4().hex}", f"msg_{uuid.uuid4().hex}"
        self.created_at = int(time.time())
        self._sequence = itertools.count()

    def _response(self, status: Status, output: list[dict[str, Any]], usage_: dict[str, Any] | None) -> dict[str, Any]:
        return response_object(self.body, self.params, self.response_id, self.created_at, status, output, usage_)

    def final(self, result: Completion) -> dict[str, Any]:
        status: Status = "incomplete" if result.finish_reason == "length" else "completed"
        item = message_item(self.item_id, status, [text_part(result.text)])
        return self._response(status, [item], usage(self.input_tokens, result.completion_tokens))

    def _event(self, type_: str, **fields: Any) -> dict[str, Any]:
        return {"type": type_, "sequence_number": next(self._sequence), **fields}

    def error_event(self, exc: Exception) -> dict[str, Any]:
        """The `error` event of a failure after the stream began, its code as the same failure's before it began
        (`schema_not_followed` for a schema the grammar engine gave up on); `server_error` for the server's own."""
        _, code = stream_error_kind(exc)
        return self._event("error", code=code or "server_error", message=str(exc), param=None)

    async def events(self, deltas: AsyncGenerator[TextDelta, None]) -> AsyncGenerator[dict[str, Any], None]:
        where = {"item_id": self.item_id, "output_index": 0, "content_index": 0}
        try:
            yield self._event("response.created", response=self._response("in_progress", [], None))
            yield self._event("response.in_progress", response=self._response("in_progress", [], None))
            yield self._event(
                "response.output_item.added", output_index=0, item=message_item(self.item_id, "in_progress", [])
            )
            yield self._event("response.content_part.added", **where, part=text_part(""))
            parts: list[str] = []
            last: TextDelta | None = None
            async for delta in deltas:
                if delta.text:
                    parts.append(delta.text)
                    yield self._event("response.output_text.delta", **where, delta=delta.text, logprobs=[])
                if delta.finish_reason is not None:
                    last = delta
            if last is None:
                raise EngineError("the engine ended a sequence without a finish reason")
            result = Completion("".join(parts), last.finish_reason or "stop", last.completion_tokens)
            yield self._event("response.output_text.done", **where, text=result.text, logprobs=[])
            yield self._event("response.content_part.done", **where, part=text_part(result.text))
            final = self.final(result)
            yield self._event("response.output_item.done", output_index=0, item=final["output"][0])
            yield self._event(f"response.{final['status']}", response=final)
        finally:
            await deltas.aclose()
