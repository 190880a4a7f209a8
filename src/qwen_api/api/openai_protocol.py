"""OpenAI-compatible schemas: /v1/chat/completions, /v1/completions, /v1/models, and OpenAI's error shape.

Requests accept what the official SDK sends. A parameter the engine cannot honour is refused with a 400
that names it (`Unsupported`), never silently ignored: suffix, best_of other than n. Unknown fields are
refused the same way. Sampling fields a request leaves out take the checkpoint's generation-config defaults where
it has them, else OpenAI's; `top_k`, `min_p` and `repetition_penalty` are extensions (as in vLLM).
`response_format` (JSON object or JSON schema) and tools are enforced with a grammar while decoding
(qwen_api.structured).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, ValidationInfo, field_validator, model_validator
from pydantic_core import PydanticCustomError

from qwen_api.api.schema import (
    RequestModel,
    at_most,
    bias_pairs,
    checked_logit_bias,
    resolve_sampling,
    server_cap,
)
from qwen_api.detokenize import Stops
from qwen_api.engine.base import SamplingParams
from qwen_api.structured.grammar import (
    GrammarError,
    response_format_grammar,
    response_format_schema,
    vllm_grammar,
)
from qwen_api.structured.tools import CLOSE, OPEN, CallRules, check_functions, tools_grammar

MAX_STOP_STRINGS = 8
MAX_STOP_LENGTH = 256
MAX_STOP_TOKEN_IDS = 64  # vLLM's stop_token_ids in one request
MAX_LOGIT_BIAS = 300  # entries in one request's logit_bias (OpenAI's own limit)
MAX_BAD_WORDS = 64
MAX_ALLOWED_IDS = 16384  # vLLM's allowed_token_ids in one request
MAX_PROMPT_LOGPROBS = 20  # alternatives per prompt token (vLLM's default --max-logprobs)
MAX_CACHE_SALT = 1024  # characters of a cache salt (vLLM suggests 43: 256 random bits in base64)
# OpenAI's defaults, for what neither the request nor the model's generation config sets.
_DIALECT_DEFAULTS: dict[str, Any] = {
    "temperature": 1.0,
    "top_p": 1.0,
    "top_k": 0,
    "min_p": 0.0,
    "repetition_penalty": 1.0,
    "presence_penalty": 0.0,
    "frequency_penalty": 0.0,
}


class Unsupported(ValueError):
    """A parameter this server cannot honour was set to a value other than its neutral one."""

    def __init__(self, param: str, why: str) -> None:
        self.param = param
        super().__init__(f"{param}: {why}")


class _OpenAIRequest(RequestModel):
    null_means_default = True


class TextPart(_OpenAIRequest):
    type: Literal["text"]
    text: str


class FunctionCall(_OpenAIRequest):
    name: str = Field(..., min_length=1)
    arguments: str
    # What the SDK's parse helpers add to a call they return, which goes back in the history as it came.
    parsed_arguments: Any = None

    @field_validator("arguments")
    @classmethod
    def _json_text(cls, arguments: str) -> str:
        """A call in the history goes back to the model as its JSON: the arguments must be JSON text. Empty means
        no arguments (`{}`), as vLLM reads it."""
        if not arguments.strip():
            return "{}"
        try:
            json.loads(arguments)
        except ValueError:
            raise ValueError("a tool call's arguments must be JSON text (a JSON object)") from None
        return arguments


class ToolCall(_OpenAIRequest):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall
    index: int | None = None  # accepted, not used: the SDK's stream helper leaves it on the calls it returns


class ChatMessage(_OpenAIRequest):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    refusal: str | None = None
    # What the official SDK leaves on an answer's message (its parse helper's `parsed`, `annotations`), which an
    # agent appends to the history as it came: accepted, not read.
    parsed: Any = None
    annotations: list[Any] | None = None

    @model_validator(mode="after")
    def _shape(self) -> ChatMessage:
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a message with role 'tool' needs its tool_call_id")
        if self.tool_calls and self.role != "assistant":
            raise ValueError("only assistant messages carry tool_calls")
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError("content is required (it may be null only on an assistant message with tool_calls)")
        return self

    def text(self) -> str:
        """The message's text: a list of text parts joined by newlines, as vLLM renders them for a template."""
        if self.content is None:
            return ""
        return self.content if isinstance(self.content, str) else "\n".join(p.text for p in self.content)

    def as_dict(self) -> dict[str, Any]:
        role = "system" if self.role == "developer" else self.role
        out: dict[str, Any] = {"role": role, "content": self.text()}
        if self.tool_calls:
            out["tool_calls"] = [c.model_dump() for c in self.tool_calls]
        return out


# What rendering a chat sets itself: apply_chat_template's own parameters, and the variables (the tokenizer's special
# tokens) and functions it gives every template.
_SERVER_TEMPLATE_KEYS = frozenset(
    {
        "conversation", "messages", "tools", "documents", "chat_template", "add_generation_prompt",
        "continue_final_message", "tokenize", "sanitize_control_tokens", "padding", "truncation", "max_length",
        "return_tensors", "return_dict", "return_assistant_tokens_mask", "tokenizer_kwargs", "raise_exception",
        "strftime_now", "bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token",
        "additional_special_tokens",
    }
)  # fmt: skip


class ChatShaping(RequestModel):
    """vLLM's two fields that shape a chat's prompt, for every route that renders one from `messages` (chat
    completions, /tokenize): `continue_final_message` makes the answer continue the last message, an assistant's,
    with no new turn (a prefill, as Anthropic's last assistant turn is); `add_generation_prompt` false ends the
    prompt after the last message, without the assistant turn's opener."""

    add_generation_prompt: bool | None = None  # None: true, unless the final message is continued
    continue_final_message: bool = False
    # vLLM's: more variables for the chat template (e.g. Qwen3's `enable_thinking`); a template that does not read
    # one ignores it. Those the server sets itself are refused.
    chat_template_kwargs: dict[str, Any] | None = None

    def template_kwargs(self) -> dict[str, Any] | None:
        """`chat_template_kwargs`, once no key names what the server sets (`Unsupported`)."""
        for key in self.chat_template_kwargs or {}:
            if key in _SERVER_TEMPLATE_KEYS or not key.isidentifier():
                raise Unsupported("chat_template_kwargs", f"{key!r} is not a template variable a request may set")
        return self.chat_template_kwargs or None

    def shaped(self, messages: list[ChatMessage]) -> tuple[list[ChatMessage], bool, str | None]:
        """(the messages the template renders, whether it adds the assistant turn's opener, the text that follows
        it: the continued message's); `Unsupported` when they cannot go together."""
        if not self.continue_final_message:
            return messages, self.add_generation_prompt is not False, None
        if self.add_generation_prompt:
            raise Unsupported("continue_final_message", "cannot be true with add_generation_prompt true")
        last = messages[-1]
        if last.role != "assistant" or last.tool_calls or len(messages) < 2:
            raise Unsupported(
                "continue_final_message", "the last message must be an assistant's text, after at least one other"
            )
        return messages[:-1], True, last.text()


class FunctionDefinition(_OpenAIRequest):
    name: str = Field(..., min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_OpenAIRequest):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_OpenAIRequest):
    name: str


class NamedToolChoice(_OpenAIRequest):
    type: Literal["function"]
    function: NamedFunction


class StreamOptions(_OpenAIRequest):
    include_usage: bool = False
    # vLLM's: with include_usage, every chunk carries its choice's usage so far (benchmarks read exact counts so)
    continuous_usage_stats: bool = False


def token_bias(bias: dict[str, float] | None, vocab_size: int) -> tuple[tuple[int, float], ...]:
    """A route's `logit_bias` as (token id, bias) pairs (`schema.bias_pairs`); `Unsupported` where they cannot be."""
    try:
        return bias_pairs(bias, vocab_size)
    except ValueError as exc:
        raise Unsupported("logit_bias", str(exc)) from None


class _SamplingRequest(_OpenAIRequest):
    """Fields shared by chat and text completions. A field sent as null takes its default."""

    model: str
    # Sampling: None (left out) takes the model's default, else OpenAI's (see `sampling_params`).
    temperature: float | None = Field(None, ge=0.0, le=2.0, allow_inf_nan=False)
    top_p: float | None = Field(None, gt=0.0, le=1.0, allow_inf_nan=False)
    top_k: int | None = Field(None, ge=-1, description="Extension: keep the k most likely tokens; 0 or -1: all.")
    min_p: float | None = Field(None, ge=0.0, le=1.0, allow_inf_nan=False, description="Extension.")
    repetition_penalty: float | None = Field(
        None, gt=0.0, le=10.0, allow_inf_nan=False, description="Extension: > 1 discourages seen tokens."
    )
    n: int = Field(1, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(2**63), lt=2**64)
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0, allow_inf_nan=False)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0, allow_inf_nan=False)
    logit_bias: dict[str, float] | None = Field(None, max_length=MAX_LOGIT_BIAS)
    response_format: dict[str, Any] | None = None
    user: str | None = Field(None, max_length=256, description="Accepted for compatibility; not used.")
    # As on the Responses API: neutral here (no stored completions, one service tier, no prompt cache keys).
    metadata: dict[str, Annotated[str, Field(max_length=512)]] | None = Field(None, max_length=16)
    safety_identifier: str | None = Field(None, max_length=256, description="Accepted; not used.")
    prompt_cache_key: str | None = Field(None, max_length=256, description="Accepted; not used.")
    service_tier: Literal["auto", "default", "flex", "priority"] | None = None
    store: bool | None = None
    modalities: list[str] | None = None  # ["text"]: what every answer here is (audio is a 400)
    # vLLM's structured outputs, which its clients send in extra_body: one constraint, enforced as response_format
    # is (`structured.grammar.vllm_grammar`); the older guided_* fields too.
    structured_outputs: dict[str, Any] | None = None
    guided_json: dict[str, Any] | bool | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    guided_decoding_backend: str | None = Field(None, description="Accepted; the backend here is llguidance.")
    # vLLM's stop controls: tokens that end the answer, and whether the stop string or stop token that ended it stays
    # at the end of the text (as in vLLM, neither does by default).
    stop_token_ids: list[Annotated[int, Field(ge=0)]] | None = Field(None, max_length=MAX_STOP_TOKEN_IDS)
    include_stop_str_in_output: bool = False
    # vLLM's: false writes special tokens (`<|im_start|>`) as their text rather than leaving them out; spaces between
    # them: Qwen2's byte-level tokenizer writes none either way, as vLLM's fast detokenizer (accepted, no effect)
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    ignore_eos: bool = False  # vLLM's: the answer runs to its max_tokens (benchmarks use it)
    # vLLM's: no end token nor stop token before the answer has this many tokens, and no stop string ends before
    min_tokens: int = Field(0, ge=0)
    # vLLM's, for clients that work in tokens (RL and evaluation harnesses): the prompt's token ids and each choice's
    # (`prompt_token_ids`, `token_ids`); log-probability entries named "token_id:N" rather than by their text; and
    # the prompt's log-probabilities with this many alternatives each (`prompt_logprobs`, not streamed)
    return_token_ids: bool = False
    return_tokens_as_token_ids: bool = False
    prompt_logprobs: int | None = Field(None, ge=0, le=MAX_PROMPT_LOGPROBS)
    # vLLM's: only these token ids may be drawn (an answer of labels, a classifier's classes); not with a grammar
    allowed_token_ids: list[Annotated[int, Field(ge=0)]] | None = Field(None, min_length=1, max_length=MAX_ALLOWED_IDS)
    # vLLM's: words the answer may not produce, as the tokens they are written with (engine/bad_words.py)
    bad_words: list[Annotated[str, Field(min_length=1, max_length=MAX_STOP_LENGTH)]] | None = Field(
        None, max_length=MAX_BAD_WORDS
    )
    # vLLM's: keep only the prompt's last k tokens (-1: as many as leave the answer its max_tokens), a cut the client
    # asks for and sees
    truncate_prompt_tokens: int | None = Field(None, ge=-1)
    # vLLM's: its id in the answer's (`chatcmpl-<request_id>`); and a scheduling priority, of which this server has one
    request_id: str | None = Field(None, min_length=1, max_length=512)
    priority: int = 0
    # vLLM's: the answer's prompt shares cached blocks only with requests of the same salt, a tenant's secret
    # (`SamplingParams.cache_salt`)
    cache_salt: str | None = Field(None, min_length=1, max_length=MAX_CACHE_SALT)

    @field_validator("stop")
    @classmethod
    def _bounded_stops(cls, stop: str | list[str] | None) -> str | list[str] | None:
        stops = [stop] if isinstance(stop, str) else stop or []
        if len(stops) > MAX_STOP_STRINGS or any(len(s) > MAX_STOP_LENGTH for s in stops):
            raise ValueError(f"at most {MAX_STOP_STRINGS} strings of at most {MAX_STOP_LENGTH} characters")
        if not all(stops):  # vLLM's rule, and /v1/messages' (it was dropped without a word)
            raise ValueError("stop cannot contain an empty string")
        return stop

    @field_validator("n")
    @classmethod
    def _choices_cap(cls, n: int) -> int | None:
        return at_most(n, "max_choices")

    @field_validator("logit_bias")
    @classmethod
    def _bias_entries(cls, bias: dict[str, float] | None) -> dict[str, float] | None:
        return checked_logit_bias(bias)

    def stops(self) -> Stops:
        strings = () if self.stop is None else (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        return Stops(
            strings,
            include=self.include_stop_str_in_output,
            token_ids=frozenset(self.stop_token_ids or ()),
            special_text=not self.skip_special_tokens,
        )

    def check_supported(self) -> None:
        if self.stream_options is not None and not self.stream:
            raise Unsupported("stream_options", "only allowed when stream is true")
        if self.store:
            raise Unsupported("store", "this server keeps no completions: send store false or leave it out")
        if self.truncate_prompt_tokens == 0:
            raise Unsupported("truncate_prompt_tokens", "0 keeps no token: give at least 1, or -1 for the context")
        if self.allowed_token_ids and self.grammar() is not None:  # their meet could be empty: nothing drawable
            raise Unsupported("allowed_token_ids", "cannot be combined with structured outputs or required tools")
        if self.bad_words and self.grammar() is not None:  # one constraint per sequence: the grammar's
            raise Unsupported("bad_words", "cannot be combined with structured outputs or required tools")
        if self.bad_words and self.allowed_token_ids:  # they could ban every allowed id: nothing drawable
            raise Unsupported("bad_words", "cannot be combined with allowed_token_ids")
        if self.priority != 0:
            raise Unsupported("priority", "requests are served first come, first served here: send 0 or leave it out")
        if self.modalities is not None and self.modalities != ["text"]:
            raise Unsupported("modalities", 'this model answers in text only: send ["text"] or leave it out')
        if self.prompt_logprobs is not None and self.stream:  # as vLLM: they would all come before the first token
            raise Unsupported("prompt_logprobs", "not available when streaming: send stream false")

    def vllm_constraint(self) -> tuple[dict[str, Any], str] | None:
        """vLLM's structured outputs as (its spec, the field it came in), or None: `structured_outputs`, or one of
        the older `guided_*` fields (never both, nor two of those)."""
        legacy = {
            kind: value
            for kind, value in (
                ("json", self.guided_json),
                ("regex", self.guided_regex),
                ("choice", self.guided_choice),
                ("grammar", self.guided_grammar),
            )
            if value is not None
        }
        if len(legacy) > 1 or (legacy and self.structured_outputs is not None):
            given = [f"guided_{k}" for k in legacy] + (["structured_outputs"] if self.structured_outputs else [])
            raise Unsupported(given[-1], f"give one constraint, not {given}")
        if self.structured_outputs is not None:
            return self.structured_outputs, "structured_outputs"
        return next(((legacy, f"guided_{kind}") for kind in legacy), None)

    def grammar(self) -> tuple[str, str] | None:
        """(grammar text, the field it comes from) when the output is constrained: `response_format`'s, or vLLM's
        structured outputs' (one of them); `Unsupported` if it cannot be."""
        vllm = self.vllm_constraint()
        try:
            grammar = response_format_grammar(self.response_format)
            if vllm is not None:
                spec, param = vllm
                if grammar is not None:
                    raise GrammarError("give one constraint: response_format or vLLM's structured outputs", param)
                # a grammar that fails to compile is named as its field: `structured_outputs.regex`, `guided_regex`
                return vllm_grammar(spec, param, nested=param == "structured_outputs")
        except GrammarError as exc:
            raise Unsupported(exc.param, str(exc)) from None
        return None if grammar is None else (grammar, "response_format")

    def truncated(self, ids: list[int], context: int) -> list[int]:
        """The prompt's ids as `truncate_prompt_tokens` asks: its last k (-1: as many as leave the answer its
        `max_tokens` in the context, at least one), else all. A k that still leaves the answer no room is a 400
        naming the field, as vLLM's."""
        if (k := self.truncate_prompt_tokens) is None:
            return ids
        room = context - max(self.requested_max_tokens() or 1, 1)
        keep = room if k == -1 else k
        if keep > room and len(ids) > room:
            raise Unsupported(
                "truncate_prompt_tokens",
                f"{k} prompt tokens leave no room for {self.requested_max_tokens() or 1} new ones in the context of"
                f" {context}: at most {max(room, 0)}",
            )
        return ids[-keep:] if 0 < keep < len(ids) else ids

    def requested_max_tokens(self) -> int | None:
        """The most new tokens the request asks for, None when it leaves that to the server."""
        raise NotImplementedError

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def continuous_usage(self) -> bool:
        """Whether each chunk carries its choice's usage so far (vLLM's `continuous_usage_stats`)."""
        return self.include_usage() and bool(self.stream_options and self.stream_options.continuous_usage_stats)

    def logprobs_wanted(self) -> int | None:
        """None when no log-probabilities are asked for, else how many alternatives each token lists."""
        return None

    def prompt_logprobs_wanted(self) -> int | None:
        """As `logprobs_wanted`, for the prompt's tokens (vLLM's `prompt_logprobs`, completions' `echo`)."""
        return self.prompt_logprobs

    def sampling_params(self, max_new_tokens: int, model_defaults: dict[str, float], vocab_size: int) -> SamplingParams:
        """The engine's parameters: set fields, else the model's defaults, else OpenAI's."""
        values = resolve_sampling(self, model_defaults, _DIALECT_DEFAULTS)
        if outside := [t for t in self.stop_token_ids or () if t >= vocab_size]:  # it could never end the answer
            raise Unsupported("stop_token_ids", f"token id {outside[0]} is outside this model's vocabulary")
        if outside := [t for t in self.allowed_token_ids or () if t >= vocab_size]:
            raise Unsupported("allowed_token_ids", f"token id {outside[0]} is outside this model's vocabulary")
        if self.min_tokens > max_new_tokens:
            raise Unsupported(
                "min_tokens", f"{self.min_tokens} is more than the {max_new_tokens} tokens this answer may have"
            )
        return SamplingParams(
            max_new_tokens=max_new_tokens,
            temperature=float(values["temperature"]),
            top_p=float(values["top_p"]),
            top_k=max(int(values["top_k"]), 0),
            min_p=float(values["min_p"]),
            repetition_penalty=float(values["repetition_penalty"]),
            presence_penalty=float(values["presence_penalty"]),
            frequency_penalty=float(values["frequency_penalty"]),
            logit_bias=token_bias(self.logit_bias, vocab_size),
            allowed_ids=tuple(sorted(set(self.allowed_token_ids or ()))),
            seed=self.seed,
            logprobs=self.logprobs_wanted(),
            ignore_eos=self.ignore_eos,
            min_tokens=self.min_tokens,
            held_ids=tuple(self.stop_token_ids or ()),
            prompt_logprobs=self.prompt_logprobs_wanted(),
            cache_salt=self.cache_salt,
        )


class ChatCompletionRequest(_SamplingRequest, ChatShaping):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    echo: bool = False  # vLLM's: the answer's content starts with the last message's, when that is an assistant's

    def echoed(self) -> str | None:
        """With `echo`, the text the answer's content repeats first: the last message's, when that is an
        assistant's text (the turn the answer continues or follows, as vLLM's echo reads it); else None."""
        last = self.messages[-1]
        return last.text() or None if self.echo and last.role == "assistant" and not last.tool_calls else None

    def check_supported(self) -> None:
        super().check_supported()
        if self.top_logprobs is not None and not self.logprobs:
            raise Unsupported("top_logprobs", "needs logprobs set to true")
        names = [t.function.name for t in self.tools or []]
        try:
            functions = [(t.function.name, t.function.parameters) for t in self.tools or []]
            check_functions(functions, "tools.{i}.function.parameters")
        except GrammarError as exc:
            raise Unsupported(exc.param, str(exc)) from None
        if self.tool_dicts() and (vllm := self.vllm_constraint()) is not None:
            raise Unsupported(vllm[1], "vLLM's structured outputs shape content: send them without tools")
        if self.tool_choice not in (None, "none", "auto") and not self.tools:
            raise Unsupported("tool_choice", "a tool must be given in tools to require a call")
        if isinstance(self.tool_choice, NamedToolChoice) and self.tool_choice.function.name not in names:
            raise Unsupported("tool_choice", f"names a function not in tools: {self.tool_choice.function.name!r}")
        if self.shaped(self.messages)[2] is not None and self.grammar() is not None:
            raise Unsupported(
                "continue_final_message", "a continued message cannot be held to a grammar (structured outputs, tools)"
            )

    def logprobs_wanted(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def tool_dicts(self) -> list[dict[str, Any]] | None:
        """The tools the model is shown: none when tool_choice is 'none'."""
        if not self.tools or self.tool_choice == "none":
            return None
        return [t.model_dump(exclude_none=True) for t in self.tools]

    def call_rules(self) -> CallRules | None:
        """How the answer splits into text and calls: None when no tools are shown."""
        return CallRules.of(self.tool_dicts(), self.parallel_tool_calls is not False, self.forced_call())

    def forced_call(self) -> bool:
        """Whether the answer must be one tool call (`required`, or a named function)."""
        return bool(self.tool_dicts()) and (
            self.tool_choice == "required" or isinstance(self.tool_choice, NamedToolChoice)
        )

    def stops(self) -> Stops:
        """Stop strings apply to content, never inside a call block, where one could only cut the call (its
        markup would leak into the content). A forced call is the whole answer, one grammar-bound call block: none
        applies."""
        if self.forced_call():
            return Stops()
        stops = super().stops()
        return dataclasses.replace(stops, shielded=(OPEN, CLOSE)) if self.tool_dicts() else stops

    def grammar(self) -> tuple[str, str] | None:
        """A forced call's grammar (`response_format` shapes content, which a call has none of); with `auto`
        beside a `response_format`, calls or content in that format; else `response_format`'s."""
        tools, forced = self.tool_dicts(), self.forced_call()
        name = self.tool_choice.function.name if isinstance(self.tool_choice, NamedToolChoice) else None
        try:
            content = response_format_schema(self.response_format) if tools and not forced else None
            grammar = tools_grammar(tools, forced, name, content, parallel=self.parallel_tool_calls is not False)
        except GrammarError as exc:
            raise Unsupported(exc.param, str(exc)) from None
        return (grammar, "tools") if grammar is not None else super().grammar()

    @field_validator("max_tokens", "max_completion_tokens")
    @classmethod
    def _max_tokens_cap(cls, value: int | None) -> int | None:
        return at_most(value, "max_new_tokens")

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]


class CompletionRequest(_SamplingRequest):
    # An empty string is no validation error: like `[""]`, it tokenises to no tokens and is the 400 `empty_prompt`
    # (README). An empty list holds no prompt at all. A prompt may also be token ids (as OpenAI's and vLLM's: what
    # lm-eval sends), or a list of those.
    prompt: str | Annotated[list[str], Field(min_length=1)] | TokenIds | Annotated[list[TokenIds], Field(min_length=1)]
    echo: bool = False  # before max_tokens, whose check reads it
    max_tokens: int | None = Field(16, ge=0)  # 0: with echo, the prompt's log-probabilities alone
    logprobs: int | None = Field(None, ge=0, le=5)
    suffix: str | None = None
    best_of: int | None = None

    def check_supported(self) -> None:
        super().check_supported()
        sequences, limit = len(self.prompts()) * self.n, server_cap("max_sequences")
        if limit is not None and sequences > limit:  # past what admission could ever take: never a "retry" 429
            raise Unsupported("prompt", f"{sequences} sequences (prompts times n): at most {limit} on this server")
        if self.suffix:
            raise Unsupported("suffix", "insertion is not supported")
        if self.best_of not in (None, self.n):
            raise Unsupported("best_of", "only best_of equal to n is supported")

    def logprobs_wanted(self) -> int | None:
        return self.logprobs

    def prompt_logprobs_wanted(self) -> int | None:
        """The most alternatives either wants: vLLM's `prompt_logprobs`, or an echoed prompt's `logprobs`."""
        wanted = [k for k in (self.prompt_logprobs, self.logprobs if self.echo else None) if k is not None]
        return max(wanted, default=None)

    def prompts(self) -> list[str | list[int]]:
        """Each prompt: text, or token ids."""
        if isinstance(self.prompt, str) or isinstance(self.prompt[0], int):
            return [self.prompt]
        return list(self.prompt)

    @field_validator("max_tokens")
    @classmethod
    def _max_tokens_cap(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value == 0 and not info.data.get("echo"):  # a custom error: pydantic would prefix "Value error, "
            raise PydanticCustomError(
                "echo_only", "0 only with echo (the prompt, and its log-probabilities with logprobs)"
            )
        return at_most(value, "max_new_tokens")

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return Usage(
        prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, total_tokens=prompt_tokens + completion_tokens
    ).model_dump()


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    """OpenAI's error shape."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}
