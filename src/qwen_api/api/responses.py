"""OpenAI's Responses API: `POST /v1/responses`, stateless, plain or streamed as Responses events.

The route works as the chat completions route does: check the model and the caps, put the conversation
through the chat template, check the context, take an admission ticket, then either await the one answer
(cancelled if the client leaves) or stream it. A stream is the Responses event sequence, each event named by
its `type` and numbered by `sequence_number`; it ends with `response.completed`, or `response.incomplete`
when `max_output_tokens` cut the answer. A failure after the stream began (the deadline, the engine, a schema the
grammar engine gave up on) ends it with an `error` event, then `response.failed`: the response so far, its status
`failed`, its `error` the failure's.

Function tools work as on chat completions, from the same parts: the history and the tools block go through
`chat_prompt`, `required` or a named function is the call grammar, and the output is split into text and calls by
`parse_tool_calls`. The answer is a `message` item for its text (left out when calls come without text), then one
`function_call` item per call. Streamed, text that may be the start of a `<tool_call>` is held back (and trailing
whitespace, which the message's text drops when calls follow), and each call is sent whole at the end.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import time
import uuid
from collections.abc import AsyncGenerator
from typing import Any

import anyio
from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from qwen_api.api.deps import GeneratorDep, GuardDep, RuntimeDep, SettingsDep, log_outputs, log_prompt
from qwen_api.api.errors import ModelNotFound, stream_error_kind
from qwen_api.api.logprobs import LogprobShape
from qwen_api.api.openai_protocol import Unsupported
from qwen_api.api.prompts import chat_prompt
from qwen_api.api.responses_protocol import (
    ResponsesRequest,
    ResponseStatus,
    Status,
    function_call_item,
    message_item,
    response_error,
    response_object,
    text_part,
    usage,
)
from qwen_api.api.sse import sse_response
from qwen_api.engine.base import EngineError, SamplingParams
from qwen_api.structured.grammar import GrammarError
from qwen_api.structured.tools import CallRules
from qwen_api.textgen import Completion, TextDelta

log = logging.getLogger(__name__)

router = APIRouter(prefix="/v1")

# A failed Response's `error.code` is one of a closed set (the `openai` SDK's `ResponseError.code`), which has none
# of this server's own codes: a schema the grammar engine gave up on, the request's fault (a 400 before a stream),
# is `invalid_prompt`, the one code of the set that blames the request; the deadline (`request_timeout`) and the
# server's own failures are `server_error`. The exact code stays in the `error` event and `error.type` keeps the type.
_FAILED_CODES = {"schema_not_followed": "invalid_prompt"}


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
    tools, history = body.tool_dicts(), body.chat_history()
    messages, prompt_ids = await generator.off_loop(lambda: chat_prompt(generator, history, tools))
    log_prompt(settings, messages)
    # Left out: as much as fits, up to the cap (a prompt that leaves no room fails the context check below).
    max_new = body.max_output_tokens or max(1, min(cap, generator.engine.max_context_tokens - len(prompt_ids)))
    params = body.sampling_params(max_new, generator.sampling_defaults, generator.vocab_size)
    generator.check_fits(prompt_ids, max_new)
    if (grammar := body.grammar()) is not None:  # structured outputs or a forced call, enforced while decoding
        text, param = grammar
        try:
            params = dataclasses.replace(params, constraint=await generator.grammars.compile(text, param))
        except GrammarError as exc:
            raise Unsupported(param, str(exc)) from None
    ticket = guard.admit(1, len(prompt_ids))
    logprobs = LogprobShape(generator) if params.logprobs is not None else None
    shape = _Shape(body, params, len(prompt_ids), body.call_rules(), logprobs)
    if body.stream:
        events = shape.ending_failed(guard.stream(ticket, shape.events(generator.stream(prompt_ids, params))))
        return sse_response(events, shape.error_event, on_close=ticket.release, typed=True)
    [result] = await guard.complete(request, ticket, generator.complete(prompt_ids, params))
    log_outputs(settings, [result.text])
    return shape.final(result)


class _Shape:
    """One response's ids and echoed settings, as a finished Response object or as its stream of events."""

    def __init__(
        self,
        body: ResponsesRequest,
        params: SamplingParams,
        input_tokens: int,
        rules: CallRules | None,
        logprobs: LogprobShape | None = None,
    ) -> None:
        """`logprobs`: the output text's log-probabilities are asked for (`include`), in this shape."""
        self.body, self.params, self.input_tokens = body, params, input_tokens
        self.logprobs = logprobs
        # With tools the output is split into text and calls (tools shown to the model: not with tool_choice 'none').
        self.rules = rules
        # vLLM's `request_id` is the response's id as given
        self.response_id = body.request_id if body.request_id is not None else f"resp_{uuid.uuid4().hex}"
        self.item_id = f"msg_{uuid.uuid4().hex}"
        self.created_at = int(time.time())
        self._sequence = itertools.count()
        # What the stream has sent of the output so far: the message item (once added), its text part (once
        # added) and the text of its deltas. A failed response shows them.
        self._item_added = self._part_added = False
        self._texts: list[str] = []
        # With logprobs: every token's entry so far, and those not yet sent with a text delta
        self._entries: list[dict[str, Any]] = []
        self._unsent: list[dict[str, Any]] = []

    def _response(
        self,
        status: ResponseStatus,
        output: list[dict[str, Any]],
        usage_: dict[str, Any] | None,
        error: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        return response_object(self.body, self.params, self.response_id, self.created_at, status, output, usage_, error)

    @staticmethod
    def _status(finish_reason: str) -> Status:
        return "incomplete" if finish_reason == "length" else "completed"

    def final(self, result: Completion) -> dict[str, Any]:
        status = self._status(result.finish_reason)
        parsed = self.rules.split(result.text) if self.rules is not None else None
        text, calls = (parsed.content or "", parsed.tool_calls) if parsed is not None else (result.text, [])
        # A message for the text: always without calls (as without tools), beside calls only when there is some.
        # Its log-probabilities are every token's, as chat completions gives them (a call's tokens included).
        entries = self.logprobs.entries(result.logprobs or ()) if self.logprobs is not None else None
        output = [message_item(self.item_id, status, [text_part(text, entries)])] if text or not calls else []
        output += [function_call_item(f"fc_{uuid.uuid4().hex}", call, "completed") for call in calls]
        return self._response(status, output, usage(self.input_tokens, result.completion_tokens))

    def _event(self, type_: str, **fields: Any) -> dict[str, Any]:
        return {"type": type_, "sequence_number": next(self._sequence), **fields}

    def error_event(self, exc: Exception) -> dict[str, Any]:
        """The `error` event of a failure after the stream began, its code as the same failure's before it began
        (`schema_not_followed` for a schema the grammar engine gave up on); `server_error` for the server's own."""
        _, code = stream_error_kind(exc)
        return self._event("error", code=code or "server_error", message=str(exc), param=None)

    def failed_event(self, exc: Exception) -> dict[str, Any]:
        """`response.failed`: the response as far as the stream got (its message item, `incomplete`, with the text
        sent so far), status `failed`, `error` the failure's. No usage: the tokens are counted only at the end."""
        type_, code = stream_error_kind(exc)
        error = response_error(_FAILED_CODES.get(code or "", "server_error"), str(exc), type_)
        parts = [text_part("".join(self._texts))] if self._part_added else []
        output = [message_item(self.item_id, "incomplete", parts)] if self._item_added else []
        return self._event("response.failed", response=self._response("failed", output, None, error))

    async def ending_failed(self, events: AsyncGenerator[dict[str, Any], None]) -> AsyncGenerator[dict[str, Any], None]:
        """`events`, ended as OpenAI ends a failed stream when they fail: `error`, then `response.failed`, last.

        The `error` event stays before the terminal one: its `code` is free text (`ResponseErrorEvent`), so it
        keeps this server's exact code (`request_timeout`, `schema_not_followed`) that `response.failed` cannot
        carry, and clients that already read it keep working. OpenAI sends `error` events in streams too; neither
        makes the `openai` SDK raise. `response.failed` is the terminal lifecycle event that clients wait for (the
        SDK's stream helpers accumulate the response from it)."""
        try:
            async for event in events:
                yield event
        except Exception as exc:  # the failures sse_response turns into one error event, for the other dialects
            log.warning("stream failed after it began: %s", exc)
            yield self.error_event(exc)
            yield self.failed_event(exc)
        finally:
            # As sse_response does: a client that left cancels the stream; the engine's sequences end now all the same.
            with anyio.CancelScope(shield=True):
                await events.aclose()

    def _text_events(self, text: str) -> list[dict[str, Any]]:
        """A text delta, after the message item and its text part once (added when its first text goes out)."""
        where = {"item_id": self.item_id, "output_index": 0, "content_index": 0}
        out = []
        if not self._item_added:
            self._item_added = True
            item = message_item(self.item_id, "in_progress", [])
            out.append(self._event("response.output_item.added", output_index=0, item=item))
        if not self._part_added:
            self._part_added = True
            out.append(self._event("response.content_part.added", **where, part=text_part("")))
        if text:
            self._texts.append(text)
            sent, self._unsent = self._unsent, []
            out.append(self._event("response.output_text.delta", **where, delta=text, logprobs=sent))
        return out

    def _call_events(self, index: int, call: dict[str, Any]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """A whole call as OpenAI streams one (added with empty arguments, the arguments in one delta, done), and
        its final item."""
        item_id, arguments = f"fc_{uuid.uuid4().hex}", call["function"]["arguments"]
        where = {"item_id": item_id, "output_index": index}
        item = function_call_item(item_id, call, "completed")
        events = [
            self._event(
                "response.output_item.added",
                output_index=index,
                item=function_call_item(item_id, call, "in_progress", ""),
            ),
            self._event("response.function_call_arguments.delta", **where, delta=arguments),
            self._event(
                "response.function_call_arguments.done", **where, name=call["function"]["name"], arguments=arguments
            ),
            self._event("response.output_item.done", output_index=index, item=item),
        ]
        return events, item

    async def events(self, deltas: AsyncGenerator[TextDelta, None]) -> AsyncGenerator[dict[str, Any], None]:
        where = {"item_id": self.item_id, "output_index": 0, "content_index": 0}
        try:
            yield self._event("response.created", response=self._response("in_progress", [], None))
            yield self._event("response.in_progress", response=self._response("in_progress", [], None))
            # with tools, the text held back where it may be a <tool_call>; else the message item comes first
            calls_in = self.rules.stream() if self.rules is not None else None
            if calls_in is None:
                for event in self._text_events(""):
                    yield event
            last: TextDelta | None = None
            async for delta in deltas:
                if delta.finish_reason is not None:
                    last = delta
                if self.logprobs is not None and delta.logprobs:
                    entries = self.logprobs.entries(delta.logprobs)
                    self._entries += entries
                    self._unsent += entries
                text = calls_in.feed(delta.text) if calls_in is not None else delta.text
                if text or calls_in is None:
                    for event in self._text_events(text):
                        yield event
            if last is None:
                raise EngineError("the engine ended a sequence without a finish reason")
            status = self._status(last.finish_reason or "stop")
            calls: list[dict[str, Any]] = []
            if calls_in is not None:
                # the rest of the text, with the calls (and a call cut off by the token limit) taken out
                rest, calls = calls_in.finish()
                if rest or not calls:
                    for event in self._text_events(rest):
                        yield event
            output: list[dict[str, Any]] = []
            if self._item_added:
                text = "".join(self._texts)
                if self._unsent:  # tokens with no text of their own (the end of turn): a delta carries their entries
                    sent, self._unsent = self._unsent, []
                    yield self._event("response.output_text.delta", **where, delta="", logprobs=sent)
                yield self._event("response.output_text.done", **where, text=text, logprobs=self._entries)
                yield self._event("response.content_part.done", **where, part=text_part(text, self._entries))
                output.append(message_item(self.item_id, status, [text_part(text, self._entries)]))
                yield self._event("response.output_item.done", output_index=0, item=output[0])
            for call in calls:
                events, item = self._call_events(len(output), call)
                for event in events:
                    yield event
                output.append(item)
            final = self._response(status, output, usage(self.input_tokens, last.completion_tokens))
            yield self._event(f"response.{final['status']}", response=final)
        finally:
            await deltas.aclose()
