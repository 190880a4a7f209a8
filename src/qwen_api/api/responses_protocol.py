"""Schemas of OpenAI's Responses API (`POST /v1/responses`), stateless, and the objects it answers with.

A request is a conversation (`input` as a string or items: messages, and an earlier answer's `function_call`
items with their `function_call_output`s, `instructions` as a system message) plus the sampling fields this server
honours: `max_output_tokens`, `temperature`, `top_p`, `stream`, structured outputs through `text.format`
(json_object or json_schema), and function tools (`tools`, `tool_choice`, `parallel_tool_calls`), which go to the
model as /v1/chat/completions gives them (structured/tools.py). Every field that would need state
(`previous_response_id`, `store`, `background`, `conversation`), built-in tools or reasoning is refused with a 400
that names it (`Unsupported`), never silently ignored; so is any field the schema does not know. `Response`
objects and stream events are built here as plain dicts.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Discriminator, Field, Tag, field_validator

from qwen_api.api.openai_protocol import (
    MAX_CACHE_SALT,
    MAX_LOGIT_BIAS,
    ChatMessage,
    FunctionCall,
    FunctionDefinition,
    ToolCall,
    Unsupported,
    token_bias,
)
from qwen_api.api.schema import RequestModel, at_most, checked_logit_bias, resolve_sampling
from qwen_api.engine.base import SamplingParams
from qwen_api.structured.grammar import GrammarError, response_format_grammar, response_format_schema
from qwen_api.structured.tools import CallRules, check_functions, tools_grammar

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


class FunctionCallItem(_Request):
    """A function call the model made, sent back as history (`input += response.output`)."""

    type: Literal["function_call"]
    call_id: str = Field(..., min_length=1)
    name: str = Field(..., min_length=1)
    arguments: str
    id: str | None = None
    status: Status | None = None

    @field_validator("arguments")
    @classmethod
    def _json_text(cls, arguments: str) -> str:
        """JSON text, as on chat completions (it goes back to the model as its JSON); empty means `{}`."""
        return FunctionCall._json_text(arguments)


class FunctionCallOutputItem(_Request):
    """The result of a function call, for the model to read: text, or text parts."""

    type: Literal["function_call_output"]
    call_id: str = Field(..., min_length=1)
    output: str | list[ContentPart]
    id: str | None = None
    status: Status | None = None

    def text(self) -> str:
        return self.output if isinstance(self.output, str) else "".join(p.text for p in self.output)


def _item_type(item: Any) -> Any:
    """An input item's kind: its `type`, `message` when it has none (an easy message, `{"role", "content"}`)."""
    return (item.get("type") or "message") if isinstance(item, dict) else getattr(item, "type", None)


InputItem = Annotated[
    Annotated[InputMessage, Tag("message")]
    | Annotated[FunctionCallItem, Tag("function_call")]
    | Annotated[FunctionCallOutputItem, Tag("function_call_output")],
    Discriminator(_item_type),
]


class FunctionTool(FunctionDefinition):
    """A function tool, as the Responses API spells it: flat, `{"type": "function", "name", "description",
    "parameters", "strict"}` (chat completions nest the same fields under `function`)."""

    type: Literal["function"]

    def chat_dict(self) -> dict[str, Any]:
        """The tool as /v1/chat/completions has it, so the model sees the same tools block on both routes."""
        return {"type": "function", "function": self.model_dump(exclude={"type"}, exclude_none=True)}

    def echo(self) -> dict[str, Any]:
        return {"type": "function", **self.model_dump(exclude={"type"})}


class FunctionToolChoice(_Request):
    type: Literal["function"]
    name: str


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
    # Text or items: only the arm that the value's JSON type picks is tried, so an error names the field in it
    # (`input.1.arguments`), not the text arm's "Input should be a valid string" first.
    input: Annotated[
        Annotated[str, Field(min_length=1), Tag("text")]
        | Annotated[list[InputItem], Field(min_length=1), Tag("items")],
        Discriminator(lambda value: "text" if isinstance(value, str) else "items"),
    ]
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
    tools: list[FunctionTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | FunctionToolChoice | None = None
    parallel_tool_calls: bool | None = None
    truncation: Literal["auto", "disabled"] | None = None
    # Fields that would need state, built-in tools or reasoning: refused unless left at their neutral value.
    store: bool | None = None
    background: bool | None = None
    previous_response_id: str | None = None
    conversation: str | dict[str, Any] | None = None
    prompt: dict[str, Any] | None = None
    include: list[str] | None = None
    max_tool_calls: int | None = None
    reasoning: dict[str, Any] | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    # vLLM's extensions of this route: top-k sampling, a logit bias (as chat completions' and OpenAI's legacy one),
    # the response's id, and a cache salt (as chat completions')
    top_k: int | None = Field(None, ge=-1, description="Extension: keep the k most likely tokens; 0 or -1: all.")
    logit_bias: dict[str, float] | None = Field(None, max_length=MAX_LOGIT_BIAS)
    request_id: str | None = Field(None, min_length=1, max_length=512)
    cache_salt: str | None = Field(None, min_length=1, max_length=MAX_CACHE_SALT)

    @field_validator("logit_bias")
    @classmethod
    def _bias_entries(cls, bias: dict[str, float] | None) -> dict[str, float] | None:
        return checked_logit_bias(bias)

    @field_validator("max_output_tokens")
    @classmethod
    def _max_tokens_cap(cls, value: int | None) -> int | None:
        return at_most(value, "max_new_tokens")

    @field_validator("tools", mode="before")
    @classmethod
    def _function_tools(cls, tools: Any) -> Any:
        """Built-in tools (web search, file search, MCP, ...) need OpenAI's services: only functions are served."""
        for i, tool in enumerate(tools if isinstance(tools, list) else []):
            if isinstance(tool, dict) and tool.get("type") != "function":
                raise ValueError(f"only function tools are supported here; tool {i} has type {tool.get('type')!r}")
        return tools

    @field_validator("tool_choice", mode="before")
    @classmethod
    def _function_choice(cls, choice: Any) -> Any:
        if isinstance(choice, dict) and choice.get("type") != "function":
            raise ValueError(
                "'none', 'auto', 'required' or {'type': 'function', 'name': ...}; "
                f"built-in tool choices ({choice.get('type')!r}) are not supported here"
            )
        return choice

    def check_supported(self) -> None:
        refusals = [
            ("store", self.store, "this server keeps no responses: send store false or leave it out"),
            ("background", self.background, "background responses are not supported"),
            (
                "max_tool_calls",
                self.max_tool_calls,
                "it limits built-in tool calls; this server has function tools only",
            ),
            (
                "reasoning",
                self.reasoning and any(v is not None for v in self.reasoning.values()),
                "not a reasoning model",
            ),
        ]
        for param, value, why in refusals:
            if value:
                raise Unsupported(param, why)
        if other := [i for i in self.include or () if i != LOGPROBS]:
            raise Unsupported("include", f"only {LOGPROBS!r} is available here, not {other[0]!r}")
        if self.top_logprobs is not None and self.logprobs_wanted() is None:
            raise Unsupported("top_logprobs", f"needs include {LOGPROBS!r}")
        # These name stored state whatever their value: an empty id or object is no neutral value (null is).
        stored = [
            ("previous_response_id", self.previous_response_id, "this server keeps no responses: send the history"),
            ("conversation", self.conversation, "this server keeps no conversations: send the history"),
            ("prompt", self.prompt, "stored prompt templates are not supported"),
        ]
        for field, state, reason in stored:
            if state is not None:
                raise Unsupported(field, reason)
        self._check_tools()
        self._check_calls()
        if self.truncation == "auto":
            raise Unsupported("truncation", "inputs are never truncated here: use 'disabled'")
        self.grammar()  # an unknown or malformed text.format (or tools grammar) is a 400 naming it
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

    def _check_tools(self) -> None:
        """As on chat completions: distinct names, a forced choice needs a tool (a named one, that one), and every
        `parameters` is a valid JSON schema of an object (`check_functions`)."""
        names = [t.name for t in self.tools or []]
        try:
            check_functions([(t.name, t.parameters) for t in self.tools or []], "tools.{i}.parameters")
        except GrammarError as exc:
            raise Unsupported(exc.param, str(exc)) from None
        if self.tool_choice not in (None, "none", "auto") and not self.tools:
            raise Unsupported("tool_choice", "a tool must be given in tools to require a call")
        if isinstance(self.tool_choice, FunctionToolChoice) and self.tool_choice.name not in names:
            raise Unsupported("tool_choice", f"names a function not in tools: {self.tool_choice.name!r}")

    def _check_calls(self) -> None:
        """Each `function_call` has its own `call_id`, and every `function_call_output` answers one before it."""
        called: set[str] = set()
        for i, item in enumerate(self.input if isinstance(self.input, list) else []):
            if isinstance(item, FunctionCallItem):
                if item.call_id in called:
                    raise Unsupported(f"input.{i}.call_id", f"{item.call_id!r} names an earlier function_call too")
                called.add(item.call_id)
            elif isinstance(item, FunctionCallOutputItem) and item.call_id not in called:
                raise Unsupported(f"input.{i}.call_id", f"{item.call_id!r} answers no function_call before it")

    def tool_dicts(self) -> list[dict[str, Any]] | None:
        """The tools the model is shown, in chat completions' shape: none when tool_choice is 'none'."""
        if not self.tools or self.tool_choice == "none":
            return None
        return [t.chat_dict() for t in self.tools]

    def call_rules(self) -> CallRules | None:
        """How the answer splits into text and `function_call` items: None when no tools are shown."""
        return CallRules.of(self.tool_dicts(), self.parallel_tool_calls is not False, self.forced_call())

    def forced_call(self) -> bool:
        """Whether the answer must be one function call (`required`, or a named function)."""
        return bool(self.tool_dicts()) and (
            self.tool_choice == "required" or isinstance(self.tool_choice, FunctionToolChoice)
        )

    def _chat_format(self) -> dict[str, Any]:
        """`text.format` in chat completions' `response_format` shape, which nests json_schema's fields."""
        fmt = self.text_format()
        if fmt.get("type") == "json_schema":
            if "schema" not in fmt:  # optional on chat completions, required here (as OpenAI's Responses API)
                raise Unsupported("text.format", "json_schema needs a 'name' and a 'schema'")
            return {"type": "json_schema", "json_schema": {k: v for k, v in fmt.items() if k != "type"}}
        return fmt

    def grammar(self) -> tuple[str, str] | None:
        """(grammar text, the field it comes from) when the output is constrained: a forced call's grammar (the
        call's arguments follow its `parameters`); with `auto` beside a `text.format`, calls or content in that
        format; else the format's (json_object, or json_schema with its `name`, `schema`, `strict` and
        `description` at the top level, as the Responses API has them); None for plain text."""
        tools, fmt, forced = self.tool_dicts(), self._chat_format(), self.forced_call()
        name = self.tool_choice.name if isinstance(self.tool_choice, FunctionToolChoice) else None
        try:
            content = response_format_schema(fmt) if tools and not forced else None
            grammar = tools_grammar(tools, forced, name, content, parallel=self.parallel_tool_calls is not False)
            if grammar is not None:
                return grammar, "tools"
            grammar = response_format_grammar(fmt)
        except GrammarError as exc:
            raise Unsupported("text.format" if exc.param == "response_format" else exc.param, str(exc)) from None
        return None if grammar is None else (grammar, "text.format")

    def chat_history(self) -> list[ChatMessage]:
        """The conversation as chat completions' messages: `instructions` first, as a system message; consecutive
        function calls (and the assistant text before them) one assistant turn with `tool_calls`; each
        function_call_output a `tool` message. /v1/chat/completions renders them from there."""
        chat = [ChatMessage(role="system", content=self.instructions)] if self.instructions is not None else []
        if isinstance(self.input, str):
            return [*chat, ChatMessage(role="user", content=self.input)]
        for item in self.input:
            if isinstance(item, InputMessage):
                chat.append(ChatMessage(role=item.role, content=item.text()))
            elif isinstance(item, FunctionCallItem):
                call = ToolCall(id=item.call_id, function=FunctionCall(name=item.name, arguments=item.arguments))
                if chat and chat[-1].role == "assistant":  # the same turn: its text, then its calls
                    last = chat[-1]
                    chat[-1] = last.model_copy(update={"tool_calls": [*(last.tool_calls or []), call]})
                else:
                    chat.append(ChatMessage(role="assistant", content=None, tool_calls=[call]))
            else:
                chat.append(ChatMessage(role="tool", content=item.text(), tool_call_id=item.call_id))
        return chat

    def logprobs_wanted(self) -> int | None:
        """How many alternatives each output token's log-probability lists, when `include` asks for them."""
        return (self.top_logprobs or 0) if LOGPROBS in (self.include or ()) else None

    def sampling_params(self, max_new_tokens: int, model_defaults: dict[str, float], vocab_size: int) -> SamplingParams:
        """What the request sets, else the model's generation-config defaults, else OpenAI's."""
        values = resolve_sampling(self, model_defaults, _DIALECT_DEFAULTS)
        values["top_k"] = max(int(values["top_k"]), 0)  # -1: off, as 0
        return SamplingParams(
            max_new_tokens=max_new_tokens,
            logprobs=self.logprobs_wanted(),
            logit_bias=token_bias(self.logit_bias, vocab_size),
            cache_salt=self.cache_salt,
            **values,
        )


# The one `include` this server can honour: the output text's log-probabilities (as chat completions' `logprobs`).
LOGPROBS = "message.output_text.logprobs"


def text_part(text: str, logprobs: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": logprobs or []}


def message_item(item_id: str, status: Status, parts: list[dict[str, Any]]) -> dict[str, Any]:
    return {"id": item_id, "type": "message", "role": "assistant", "status": status, "content": parts}


def function_call_item(
    item_id: str, call: dict[str, Any], status: Status, arguments: str | None = None
) -> dict[str, Any]:
    """A `function_call` output item from a parsed call (structured/tools.py's chat shape, its id `call_...`);
    `arguments` instead of the call's own (a stream's first event has them empty)."""
    function = call["function"]
    args = function["arguments"] if arguments is None else arguments
    return {
        "id": item_id,
        "type": "function_call",
        "status": status,
        "call_id": call["id"],
        "name": function["name"],
        "arguments": args,
    }


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
        "top_logprobs": body.top_logprobs,
        "tool_choice": _tool_choice(body),
        "tools": [t.echo() for t in body.tools or []],
        "truncation": "disabled",
        "usage": usage_,
        "user": body.user,
        "metadata": body.metadata or {},
        "service_tier": "default",
    }


def _tool_choice(body: ResponsesRequest) -> str | dict[str, Any]:
    if isinstance(body.tool_choice, FunctionToolChoice):
        return body.tool_choice.model_dump()
    return body.tool_choice or "auto"
