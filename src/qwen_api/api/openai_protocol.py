"""OpenAI-compatible schemas: /v1/chat/completions, /v1/completions, /v1/models, and OpenAI's error shape.

Requests accept what the official SDK sends. A parameter the engine cannot honour is refused with a 400
that names it (`Unsupported`), never silently ignored: penalties other than 0, logprobs, tools, logit_bias,
echo, suffix, best_of other than n, non-text response formats. Unknown fields are refused the same way.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator

from qwen_api.api.schema import RequestModel
from qwen_api.engine.base import SamplingParams

MAX_STOP_STRINGS = 8
MAX_STOP_LENGTH = 256


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


class ChatMessage(_OpenAIRequest):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class StreamOptions(_OpenAIRequest):
    include_usage: bool = False


class _SamplingRequest(_OpenAIRequest):
    """Fields shared by chat and text completions. A field sent as null takes its default."""

    model: str
    temperature: float = Field(1.0, ge=0.0, le=2.0, allow_inf_nan=False)
    top_p: float = Field(1.0, gt=0.0, le=1.0, allow_inf_nan=False)
    top_k: int = Field(0, ge=-1, description="Extension: keep the k most likely tokens; 0 or -1 disables it.")
    n: int = Field(1, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(2**63), lt=2**64)
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0, allow_inf_nan=False)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0, allow_inf_nan=False)
    logit_bias: dict[str, float] | None = None
    user: str | None = Field(None, max_length=256, description="Accepted for compatibility; not used.")

    @field_validator("stop")
    @classmethod
    def _bounded_stops(cls, stop: str | list[str] | None) -> str | list[str] | None:
        stops = [stop] if isinstance(stop, str) else stop or []
        if len(stops) > MAX_STOP_STRINGS or any(len(s) > MAX_STOP_LENGTH for s in stops):
            raise ValueError(f"at most {MAX_STOP_STRINGS} strings of at most {MAX_STOP_LENGTH} characters")
        return stop

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def check_supported(self) -> None:
        if self.presence_penalty != 0:
            raise Unsupported("presence_penalty", "this server's engine does not apply penalties; use 0")
        if self.frequency_penalty != 0:
            raise Unsupported("frequency_penalty", "this server's engine does not apply penalties; use 0")
        if self.logit_bias:
            raise Unsupported("logit_bias", "not supported by this server")
        if self.stream_options is not None and not self.stream:
            raise Unsupported("stream_options", "only allowed when stream is true")

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def sampling_params(self, max_new_tokens: int) -> SamplingParams:
        return SamplingParams(
            max_new_tokens=max_new_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=max(self.top_k, 0),
            seed=self.seed,
        )


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = None
    response_format: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None

    def check_supported(self) -> None:
        super().check_supported()
        if self.logprobs or self.top_logprobs:
            raise Unsupported("logprobs", "log probabilities are not returned by this server")
        if self.tools or self.tool_choice not in (None, "none"):
            raise Unsupported("tools", "tool calling is not supported by this server")
        if self.response_format and self.response_format.get("type") != "text":
            raise Unsupported("response_format", "only {'type': 'text'} is supported")

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class CompletionRequest(_SamplingRequest):
    prompt: str | list[str] = Field(..., min_length=1)
    max_tokens: int | None = Field(16, ge=1)
    echo: bool = False
    logprobs: int | None = None
    suffix: str | None = None
    best_of: int | None = None

    def check_supported(self) -> None:
        super().check_supported()
        if self.echo:
            raise Unsupported("echo", "echoing the prompt is not supported")
        if self.logprobs is not None:
            raise Unsupported("logprobs", "log probabilities are not returned by this server")
        if self.suffix:
            raise Unsupported("suffix", "insertion is not supported")
        if self.best_of not in (None, self.n):
            raise Unsupported("best_of", "only best_of equal to n is supported")

    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)

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
