"""Schemas of Anthropic's Messages API (`POST /v1/messages`, `POST /v1/messages/count_tokens`) and its answers.

A request is a conversation (`system` as a string or text blocks, `messages` of user and assistant turns with
string or block content: text, an assistant's `tool_use`, a user's `tool_result`), the custom `tools` and
`tool_choice`, structured outputs (`output_config.format`), plus what this server honours: `max_tokens`
(required), `stop_sequences`, `temperature` (0-1, Anthropic's range), `top_p`, `top_k`, `metadata`, `stream`. A
last assistant turn is a prefill: the answer continues it, as Anthropic's does. Tool use runs on the chat
completions' building blocks (qwen_api.structured.tools): the conversation becomes OpenAI-shaped chat messages
(`tool_use` blocks an assistant's `tool_calls`, `tool_result` blocks `tool` messages) and the tools OpenAI function
tools, so both dialects show the model the same prompt; `any` or a named `tool` is a grammar-bound call, and an
`output_config.format` schema is a grammar on the text, as chat completions' `response_format` is. Server tools,
extended thinking, `output_config.effort` and `task_budget`, message threads (`thread`: they need stored state),
other blocks and unknown fields are refused with a 400 that names them; limits live in the fields, so a value out
of range is a 400 in Anthropic's error shape (the app's handlers pick the shape from the path).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Annotated, Any, Literal

from pydantic import Discriminator, Field, Tag, field_validator, model_validator

from qwen_api.api.openai_protocol import (
    MAX_STOP_LENGTH,
    MAX_STOP_STRINGS,
    ChatMessage,
    FunctionCall,
    ToolCall,
    Unsupported,
)
from qwen_api.api.schema import RequestModel, at_most, resolve_sampling
from qwen_api.detokenize import Stops
from qwen_api.engine.base import SamplingParams
from qwen_api.structured.grammar import GrammarError, checked_schema, json_schema_grammar
from qwen_api.structured.tools import CLOSE, OPEN, CallRules, check_functions, tools_grammar
from qwen_api.textgen import Completion


class _Request(RequestModel):
    """Strict and closed (api/schema.py); a field sent as null takes its default."""

    null_means_default = True


class CacheControl(_Request):
    """A caching hint: accepted, since a prefix is reused anyway where the engine can (llama.cpp)."""

    type: Literal["ephemeral"]
    ttl: Literal["5m", "1h"] | None = None


class TextBlock(_Request):
    type: Literal["text"]
    text: str
    cache_control: CacheControl | None = None
    citations: list[Any] | None = Field(None, max_length=0)


class DirectCaller(_Request):
    type: Literal["direct"]


class ToolUseBlock(_Request):
    """An assistant's call, as a response's `tool_use` block comes back in the history."""

    type: Literal["tool_use"]
    id: str = Field(..., min_length=1)
    name: str = Field(..., min_length=1)
    input: dict[str, Any]
    cache_control: CacheControl | None = None
    caller: DirectCaller | None = None


class ToolResultBlock(_Request):
    """A call's result, in the user turn after it; with `is_error`, the model reads it as "Error: " and its text."""

    type: Literal["tool_result"]
    tool_use_id: str = Field(..., min_length=1)
    content: str | list[TextBlock] = ""
    is_error: bool | None = None
    cache_control: CacheControl | None = None


def _block_type(value: Any) -> Any:
    return value.get("type") if isinstance(value, dict) else getattr(value, "type", None)


# Picked by `type` (a callable discriminator: the base's before-validator on every field rules out a field's).
Block = Annotated[
    Annotated[TextBlock, Tag("text")]
    | Annotated[ToolUseBlock, Tag("tool_use")]
    | Annotated[ToolResultBlock, Tag("tool_result")],
    Discriminator(
        _block_type,
        custom_error_type="invalid_block",
        custom_error_message="a content block here is text, tool_use (assistant turns) or tool_result (user turns)",
    ),
]


def _text(content: str | list[TextBlock] | list[Block]) -> str:
    return content if isinstance(content, str) else "".join(b.text for b in content if isinstance(b, TextBlock))


class InputMessage(_Request):
    role: Literal["user", "assistant"]
    content: str | list[Block]

    @model_validator(mode="after")
    def _blocks_of_the_role(self) -> InputMessage:
        kinds = {type(b) for b in self.blocks()}
        if self.role == "assistant" and ToolResultBlock in kinds:
            raise ValueError("tool_result blocks belong to user turns")
        if self.role == "user" and ToolUseBlock in kinds:
            raise ValueError("tool_use blocks belong to assistant turns")
        return self

    def blocks(self) -> list[Block]:
        return (
            [TextBlock(type="text", text=self.content, citations=None)]
            if isinstance(self.content, str)
            else list(self.content)
        )

    def chat(self) -> list[ChatMessage]:
        """This turn as OpenAI-shaped chat messages: an assistant's text and calls as one message; a user's
        results as `tool` messages and text as user messages, in the order they come."""
        if self.role == "assistant":
            calls = [
                ToolCall(id=b.id, function=FunctionCall(name=b.name, arguments=json.dumps(b.input, ensure_ascii=False)))
                for b in self.blocks()
                if isinstance(b, ToolUseBlock)
            ]
            return [ChatMessage(role="assistant", content=_text(self.content), tool_calls=calls or None)]
        out: list[ChatMessage] = []
        for block in self.blocks():
            if isinstance(block, ToolResultBlock):
                # A failed call's result says so, as the model reads it: its text alone may not.
                text = f"Error: {_text(block.content)}" if block.is_error else _text(block.content)
                out.append(ChatMessage(role="tool", content=text, tool_call_id=block.tool_use_id))
            elif isinstance(block, TextBlock):
                if out and out[-1].role == "user":  # consecutive text blocks are one message, as they always were
                    out[-1] = ChatMessage(role="user", content=out[-1].text() + block.text)
                else:
                    out.append(ChatMessage(role="user", content=block.text))
        return out or [ChatMessage(role="user", content="")]


class Tool(_Request):
    """A custom tool (Anthropic's server tools, such as web search, bash or computer use, do not run here)."""

    name: str = Field(..., pattern=r"^[a-zA-Z0-9_-]{1,128}$")
    description: str | None = None
    input_schema: dict[str, Any]
    type: Literal["custom"] | None = None
    cache_control: CacheControl | None = None
    strict: bool | None = None

    @model_validator(mode="before")
    @classmethod
    def _custom_only(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("type") not in (None, "custom"):
            raise ValueError(
                f"{data['type']!r} is one of Anthropic's server tools, which this server does not run; "
                "only custom tools (name, description, input_schema) are supported"
            )
        return data

    def as_function(self) -> dict[str, Any]:
        """The OpenAI function tool the model is shown (and the grammar reads: `strict` holds its calls to it)."""
        function = {
            "name": self.name,
            "description": self.description,
            "parameters": self.input_schema,
            "strict": self.strict,
        }
        return {"type": "function", "function": {k: v for k, v in function.items() if v is not None}}


class ToolChoiceAuto(_Request):
    type: Literal["auto"]
    disable_parallel_tool_use: bool | None = None


class ToolChoiceAny(_Request):
    type: Literal["any"]
    disable_parallel_tool_use: bool | None = None


class ToolChoiceTool(_Request):
    type: Literal["tool"]
    name: str
    disable_parallel_tool_use: bool | None = None


class ToolChoiceNone(_Request):
    type: Literal["none"]


ToolChoice = Annotated[
    Annotated[ToolChoiceAuto, Tag("auto")]
    | Annotated[ToolChoiceAny, Tag("any")]
    | Annotated[ToolChoiceTool, Tag("tool")]
    | Annotated[ToolChoiceNone, Tag("none")],
    Discriminator(
        _block_type,
        custom_error_type="invalid_tool_choice",
        custom_error_message="must be {'type': 'auto' | 'any' | 'none'} or {'type': 'tool', 'name': ...}",
    ),
]


class Metadata(_Request):
    user_id: str | None = Field(None, max_length=256, description="Accepted for compatibility; not used.")


# Where an `output_config.format` schema is named in errors (a bad schema is a 400 naming it).
FORMAT_SCHEMA = "output_config.format.schema"


class JSONOutputFormat(_Request):
    """Structured outputs: the answer's text is JSON that follows `schema`, enforced while decoding."""

    type: Literal["json_schema"]
    # `schema` would shadow a BaseModel attribute (a warning): the field takes its name as an alias.
    json_schema: dict[str, Any] = Field(..., alias="schema")


class OutputConfig(_Request):
    """`output_config`: the answer's format. `effort` and `task_budget` are accepted as fields, to be refused by
    name (`Conversation.check_supported`) rather than as unknown ones."""

    format: JSONOutputFormat | None = None
    effort: Literal["low", "medium", "high", "xhigh", "max"] | None = None
    task_budget: dict[str, Any] | None = None


class Conversation(_Request):
    """What both routes read: the model, the system prompt, the turns, the tools and the output format
    (count_tokens takes no more)."""

    model: str
    messages: list[InputMessage] = Field(..., min_length=1)
    system: str | list[TextBlock] | None = None
    cache_control: CacheControl | None = None
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None
    thinking: dict[str, Any] | None = None
    output_config: OutputConfig | None = None

    def check_supported(self) -> None:
        if self.thinking is not None and self.thinking.get("type") != "disabled":
            raise Unsupported("thinking", "extended thinking is not supported by this model")
        self._check_output_config()
        self._check_tools()
        self._check_history()
        prefill = self.prefill()
        if prefill is not None and len(self.messages) == 1:
            raise Unsupported("messages", "an assistant prefill needs a user turn before it")
        if prefill is not None and prefill != prefill.rstrip():
            raise Unsupported("messages", "final assistant content cannot end with trailing whitespace")

    def _check_output_config(self) -> None:
        """What `output_config` asks is honoured or refused by name, never ignored: the format's schema must be a
        valid JSON schema; `effort` (how many tokens the model spends) and `task_budget` have nothing here that
        could follow them; and a prefill cannot stand before structured content (the JSON would have to continue
        its text), as on Anthropic's API."""
        config = self.output_config
        if config is None:
            return
        if config.effort not in (None, "high"):  # "high" is Anthropic's default: the neutral value, accepted
            raise Unsupported(
                "output_config.effort", "this model has no effort levels (max_tokens bounds its answer); leave it out"
            )
        if config.task_budget is not None:
            raise Unsupported("output_config.task_budget", "token budgets across contexts are not kept by this server")
        if config.format is not None:
            try:
                checked_schema(config.format.json_schema, FORMAT_SCHEMA)
            except GrammarError as exc:
                raise Unsupported(exc.param, str(exc)) from None
            if self.prefill() is not None:
                raise Unsupported(
                    "messages", "a final assistant turn (a prefill) cannot be combined with output_config.format"
                )

    def _check_tools(self) -> None:
        names = [t.name for t in self.tools or []]
        try:
            check_functions([(t.name, t.input_schema) for t in self.tools or []], "tools.{i}.input_schema")
        except GrammarError as exc:
            raise Unsupported(exc.param, str(exc)) from None
        choice = self.tool_choice
        if isinstance(choice, ToolChoiceAny | ToolChoiceTool) and not self.tools:
            raise Unsupported("tool_choice", f"{choice.type!r} needs tools to choose from")
        if isinstance(choice, ToolChoiceTool) and choice.name not in names:
            raise Unsupported("tool_choice", f"names a tool not in tools: {choice.name!r}")

    def _check_history(self) -> None:
        """Each tool_use id once, and each tool_result answering a tool_use before it; no call left in a prefill."""
        seen: set[str] = set()
        for i, message in enumerate(self.messages):
            for block in message.blocks():
                if isinstance(block, ToolUseBlock):
                    if block.id in seen:
                        raise Unsupported(f"messages.{i}", f"tool_use ids must be unique: {block.id!r} is repeated")
                    seen.add(block.id)
                elif isinstance(block, ToolResultBlock) and block.tool_use_id not in seen:
                    raise Unsupported(
                        f"messages.{i}", f"tool_result for {block.tool_use_id!r}, which no tool_use before it has"
                    )
        last = self.messages[-1]
        if last.role == "assistant" and any(isinstance(b, ToolUseBlock) for b in last.blocks()):
            raise Unsupported("messages", "a final assistant turn cannot hold tool_use blocks: send their results")

    def prefill(self) -> str | None:
        """The last turn's text when it is the assistant's: the answer continues it."""
        last = self.messages[-1]
        return _text(last.content) if last.role == "assistant" else None

    def chat(self) -> list[ChatMessage]:
        """The conversation as OpenAI-shaped chat messages, system first; a prefill is not among them (it follows
        the template as plain text)."""
        system = [] if self.system is None else [ChatMessage(role="system", content=_text(self.system))]
        turns = self.messages[:-1] if self.prefill() is not None else self.messages
        return system + [m for turn in turns for m in turn.chat()]

    def tool_dicts(self) -> list[dict[str, Any]] | None:
        """The tools the model is shown, as OpenAI function tools: none when tool_choice is `none`."""
        if not self.tools or isinstance(self.tool_choice, ToolChoiceNone):
            return None
        return [t.as_function() for t in self.tools]

    def forced_call(self) -> bool:
        """Whether the answer must be a call (`any`, or a named `tool`)."""
        return bool(self.tools) and isinstance(self.tool_choice, ToolChoiceAny | ToolChoiceTool)

    def parallel(self) -> bool:
        """Whether an answer may hold several calls (not with `disable_parallel_tool_use`)."""
        return not (
            isinstance(self.tool_choice, ToolChoiceAuto | ToolChoiceAny | ToolChoiceTool)
            and self.tool_choice.disable_parallel_tool_use
        )

    def call_rules(self) -> CallRules | None:
        """How the answer splits into text and tool_use blocks (one at most with `disable_parallel_tool_use`):
        None when no tools are shown."""
        return CallRules.of(self.tool_dicts(), self.parallel(), self.forced_call())

    def format_schema(self) -> dict[str, Any] | None:
        """The JSON schema `output_config.format` holds the answer's text to, or None for free text."""
        fmt = self.output_config.format if self.output_config is not None else None
        return None if fmt is None else fmt.json_schema

    def grammar(self) -> tuple[str, str] | None:
        """(grammar text, the field it comes from) when the answer is constrained, by chat completions' rules: a
        forced call's grammar (one call block, to the named tool or any, whose input follows its schema; the
        format shapes text, which such an answer has none of); with `auto` beside a format, calls or text in that
        format; else the format's; None for free text."""
        tools, forced, schema = self.tool_dicts(), self.forced_call(), self.format_schema()
        name = self.tool_choice.name if isinstance(self.tool_choice, ToolChoiceTool) else None
        try:
            content = checked_schema(schema, FORMAT_SCHEMA) if schema is not None and tools and not forced else None
            grammar = tools_grammar(tools, forced, name, content, parallel=self.parallel())
            if grammar is not None:
                return grammar, "tools"
            return None if schema is None else (json_schema_grammar(schema, FORMAT_SCHEMA), FORMAT_SCHEMA)
        except GrammarError as exc:
            raise Unsupported(exc.param, str(exc)) from None  # json_schema_grammar names FORMAT_SCHEMA, as asked


# Anthropic's defaults, where neither the request nor the model's generation config sets a field.
_DIALECT_DEFAULTS = {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0, "repetition_penalty": 1.0}

StopSequence = Annotated[str, Field(min_length=1, max_length=MAX_STOP_LENGTH)]


class MessagesRequest(Conversation):
    max_tokens: int = Field(..., ge=1)
    stop_sequences: list[StopSequence] | None = Field(None, max_length=MAX_STOP_STRINGS)
    # Left out (None): the model's generation-config defaults, else Anthropic's own (temperature 1, no top-p or
    # top-k).
    temperature: float | None = Field(None, ge=0.0, le=1.0, allow_inf_nan=False)
    top_p: float | None = Field(None, gt=0.0, le=1.0, allow_inf_nan=False)
    top_k: int | None = Field(None, ge=0, description="Keep the k most likely tokens; 0 disables it.")
    metadata: Metadata | None = None
    stream: bool = False
    service_tier: Literal["auto", "standard_only"] | None = None
    # A server-held conversation (the beta's message threads): refused by the route, with what to do instead.
    thread: dict[str, Any] | None = None

    @field_validator("max_tokens")
    @classmethod
    def _max_tokens_cap(cls, value: int) -> int | None:
        return at_most(value, "max_new_tokens")

    def sampling_params(self, model_defaults: dict[str, float]) -> SamplingParams:
        values = resolve_sampling(self, model_defaults, _DIALECT_DEFAULTS)
        return SamplingParams(max_new_tokens=self.max_tokens, **values)

    def stops(self) -> Stops:
        """Stop sequences end the text, never a call: inside a `<tool_call>` block none matches (it could only cut
        the call, its markup leaking into the text). A forced call is the whole answer: none applies. Text in an
        `output_config.format` is text: stop sequences apply to it as chat completions' `stop` applies beside a
        `response_format` (a stop sequence, like max_tokens, may cut its JSON, and stop_reason says so)."""
        if self.forced_call():
            return Stops()
        stops = Stops(tuple(self.stop_sequences or ()))
        return dataclasses.replace(stops, shielded=(OPEN, CLOSE)) if self.tool_dicts() else stops


StopReason = Literal["end_turn", "max_tokens", "stop_sequence", "tool_use"]


def stop_reason(result: Completion) -> StopReason:
    if result.finish_reason == "length":
        return "max_tokens"
    return "stop_sequence" if result.stop_string is not None else "end_turn"


def message_object(
    message_id: str,
    model: str,
    content: list[dict[str, Any]],
    reason: StopReason | None,
    stop: str | None,
    usage: dict[str, int],
) -> dict[str, Any]:
    """A Message; the empty `content` is what a stream starts with."""
    return {
        "id": message_id,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": reason,
        "stop_sequence": stop,
        "usage": usage,
    }
