"""Anthropic's Messages API: `POST /v1/messages` (plain or streamed) and `POST /v1/messages/count_tokens`.

The routes work as the chat completions route does: check the model and the cap, build the prompt (the chat
template, with any tools and tool blocks rendered as chat completions renders them, then any assistant prefill as
plain text), check the context, take an admission ticket (after compiling the grammar of a forced call or of an
`output_config.format`), then await the answer (cancelled if the client leaves) or stream it as Anthropic's events:
`message_start`, `ping`, a text block (`content_block_start`, `content_block_delta`s, `content_block_stop`), then
with tools one block per call (its input as one `input_json_delta`), `message_delta` (stop reason, and the usage so
far, input tokens included, as Anthropic's is), `message_stop`. With tools, streamed text is held back while it may
be the start of a `<tool_call>`. A failure after the stream began is one `error` event. Every error under
`/v1/messages` answers in Anthropic's shape (see `api.errors`); a request for a message thread (`thread`) is refused
with the details that make the SDK's tool runner go on without one.
"""

from __future__ import annotations

import dataclasses
import json
import uuid
from collections.abc import AsyncGenerator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from qwen_api.api.anthropic_protocol import Conversation, MessagesRequest, message_object, stop_reason
from qwen_api.api.deps import GeneratorDep, GuardDep, RuntimeDep, SettingsDep, log_outputs, log_prompt
from qwen_api.api.errors import ModelNotFound, anthropic_error_body
from qwen_api.api.guard import CutOff, RequestTimeout
from qwen_api.api.openai_protocol import Unsupported
from qwen_api.api.prompts import chat_prompt
from qwen_api.api.sse import sse_response
from qwen_api.engine.base import ConstraintFailed, EngineError
from qwen_api.runtime import Runtime
from qwen_api.settings import Settings
from qwen_api.structured.grammar import GrammarError
from qwen_api.structured.tools import CallRules
from qwen_api.textgen import Completion, TextDelta, TextGenerator

router = APIRouter(prefix="/v1")


async def _prompt_ids(body: Conversation, settings: Settings, runtime: Runtime, generator: TextGenerator) -> list[int]:
    if body.model != runtime.model_name:
        raise ModelNotFound(body.model, runtime.model_name)
    body.check_supported()
    chat, tools, prefill = body.chat(), body.tool_dicts(), body.prefill()

    # chat completions' rule, tools and tool blocks included
    messages, ids = await generator.off_loop(lambda: chat_prompt(generator, chat, tools, prefill=prefill))
    log_prompt(settings, messages)
    return ids


# A thread is a conversation the server holds between turns, which this stateless server does not keep. The
# refusal carries Anthropic's `thread_unsupported_request` details: on them the SDK's tool runner (which asks for a
# thread by default) goes on without a thread, sending the whole history each turn, as `thread=False` makes it do.
_NO_THREADS = anthropic_error_body(
    "thread: this server keeps no message threads (they need stored state): send the whole conversation without "
    "`thread`; create the tool runner with thread=False",
    "invalid_request_error",
)
_NO_THREADS["error"]["details"] = {"error_code": "thread_unsupported_request"}


@router.post("/messages", response_model=None)
async def create_message(
    body: MessagesRequest,
    request: Request,
    settings: SettingsDep,
    runtime: RuntimeDep,
    generator: GeneratorDep,
    guard: GuardDep,
) -> dict[str, Any] | StreamingResponse | JSONResponse:
    if body.thread is not None:
        return JSONResponse(_NO_THREADS, status_code=400)
    prompt_ids = await _prompt_ids(body, settings, runtime, generator)
    params, stop = body.sampling_params(generator.sampling_defaults), body.stops()
    generator.check_fits(prompt_ids, params.max_new_tokens)
    # A forced call (one call, its input as its schema says), or text in the output_config format (with `auto`
    # tools: calls or such text), enforced while decoding.
    if (grammar := body.grammar()) is not None:
        try:
            params = dataclasses.replace(params, constraint=await generator.grammars.compile(*grammar))
        except GrammarError as exc:
            raise Unsupported(exc.param, str(exc)) from None
    ticket = guard.admit(1, len(prompt_ids))
    shape = _Shape(body.model, len(prompt_ids), body.call_rules())
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
    if isinstance(exc, RequestTimeout):
        return anthropic_error_body(str(exc), "timeout_error")
    if isinstance(exc, CutOff):  # as the 503 of a request refused while draining
        return anthropic_error_body(str(exc), "overloaded_error")
    # a schema the grammar engine gave up on is the request's, as its 400 before a stream says
    return anthropic_error_body(str(exc), "invalid_request_error" if isinstance(exc, ConstraintFailed) else "api_error")


_TEXT_BLOCK = {"type": "text", "text": ""}


def _block_start(index: int, block: dict[str, Any]) -> dict[str, Any]:
    return {"type": "content_block_start", "index": index, "content_block": block}


def _text_delta(index: int, text: str) -> dict[str, Any]:
    return {"type": "content_block_delta", "index": index, "delta": {"type": "text_delta", "text": text}}


class _Shape:
    """One answer's id and counts, as a finished Message or as its stream of events. With tools shown (`rules`),
    the answer's `<tool_call>` blocks are its tool_use blocks."""

    def __init__(self, model: str, input_tokens: int, rules: CallRules | None = None) -> None:
        self.model, self.input_tokens, self.rules = model, input_tokens, rules
        self.message_id = f"msg_{uuid.uuid4().hex}"

    @staticmethod
    def _uses(calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [
            {
                "type": "tool_use",
                "id": f"toolu_{uuid.uuid4().hex[:24]}",
                "name": call["function"]["name"],
                "input": json.loads(call["function"]["arguments"]),  # always a JSON object's text
            }
            for call in calls
        ]

    def usage(self, output_tokens: int) -> dict[str, int]:
        """Anthropic's usage, cumulative (a stream's `message_delta` carries all of it, as Anthropic's does: clients
        such as langchain-anthropic read it alone). Prompt caching is not tracked: its counts read 0."""
        return {
            "input_tokens": self.input_tokens,
            "output_tokens": output_tokens,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 0,
        }

    def message(self, result: Completion) -> dict[str, Any]:
        usage = self.usage(result.completion_tokens)
        parsed = self.rules.split(result.text) if self.rules is not None else None
        text, uses = (parsed.content or "", self._uses(parsed.tool_calls)) if parsed is not None else (result.text, [])
        # an empty answer has no blocks, as Anthropic's (which refuses an empty text block sent back in a history)
        content = [*([{"type": "text", "text": text}] if text else []), *uses]
        if not uses:
            return message_object(self.message_id, self.model, content, stop_reason(result), result.stop_string, usage)
        return message_object(self.message_id, self.model, content, "tool_use", None, usage)

    async def events(self, deltas: AsyncGenerator[TextDelta, None]) -> AsyncGenerator[dict[str, Any], None]:
        try:
            yield {
                "type": "message_start",
                "message": message_object(self.message_id, self.model, [], None, None, self.usage(0)),
            }
            # The text block opens at the first text sent: none for an empty answer or a bare call (with tools, the
            # text is held back where it may be a `<tool_call>`).
            calls_in = self.rules.stream() if self.rules is not None else None
            blocks = 0
            yield {"type": "ping"}
            last: TextDelta | None = None
            async for delta in deltas:
                if delta.finish_reason is not None:
                    last = delta
                text = calls_in.feed(delta.text) if calls_in is not None else delta.text
                if text:
                    if not blocks:
                        blocks = 1
                        yield _block_start(0, _TEXT_BLOCK)
                    yield _text_delta(0, text)
            if last is None or last.finish_reason is None:
                raise EngineError("the engine ended a sequence without a finish reason")
            result = Completion("", last.finish_reason, last.completion_tokens, stop_string=last.stop_string)
            uses: list[dict[str, Any]] = []
            if calls_in is not None:  # the rest of the text: all of it, or with calls the text beside them
                rest, calls = calls_in.finish()
                uses = self._uses(calls)
                if not blocks and rest:
                    blocks = 1
                    yield _block_start(0, _TEXT_BLOCK)
                if rest:
                    yield _text_delta(0, rest)
            if blocks:
                yield {"type": "content_block_stop", "index": 0}
            for index, use in enumerate(uses, start=blocks):
                yield _block_start(index, {**use, "input": {}})
                partial = {"type": "input_json_delta", "partial_json": json.dumps(use["input"], ensure_ascii=False)}
                yield {"type": "content_block_delta", "index": index, "delta": partial}
                yield {"type": "content_block_stop", "index": index}
            delta_ = (
                {"stop_reason": "tool_use", "stop_sequence": None}
                if uses
                else {"stop_reason": stop_reason(result), "stop_sequence": result.stop_string}
            )
            yield {"type": "message_delta", "delta": delta_, "usage": self.usage(result.completion_tokens)}
            yield {"type": "message_stop"}
        finally:
            await deltas.aclose()
