"""The base of every request body: what all dialects refuse before any route runs.

Unknown fields are refused (`extra="forbid"`) and types are not coerced (`strict=True`: `"5"` is no integer, `true`
no `n`, `"no"` no boolean); and text must be Unicode that can be encoded: JSON may escape a lone UTF-16 surrogate
(`"\\udfff"`), which no tokenizer can encode, so it is refused here with a 4xx naming the field instead of failing
deep inside the tokenizer. Arrays and objects nested past `MAX_NESTING` levels are refused here too. In the
OpenAI-style dialects `null` means "the default", as OpenAI's SDKs expect.

The operator's caps (`--max-new-tokens-limit`, `--max-num-return-sequences`) are the schemas' own constraints too
(`at_most`): `ServerCaps.apply` makes them this request's, for the app that serves it, so an over-cap value fails
validation like any other out-of-range value, in the route's own error shape.
"""

from __future__ import annotations

import re
from collections import Counter
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
    max_sequences: int = 1 << 30  # sequences one request may ask for in all (a batch of prompts times n)

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


def server_cap(cap: str) -> int | None:
    """The serving app's cap named `cap` (a `ServerCaps` field), or None outside a request to one."""
    caps = _CAPS.get()
    return None if caps is None else int(getattr(caps, cap))


def at_most(value: int | None, cap: str) -> int | None:
    """A field validator's check of `value` against the serving app's cap named `cap` (a `ServerCaps` field)."""
    caps = _CAPS.get()
    if value is not None and caps is not None and value > (limit := getattr(caps, cap)):
        # A custom error, not ValueError: pydantic would prefix its message with "Value error, ".
        raise PydanticCustomError("server_cap", "must be at most {limit} on this server", {"limit": limit})
    return value


_SURROGATE = re.compile("[\ud800-\udfff]")
# Levels of arrays and objects one field may nest (a JSON schema 30 objects deep needs about 60). Deeper input is
# refused before anything walks it: the validators, jsonschema and the templates recurse, and past a few hundred
# levels Python's recursion limit made such a body a 500.
MAX_NESTING = 100


def _content_problem(value: Any) -> str | None:
    """Why `value` is not acceptable request content, or None: a lone UTF-16 surrogate in any string (key or value),
    or arrays and objects nested deeper than `MAX_NESTING`. Iterative, so no depth of input can exhaust the stack."""
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str):
            if _SURROGATE.search(item) is not None:
                return "holds a lone UTF-16 surrogate escape (\\ud800-\\udfff), which is not text"
        elif isinstance(item, dict | list | tuple):
            if depth >= MAX_NESTING:
                return f"nests arrays and objects deeper than {MAX_NESTING} levels"
            children = [x for pair in item.items() for x in pair] if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children)
    return None


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
    def _valid_content(cls, value: Any) -> Any:
        if (problem := _content_problem(value)) is not None:
            raise ValueError(problem)
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


def checked_logit_bias(bias: dict[str, float] | None) -> dict[str, float] | None:
    """A `logit_bias` field's own rule (OpenAI's): keys are token ids as decimal strings, biases within ±100.
    `ValueError` otherwise (a field validator's error)."""
    for key, value in (bias or {}).items():
        if not key.isascii() or not key.isdigit():
            raise ValueError(f"keys are token ids written as decimal strings; {key!r} is not one")
        if len(key) > 12:  # larger than any vocabulary; and int() refuses past 4,300 digits
            raise ValueError(f"token id {key[:12]}... ({len(key)} digits) is larger than any vocabulary")
        if not -100.0 <= value <= 100.0:
            raise ValueError(f"biases are between -100 and 100; token {key} has {value}")
    return bias


def bias_pairs(bias: dict[str, float] | None, vocab_size: int) -> tuple[tuple[int, float], ...]:
    """`logit_bias` as (token id, bias) pairs, once every id is in the model's vocabulary and given once ("5" and
    "05" are the same token: their biases would add up past the ±100 allowed); `ValueError` otherwise."""
    pairs = tuple((int(k), float(v)) for k, v in (bias or {}).items())
    if outside := [t for t, _ in pairs if t >= vocab_size]:
        raise ValueError(f"token id {outside[0]} is outside this model's vocabulary of {vocab_size}")
    if twice := [t for t, count in Counter(t for t, _ in pairs).items() if count > 1]:
        raise ValueError(f"token id {twice[0]} is given more than once")
    return pairs
