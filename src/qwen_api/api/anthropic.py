"""Anthropic's Messages API: `POST /v1/messages` (plain or streamed) and `POST /v1/messages/count_tokens`.

The routes work as the chat completions route does: check the model and the cap, build the prompt (the chat
template, then any assistant prefill as plain text), check the context, take an admission ticket, then await
the answer (cancelled if the client leaves) or stream it as Anthropic's events: `message_start`,
`content_block_start`, `ping`, `content_block_delta`s, `content_block_stop`, `message_delta` (stop reason,
output tokens), `message_stop`. A failure after the stream began is one `error` event. Every error under
`/v1/messages` answers in Anthropic's shape (see `api.errors`).
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncGenerator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from qwen_api.api.anthropic_protocol import Conversation, MessagesRequest, message_object, stop_reason
from qwen_api.api.deps import GeneratorDep, GuardDep, RuntimeDep, SettingsDep, log_outputs, log_prompt
from qwen_api.api.errors import ModelNotFound, anthropic_error_body
from qwen_api.api.guard import RequestTimeout
from qwen_api.api.sse import sse_response
from qwen_api.engine.base import EngineError
from qwen_api.runtime import Runtime
from qwen_api.settings import Settings
from qwen_api.textgen import Completion, TextDelta, TextGenerator

router = APIRouter(prefix="/v1")


async def _prompt_ids(body: Conversation, settings: Settings, runtime: Runtime, generator: TextGenerator) -> list[int]:
    if body.model != runtime.model_name:
        raise ModelNotFound(body.model, runtime.model_name)
    body.check_supported()
    messages = body.chat_messages()
    log_prompt(settings, messages)
    prefill = body.prefill()

    def tokenise() -> list[int]:
        ids = generator.chat_prompt_ids(messages)
        if prefill:  # plain text: control tokens typed in it stay characters, as in any message
            ids += generator.content_ids(prefill)
        return ids

    return await generator.off_loop(tokenise)


@router.post("/messages", response_model=None)
async def create_message(
    body: MessagesRequest,
    request: Request,
    settings: SettingsDep,
    runtime: RuntimeDep,
    generator: GeneratorDep,
    guard: GuardDep,
) -> dict[str, Any] | StreamingResponse:
    prompt_ids = await _prompt_ids(body, settings, runtime, generator)
    params, stop = body.sampling_params(generator.sampling_defaults), body.stop_sequences or []
    generator.check_fits(prompt_ids, params.max_new_tokens)
    ticket = guard.admit(1, len(prompt_ids))
    shape = _Shape(body.model, len(prompt_ids))
    if body.stream:
        events = guard.stream(ticket, shape.events(generator.stream(prompt_ids, params, stop=stop)))
        return sse_response(events, _error_event, on_close=ticket.release, typed=True)
    [result] = await guard.complete(request, ticket, generator.complete(prompt_ids, params, stop=stop))
    log_outputs(settings, [result.text])
    return shape.message(result)


@router.post("/messages/count_tokens")
async def count_tokens(
    body: Conversation, settings: SettingsDep, runtime: RuntimeDep, generator: GeneratorDep
) -> dict[str, int]:
    """The prompt's tokens exactly as `/v1/messages` would count them (its `usage.input_tokens`)."""
    return {"input_tokens": len(await _prompt_ids(body, settings, runtime, generator))}


def _error_event(exc: Exception) -> dict[str, Any]:
    return anthropic_error_body(str(exc), "timeout_error" if isinstance(exc, RequestTimeout) else "api_error")


class _Shape:
    """One answer's id and counts, as a finished Message or as its stream of events."""

    def __init__(self, model: str, input_tokens: int) -> None:
        self.model, self.input_tokens = model, input_tokens
        self.message_id = f"msg_{uuid.uuid4().hex}"

    def message(self, result: Completion) -> dict[str, Any]:
        usage = {"input_tokens": self.input_tokens, "output_tokens": result.completion_tokens}
        return message_object(self.message_id, self.model, result.text, stop_reason(result), result.stop_string, usage)

    async def events(self, deltas: AsyncGenerator[TextDelta, None]) -> AsyncGenerator[dict[str, Any], None]:
        try:
            usage = {"input_tokens": self.input_tokens, "output_tokens": 0}
            start = message_object(self.message_id, self.model, None, None, None, usage)
            yield {"type": "message_start", "message": start}
            yield {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}
            yield {"type": "ping"}
            last: TextDelta | None = None
            async for delta in deltas:
                if delta.text:
                    text_delta = {"type": "text_delta", "text": delta.text}
                    yield {"type": "content_block_delta", "index": 0, "delta": text_delta}
                if delta.finish_reason is not None:
                    last = delta
            if last is None or last.finish_reason is None:
                raise EngineError("the engine ended a sequence without a finish reason")
            result = Completion("", last.finish_reason, last.completion_tokens, stop_string=last.stop_string)
            yield {"type": "content_block_stop", "index": 0}
            delta_ = {"stop_reason": stop_reason(result), "stop_sequence": result.stop_string}
            yield {"type": "message_delta", "delta": delta_, "usage": {"output_tokens": result.completion_tokens}}
            yield {"type": "message_stop"}
        finally:
            await deltas.aclose()
