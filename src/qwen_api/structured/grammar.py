"""Grammars for constrained decoding: compile a JSON schema once (cached by its text), match it per sequence.

Built on llguidance (README: why it and not xgrammar). `GrammarCompiler` belongs to one tokenizer: it builds
llguidance's token table once, off the event loop, and compiles each distinct grammar once, in a worker thread
under a time limit, so a pathological schema is a `GrammarError` (a 400), never a stalled batch. A `Constraint`
is the plain handle that crosses the engine contract in `SamplingParams.constraint`; each engine asks it for one
`TokenMatcher` per sequence, applies `allowed()` to that sequence's logits before any other sampling transform,
and `advance()`s it with the token it sampled. When the JSON is complete the matcher allows only end-of-sequence.

A constraint also crosses processes (to a Ray replica): llguidance's tokenizer cannot be pickled, so a pickled
constraint carries its grammar and the key of its vocabulary (`tokenizer_key`), and binds to the receiving
process's own tokenizer for that vocabulary, which that process's `GrammarCompiler` registers when it builds it.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import numpy as np

COMPILE_TIMEOUT_S = 10.0
CACHE_SIZE = 256
# Compact JSON: a flexible-whitespace grammar lets a small model emit newlines until max_tokens.
_JSON_OPTIONS = {"whitespace_flexible": False}


class GrammarError(ValueError):
    """A schema or grammar that cannot be enforced; `param` names the request field it came from."""

    def __init__(self, message: str, param: str = "response_format") -> None:
        self.param = param
        super().__init__(message)


def checked_schema(schema: dict[str, Any] | bool, param: str = "response_format") -> dict[str, Any] | bool:
    """`schema`, once checked to be a valid JSON schema (a `GrammarError` naming `param` if not)."""
    from jsonschema import Draft202012Validator
    from jsonschema.exceptions import SchemaError

    if not isinstance(schema, dict | bool):
        raise GrammarError("the schema must be a JSON object", param)
    try:
        Draft202012Validator.check_schema(schema)
    except SchemaError as exc:
        raise GrammarError(f"invalid JSON schema: {exc.message}", param) from None
    return schema


def json_schema_grammar(schema: dict[str, Any] | bool, param: str = "response_format") -> str:
    """The llguidance grammar text for a JSON schema, after checking that the schema is itself valid."""
    return _lark_free_json(checked_schema(schema, param))


def _lark_free_json(schema: Any) -> str:
    from llguidance import LLMatcher

    try:
        # A plain dict is what llguidance reads; its stubs name a TypedDict with the same key.
        return LLMatcher.grammar_from_json_schema(json.dumps(schema), defaults=_JSON_OPTIONS)  # type: ignore[arg-type]
    except ValueError as exc:
        raise GrammarError(f"invalid JSON schema: {exc}") from None


def compact_json(schema: dict[str, Any] | bool) -> dict[str, Any]:
    """`schema` for a `%json` rule of a lark grammar, with the same compact JSON as `json_schema_grammar` (its
    options ride in llguidance's `x-guidance` key; the schema's own settings there win, as they do there)."""
    if isinstance(schema, bool):
        return {"allOf": [schema], "x-guidance": dict(_JSON_OPTIONS)}
    return {**schema, "x-guidance": {**_JSON_OPTIONS, **schema.get("x-guidance", {})}}


class TokenMatcher:
    """One sequence's position in a grammar: which tokens may come next, and the tokens taken so far."""

    def __init__(self, tokenizer: Any, grammar: str) -> None:
        from llguidance import LLMatcher
        from llguidance.numpy import allocate_token_bitmask

        self._matcher = LLMatcher(tokenizer, grammar)
        self._bitmask = allocate_token_bitmask(1, tokenizer.vocab_size)
        self._vocab = tokenizer.vocab_size

    def allowed(self, width: int) -> np.ndarray:
        """A bool row of `width` (the logits' width): True where the next token may go. Ids past the tokenizer's
        vocabulary (padding rows of the embedding) are never allowed."""
        from llguidance.numpy import fill_next_token_bitmask

        fill_next_token_bitmask(self._matcher, self._bitmask, 0)
        bits = np.unpackbits(self._bitmask[0].view(np.uint8), bitorder="little")[: self._vocab].astype(bool)
        if width == bits.size:
            return bits
        row = np.zeros(width, dtype=bool)
        n = min(width, bits.size)
        row[:n] = bits[:n]
        return row

    def advance(self, token: int) -> bool:
        """Take the sampled token; False if the grammar refuses it (it cannot, after `allowed`, but never raise)."""
        return bool(self._matcher.consume_token(int(token)))

    def failure(self) -> str | None:
        """Why the grammar engine gave up on this sequence, or None. A grammar it can compile may still exceed its
        limits while matching (a regular expression that explodes, a schema that recurses without end); it then
        allows only the end token, so such an output ends early and does not follow the grammar."""
        if not self._matcher.is_error():
            return None
        return str(self._matcher.get_error()).splitlines()[0]


# This process's llguidance tokenizers, by `tokenizer_key`: where a constraint that came from another process binds.
_TOKENIZERS: dict[str, Any] = {}


def tokenizer_key(hf_tokenizer: Any, n_vocab: int, eos: Any) -> str:
    """The same text in every process that loaded the same tokenizer: a digest of its vocabulary, merges, added
    tokens and pre-tokenizer (the fast tokenizer's JSON), the vocabulary size and the end tokens."""
    digest = hashlib.sha256(hf_tokenizer.backend_tokenizer.to_str().encode())
    digest.update(repr((n_vocab, eos)).encode())
    return digest.hexdigest()


@dataclass(frozen=True)
class Constraint:
    """A compiled grammar bound to a tokenizer: the handle an engine turns into one matcher per sequence.

    Pickled, it keeps its grammar and `tokenizer_key` only; unpickled in another process it uses that process's
    registered tokenizer of the same key (`bound`), which the process must have built first (`GrammarCompiler`)."""

    grammar: str
    tokenizer_key: str
    tokenizer: Any = field(default=None, repr=False, compare=False)

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        return (Constraint, (self.grammar, self.tokenizer_key))

    def _tokenizer(self) -> Any:
        return self.tokenizer if self.tokenizer is not None else _TOKENIZERS.get(self.tokenizer_key)

    def bound(self) -> bool:
        """Whether this process has the tokenizer that `matcher()` needs."""
        return self._tokenizer() is not None

    def matcher(self) -> TokenMatcher:
        tokenizer = self._tokenizer()
        if tokenizer is None:
            raise GrammarError("this process has no grammar tokenizer for the model's vocabulary")
        return TokenMatcher(tokenizer, self.grammar)


class GrammarCompiler:
    """Compiles and caches grammars for one tokenizer; every method that may be slow runs off the event loop."""

    def __init__(self, hf_tokenizer: Any, eos_token_ids: list[int] | None = None) -> None:
        self._hf = hf_tokenizer
        self._eos = eos_token_ids
        self._tokenizer: Any = None
        self._key = ""
        self._lock = threading.Lock()
        self._cache: OrderedDict[str, Constraint] = OrderedDict()

    def _ll_tokenizer(self) -> Any:
        with self._lock:
            if self._tokenizer is None:
                import llguidance.hf

                eos = self._eos or self._hf.eos_token_id
                self._tokenizer = llguidance.hf.from_tokenizer(self._hf, n_vocab=len(self._hf), eos_token=eos)
                self._key = tokenizer_key(self._hf, len(self._hf), eos)
                _TOKENIZERS[self._key] = self._tokenizer
            return self._tokenizer

    def _compile_sync(self, grammar: str, param: str) -> Constraint:
        from llguidance import LLMatcher

        tokenizer = self._ll_tokenizer()
        is_error, warnings = LLMatcher.validate_grammar_with_warnings(grammar, tokenizer)
        if is_error or warnings:
            # A warning means a part of the schema would not be enforced: refuse it rather than ignore it.
            raise GrammarError(f"this schema cannot be enforced: {'; '.join(warnings) or 'invalid grammar'}", param)
        probe = TokenMatcher(tokenizer, grammar)
        probe.allowed(tokenizer.vocab_size)  # the first step's mask: some grammars already fail there
        if (why := probe.failure()) is not None:
            raise GrammarError(f"this schema cannot be enforced: {why}", param)
        return Constraint(grammar, self._key, tokenizer)

    async def prepare(self) -> None:
        """Build the token table now (seconds for a 151k vocabulary), so that the first request does not wait, and
        register it for the constraints that other processes send here."""
        await asyncio.to_thread(self._ll_tokenizer)

    async def compile(self, grammar: str, param: str = "response_format") -> Constraint:
        """The constraint for `grammar`, from the cache or compiled in a thread within `COMPILE_TIMEOUT_S`."""
        if (hit := self._cache.get(grammar)) is not None:
            self._cache.move_to_end(grammar)
            return hit
        await self.prepare()
        try:
            async with asyncio.timeout(COMPILE_TIMEOUT_S):
                constraint = await asyncio.to_thread(self._compile_sync, grammar, param)
        except TimeoutError:
            raise GrammarError(f"the schema took longer than {COMPILE_TIMEOUT_S:.0f} s to compile", param) from None
        self._cache[grammar] = constraint
        while len(self._cache) > CACHE_SIZE:
            self._cache.popitem(last=False)
        return constraint


# The fields each `response_format` type has (OpenAI's shapes), besides `type`; and those of a json_schema's spec.
_FORMAT_FIELDS: dict[str, frozenset[str]] = {
    "text": frozenset(),
    "json_object": frozenset(),
    "json_schema": frozenset({"json_schema"}),
}
_JSON_SCHEMA_FIELDS = frozenset({"name", "schema", "strict", "description"})


def _check_spec(spec: Any) -> None:
    """A json_schema format's `json_schema` object: OpenAI's fields only, each of its type (never coerced)."""
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str) or not spec["name"]:
        raise GrammarError("json_schema needs a 'name' and a 'schema'")
    if unknown := set(spec) - _JSON_SCHEMA_FIELDS:
        raise GrammarError(f"json_schema: unknown field(s) {sorted(unknown)}")
    if spec.get("strict") is not None and not isinstance(spec["strict"], bool):
        raise GrammarError(f"json_schema: 'strict' must be a boolean (true or false), not {spec['strict']!r}")
    if spec.get("description") is not None and not isinstance(spec["description"], str):
        raise GrammarError("json_schema: 'description' must be a string")


def response_format_schema(response_format: dict[str, Any] | None) -> dict[str, Any] | bool | None:
    """The (checked) JSON schema an OpenAI `response_format` asks the content to follow, or None for plain text.

    Closed and strict as the request schemas are: a field the format's type does not have (a `schema` beside
    `json_object`, a `name` beside `text`) or a field of the wrong type (`strict: "yes"`) is a `GrammarError`."""
    if not response_format:
        return None
    kind = response_format.get("type")
    if not isinstance(kind, str) or kind not in _FORMAT_FIELDS:
        raise GrammarError(f"unknown response_format type {kind!r}: use 'text', 'json_object' or 'json_schema'")
    if unknown := set(response_format) - {"type"} - _FORMAT_FIELDS[kind]:
        raise GrammarError(f"a {kind!r} format has no field(s) {sorted(unknown)}")
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "object"}
    spec: Any = response_format.get("json_schema")
    _check_spec(spec)
    return checked_schema(spec.get("schema", {}))


def response_format_grammar(response_format: dict[str, Any] | None) -> str | None:
    """The grammar text for an OpenAI `response_format`, or None for plain text."""
    schema = response_format_schema(response_format)
    return None if schema is None else _lark_free_json(schema)
