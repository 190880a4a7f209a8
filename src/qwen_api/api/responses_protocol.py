"""Schemas of OpenAI's Responses API (`POST /v1/responses`), stateless, and the objects it answers with.

A request is a conversation (`input` as a string or messages, `instructions` as a system message) plus the
sampling fields this server honours: `max_output_tokens`, `temperature`, `top_p`, `stream`, and structured
outputs through `text.format` (json_object or json_schema). Every field that would need state
(`previous_response_id`, `store`, `background`, `conversation`), tools or reasoning is refused with a 400 that
names it (`Unsupported`), never silently ignored; so is any field the schema does not know. `Response` objects
and stream events are built here as plain dicts.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field, field_validator

from qwen_api.api.openai_protocol import Unsupported
from qwen_api.api.schema import RequestModel, at_most, resolve_sampling
from qwen_api.engine.base import SamplingParams
from qwen_api.structured.grammar import GrammarError, response_format_grammar

# The sampling fields a response gets: OpenAI's defaults where neither the request nor the model's config sets one.
_DIALECT_DEFAULTS = {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0, "repetition_penalty": 1.0}

Status = Literal["in_progress", "completed", "incomplete"]  # an output item's (and a message sent back as input)
# A Response's: `failed` only ends a stream that failed after it began (a plain request's failure is an HTTP error).
ResponseStatus = Literal["in_progress", "completed", "incomplete", "failed"]


class _Request(RequestModel):
    """Strict and closed (api/schema.py); a field sent as null takes its default."""

    null_means_default = True


class ContentPart(_Request):
    """Text content; `output_text` parts are what an earlier response's output items hold, sent back as history."""

    type: Literal["input_text", "output_text"]
    text: str
    annotations: list[Any] | None = None
    logprobs: list[Any] | None = None


class InputMessage(_Request):
    type: Literal["message"] = "message"
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart]
    id: str | None = None  # an earlier response's output item, sent back as it came
    status: Status | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class TextFormat(_Request):
    # json_schema formats carry more fields: kept as sent, then checked against the format's type (unknown fields,
    # wrong types) by `ResponsesRequest.grammar` (structured/grammar.py)
    model_config = ConfigDict(extra="allow")

    type: str


class TextConfig(_Request):
    format: TextFormat | None = None
    verbosity: Literal["low", "medium", "high"] | None = None


class StreamOptions(_Request):
    include_obfuscation: bool = False


class ResponsesRequest(_Request):
    model: str
    input: Annotated[str, Field(min_length=1)] | Annotated[list[InputMessage], Field(min_length=1)]
    instructions: str | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0, allow_inf_nan=False)
    top_p: float | None = Field(None, gt=0.0, le=1.0, allow_inf_nan=False)
    stream: bool = False
    stream_options: StreamOptions | None = None
    text: TextConfig | None = None
    metadata: dict[str, Annotated[str, Field(max_length=512)]] | None = Field(None, max_length=16)
    user: str | None = Field(None, max_length=256, description="Accepted for compatibility; not used.")
    safety_identifier: str | None = Field(None, max_length=256, description="Accepted; not used.")
    prompt_cache_key: str | None = Field(None, max_length=256, description="Accepted; not used.")
    service_tier: Literal["auto", "default", "flex", "priority"] | None = None
    parallel_tool_calls: bool | None = None
    truncation: Literal["auto", "disabled"] | None = None
    # Fields that would need state, tools or reasoning: refused unless left at their neutral value.
    store: bool | None = None
    background: bool | None = None
    previous_response_id: str | None = None
    conversation: str | dict[str, Any] | None = None
    prompt: dict[str, Any] | None = None
    include: list[str] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    max_tool_calls: int | None = None
    reasoning: dict[str, Any] | None = None
    top_logprobs: int | None = None

    @field_validator("max_output_tokens")
    @classmethod
    def _max_tokens_cap(cls, value: int | None) -> int | None:
        return at_most(value, "max_new_tokens")

    def check_supported(self) -> None:
        refusals = [
            ("store", self.store, "this server keeps no responses: send store false or leave it out"),
            ("background", self.background, "background responses are not supported"),
            ("include", self.include, "no additional output data is available"),
            ("tools", self.tools, "tool calling is not supported by this server"),
            ("max_tool_calls", self.max_tool_calls, "tool calling is not supported by this server"),
            (
                "reasoning",
                self.reasoning and any(v is not None for v in self.reasoning.values()),
                "not a reasoning model",
            ),
            ("top_logprobs", self.top_logprobs, "log probabilities are not returned by this server"),
        ]
        for param, value, why in refusals:
            if value:
                raise Unsupported(param, why)
        # These name stored state whatever their value: an empty id or object is no neutral value (null is).
        stored = [
            ("previous_response_id", self.previous_response_id, "this server keeps no responses: send the history"),
            ("conversation", self.conversation, "this server keeps no conversations: send the history"),
            ("prompt", self.prompt, "stored prompt templates are not supported"),
        ]
        for field, state, reason in stored:
            if state is not None:
                raise Unsupported(field, reason)
        if self.tool_choice not in (None, "none", "auto"):
            raise Unsupported("tool_choice", "tool calling is not supported by this server")
        if self.truncation == "auto":
            raise Unsupported("truncation", "inputs are never truncated here: use 'disabled'")
        self.grammar()  # an unknown or malformed text.format is a 400 naming it
        if self.text is not None and self.text.verbosity is not None:
            raise Unsupported("text.verbosity", "not supported by this server")
        if self.stream_options is not None and not self.stream:
            raise Unsupported("stream_options", "only allowed when stream is true")
        if self.stream_options is not None and self.stream_options.include_obfuscation:
            raise Unsupported("stream_options.include_obfuscation", "stream events are not obfuscated here")

    def text_format(self) -> dict[str, Any]:
        """`text.format` as sent (echoed in the Response), `{"type": "text"}` when left out."""
        if self.text is None or self.text.format is None:
            return {"type": "text"}
        return self.text.format.model_dump(exclude_none=True)

    def grammar(self) -> str | None:
        """Structured outputs: the grammar of `text.format` (json_object, or json_schema with its `name`, `schema`,
        `strict` and `description` at the top level, as the Responses API has them); None for plain text."""
        fmt = self.text_format()
        if fmt.get("type") == "json_schema":  # the chat completions' shape nests these under `json_schema`
            fmt = {"type": "json_schema", "json_schema": {k: v for k, v in fmt.items() if k != "type"}}
        try:
            return response_format_grammar(fmt)
        except GrammarError as exc:
            raise Unsupported("text.format", str(exc)) from None

    def chat_messages(self) -> list[dict[str, str]]:
        """The conversation for the chat template: `instructions` first, as a system message."""
        messages = [{"role": "system", "content": self.instructions}] if self.instructions is not None else []
        if isinstance(self.input, str):
            return [*messages, {"role": "user", "content": self.input}]
        roles = {"developer": "system"}
        return messages + [{"role": roles.get(m.role, m.role), "content": m.text()} for m in self.input]

    def sampling_params(self, max_new_tokens: int, model_defaults: dict[str, float]) -> SamplingParams:
        """What the request sets, else the model's generation-config defaults, else OpenAI's."""
        values = resolve_sampling(self, model_defaults, _DIALECT_DEFAULTS)
        return SamplingParams(max_new_tokens=max_new_tokens, **values)


def text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def message_item(item_id: str, status: Status, parts: list[dict[str, Any]]) -> dict[str, Any]:
    return {"id": item_id, "type": "message", "role": "assistant", "status": status, "content": parts}


def usage(input_tokens: int, output_tokens: int) -> dict[str, Any]:
    # No prompt-cache accounting here: cached tokens are reported as 0.
    return {
        "input_tokens": input_tokens,
        "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
        "output_tokens": output_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": input_tokens + output_tokens,
    }


def response_error(code: str, message: str, type_: str, param: str | None = None) -> dict[str, Any]:
    """A failed Response's `error`: `code` one of the closed set OpenAI's `ResponseError` allows (`server_error`,
    `invalid_prompt`, ...); `type` the failure's type as this server's error bodies name it."""
    return {"code": code, "message": message, "type": type_, "param": param}


def response_object(
    body: ResponsesRequest,
    params: SamplingParams,
    response_id: str,
    created_at: int,
    status: ResponseStatus,
    output: list[dict[str, Any]],
    usage_: dict[str, Any] | None,
    error: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The Response object, echoing every effective setting; `error` (`response_error`) when it failed."""
    return {
        "id": response_id,
        "object": "response",
        "created_at": created_at,
        "status": status,
        "error": error,
        "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
        "instructions": body.instructions,
        "max_output_tokens": body.max_output_tokens,
        "model": body.model,
        "output": output,
        "parallel_tool_calls": body.parallel_tool_calls if body.parallel_tool_calls is not None else True,
        "previous_response_id": None,
        "reasoning": None,
        "store": False,
        "background": False,
        "temperature": params.temperature,
        "top_p": params.top_p,
        "text": {"format": body.text_format()},
        "tool_choice": body.tool_choice or "auto",
        "tools": [],
        "truncation": "disabled",
        "usage": usage_,
        "user": body.user,
        "metadata": body.metadata or {},
        "service_tier": "default",
    }
