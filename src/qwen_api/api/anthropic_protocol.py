"""Schemas of Anthropic's Messages API (`POST /v1/messages`, `POST /v1/messages/count_tokens`) and its answers.

A request is a conversation (`system` as a string or text blocks, `messages` of user and assistant turns with
string or text-block content) plus what this server honours: `max_tokens` (required), `stop_sequences`,
`temperature` (0-1, Anthropic's range), `top_p`, `top_k`, `metadata`, `stream`. A last assistant turn is a
prefill: the answer continues it, as Anthropic's does. Tools, extended thinking, non-text blocks and unknown
fields are refused with a 400 that names them; limits live in the fields, so a value out of range is a 400 in
Anthropic's error shape (the app's handlers pick the shape from the path).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, field_validator

from qwen_api.api.openai_protocol import MAX_STOP_LENGTH, MAX_STOP_STRINGS, Unsupported
from qwen_api.api.schema import RequestModel, at_most, resolve_sampling
from qwen_api.engine.base import SamplingParams
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


def _text(content: str | list[TextBlock]) -> str:
    return content if isinstance(content, str) else "".join(b.text for b in content)


class InputMessage(_Request):
    role: Literal["user", "assistant"]
    content: str | list[TextBlock]


class Metadata(_Request):
    user_id: str | None = Field(None, max_length=256, description="Accepted for compatibility; not used.")


class Conversation(_Request):
    """What both routes read: the model, the system prompt and the turns (count_tokens takes no more)."""

    model: str
    messages: list[InputMessage] = Field(..., min_length=1)
    system: str | list[TextBlock] | None = None
    cache_control: CacheControl | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: dict[str, Any] | None = None
    thinking: dict[str, Any] | None = None

    def check_supported(self) -> None:
        if self.tools:
            raise Unsupported("tools", "tool use is not supported by this server")
        if self.tool_choice is not None and self.tool_choice.get("type") != "none":
            raise Unsupported("tool_choice", "tool use is not supported by this server")
        if self.thinking is not None and self.thinking.get("type") != "disabled":
            raise Unsupported("thinking", "extended thinking is not supported by this model")
        prefill = self.prefill()
        if prefill is not None and len(self.messages) == 1:
            raise Unsupported("messages", "an assistant prefill needs a user turn before it")
        if prefill is not None and prefill != prefill.rstrip():
            raise Unsupported("messages", "final assistant content cannot end with trailing whitespace")

    def prefill(self) -> str | None:
        """The last turn's text when it is the assistant's: the answer continues it."""
        last = self.messages[-1]
        return _text(last.content) if last.role == "assistant" else None

    def chat_messages(self) -> list[dict[str, str]]:
        """The turns for the chat template, system first; a prefill is not among them (it follows the template)."""
        system = [] if self.system is None else [{"role": "system", "content": _text(self.system)}]
        turns = self.messages[:-1] if self.prefill() is not None else self.messages
        return system + [{"role": m.role, "content": _text(m.content)} for m in turns]


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

    @field_validator("max_tokens")
    @classmethod
    def _max_tokens_cap(cls, value: int) -> int | None:
        return at_most(value, "max_new_tokens")

    def sampling_params(self, model_defaults: dict[str, float]) -> SamplingParams:
        values = resolve_sampling(self, model_defaults, _DIALECT_DEFAULTS)
        return SamplingParams(max_new_tokens=self.max_tokens, **values)


StopReason = Literal["end_turn", "max_tokens", "stop_sequence"]


def stop_reason(result: Completion) -> StopReason:
    if result.finish_reason == "length":
        return "max_tokens"
    return "stop_sequence" if result.stop_string is not None else "end_turn"


def message_object(
    message_id: str, model: str, text: str | None, reason: StopReason | None, stop: str | None, usage: dict[str, int]
) -> dict[str, Any]:
    """A Message; `text` None gives the empty content a stream starts with."""
    return {
        "id": message_id,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [] if text is None else [{"type": "text", "text": text}],
        "stop_reason": reason,
        "stop_sequence": stop,
        "usage": usage,
    }
