"""The base of every request body: what all dialects refuse before any route runs.

Unknown fields are refused (`extra="forbid"`) and types are not coerced (`strict=True`: `"5"` is no integer, `true`
no `n`, `"no"` no boolean); and text must be Unicode that can be encoded: JSON may escape a lone UTF-16 surrogate
(`"\\udfff"`), which no tokenizer can encode, so it is refused here with a 4xx naming the field instead of failing
deep inside the tokenizer. In the OpenAI-style dialects `null` means "the default", as OpenAI's SDKs expect.

The operator's caps (`--max-new-tokens-limit`, `--max-num-return-sequences`) are the schemas' own constraints too
(`at_most`): `ServerCaps.apply` makes them this request's, for the app that serves it, so an over-cap value fails
validation like any other out-of-range value, in the route's own error shape.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, field_validator, model_validator
from pydantic_core import PydanticCustomError


@dataclass(frozen=True)
class ServerCaps:
    """The operator's limits on one request (from Settings)."""

    max_new_tokens: int
    max_choices: int

    def apply(self, app: Any) -> Any:
        """ASGI middleware: requests to `app` are validated against these caps."""
        caps = self

        async def with_caps(scope: Any, receive: Any, send: Any) -> None:
            token = _CAPS.set(caps)
            try:
                await app(scope, receive, send)
            finally:
                _CAPS.reset(token)

        return with_caps


_CAPS: ContextVar[ServerCaps | None] = ContextVar("qwen_api_server_caps", default=None)


def at_most(value: int | None, cap: str) -> int | None:
    """A field validator's check of `value` against the serving app's cap named `cap` (a `ServerCaps` field)."""
    caps = _CAPS.get()
    if value is not None and caps is not None and value > (limit := getattr(caps, cap)):
        # A custom error, not ValueError: pydantic would prefix its message with "Value error, ".
        raise PydanticCustomError("server_cap", "must be at most {limit} on this server", {"limit": limit})
    return value


_SURROGATE = re.compile("[\ud800-\udfff]")


def _has_lone_surrogate(value: Any) -> bool:
    if isinstance(value, str):
        return _SURROGATE.search(value) is not None
    if isinstance(value, dict):
        return any(_has_lone_surrogate(k) or _has_lone_surrogate(v) for k, v in value.items())
    if isinstance(value, list | tuple):
        return any(_has_lone_surrogate(v) for v in value)
    return False


class RequestModel(BaseModel):
    """Strict, closed request schema with valid text."""

    model_config = ConfigDict(extra="forbid", strict=True)
    # OpenAI's SDKs send `null` for "not given" (temperature=None, n=None): where this is set, null means the default.
    null_means_default: ClassVar[bool] = False

    @model_validator(mode="before")
    @classmethod
    def _drop_nulls(cls, data: Any) -> Any:
        if cls.null_means_default and isinstance(data, dict):
            return {k: v for k, v in data.items() if v is not None}
        return data

    @field_validator("*", mode="before")
    @classmethod
    def _valid_unicode(cls, value: Any) -> Any:
        if _has_lone_surrogate(value):
            raise ValueError("holds a lone UTF-16 surrogate escape (\\ud800-\\udfff), which is not text")
        return value


def resolve_sampling(
    body: BaseModel, model_defaults: Mapping[str, float], dialect_defaults: Mapping[str, Any]
) -> dict[str, Any]:
    """The value of each sampling field in `dialect_defaults`: the request's where it set one, else the checkpoint's
    default where its generation config has one (`TextGenerator.sampling_defaults`), else the dialect's own.

    A field the dialect's schema lacks (top-k in Responses) is "left out" too, so it takes the model's default.
    """
    resolved = {}
    for name, fallback in dialect_defaults.items():
        value = getattr(body, name, None) if name in body.model_fields_set else None
        resolved[name] = model_defaults.get(name, fallback) if value is None else value
    return resolved
