"""Grammars for constrained decoding: compile a JSON schema once (cached by its text), match it per sequence.

Built on llguidance (README: why it and not xgrammar). `GrammarCompiler` belongs to one tokenizer: it builds
llguidance's token table once, off the event loop, and compiles each distinct grammar once, in its own threads,
first in a child process that is killed at a time limit (`sandbox`), so a pathological schema is a `GrammarError`
(a 400), never a stalled batch nor a core burnt after the answer. A `Constraint`
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
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from qwen_api.structured.sandbox import Failure, Sandbox

COMPILE_TIMEOUT_S = 10.0
COMPILE_THREADS = 2  # grammars compiled at once (each may hold a core for up to COMPILE_TIMEOUT_S)
MAX_COMPILING = 8  # distinct grammars compiling or queued at once; past that the server is busy
# GBNF converted to Lark on the event loop: its time grows as the square of the rules (1,000 rules, 28 KB: 0.44 s)
MAX_GBNF_CHARS = 16_000
WAIT_LIMIT_S = 3 * COMPILE_TIMEOUT_S  # a request's whole wait for its grammar: queued, checked, built
CACHE_SIZE = 256
# Objects and arrays nested in one schema (OpenAI allows 10 levels of objects); the checks recurse, native code too.
MAX_SCHEMA_DEPTH = 64
# Compact JSON: a flexible-whitespace grammar lets a small model emit newlines until max_tokens.
_JSON_OPTIONS = {"whitespace_flexible": False}


class CompilerBusy(Exception):
    """Too many grammars are compiling or queued: the server is busy (429 + Retry-After), the grammar no worse."""


class GrammarError(ValueError):
    """A schema or grammar that cannot be enforced; `param` names the request field it came from."""

    def __init__(self, message: str, param: str = "response_format") -> None:
        self.param = param
        super().__init__(message)


def checked_schema(schema: dict[str, Any] | bool, param: str = "response_format") -> dict[str, Any] | bool:
    """`schema`, once checked to be a valid JSON schema (a `GrammarError` naming `param` if not): valid under the
    2020-12 metaschema, whatever its `$schema` says (a checker that honoured it would fetch an unknown one's URL).

    The check runs on the event loop, inside request validation, so its cost is bounded: jsonschema-rs (native
    code) checks 25,000 objects in about 10 ms where the pure-Python `jsonschema` took 4 s, every stream waiting; a
    schema nests at most `MAX_SCHEMA_DEPTH` deep (measured without recursion); and the verdict on each distinct
    schema is remembered (an agent sends the same tools every turn). A `pattern` is an ECMA-262
    regular expression, as JSON Schema says (`(?<y>...)` and `\\p{Lu}` are valid; Python's `re` refused them);
    the grammar engine, which reads it as such, refuses a bad one itself."""
    import jsonschema_rs

    if not isinstance(schema, dict | bool):
        raise GrammarError("the schema must be a JSON object", param)
    if (depth := _depth_of(schema)) > MAX_SCHEMA_DEPTH:
        raise GrammarError(f"the schema nests {depth} levels deep: at most {MAX_SCHEMA_DEPTH} are supported", param)
    key = hashlib.sha256(json.dumps(schema, sort_keys=True).encode()).digest()
    if key in _SCHEMA_VERDICTS:
        verdict = _SCHEMA_VERDICTS[key]
    else:
        checked = {k: v for k, v in schema.items() if k != "$schema"} if isinstance(schema, dict) else schema
        try:
            jsonschema_rs.meta.validate(checked)
            verdict = _inexact_bound(checked)
        except jsonschema_rs.ValidationError as exc:
            where = "/".join(str(p) for p in exc.instance_path)
            verdict = f"invalid JSON schema: {exc.message}" + (f" (at {where})" if where else "")
        _SCHEMA_VERDICTS[key] = verdict
        while len(_SCHEMA_VERDICTS) > CACHE_SIZE:
            _SCHEMA_VERDICTS.popitem(last=False)
    if verdict is not None:
        raise GrammarError(verdict, param)
    return schema


# Each checked schema's verdict (None: valid; else why not), by the digest of its canonical JSON; on the event loop.
_SCHEMA_VERDICTS: OrderedDict[bytes, str | None] = OrderedDict()


# The grammar engine reads numeric bounds as 64-bit floats, exact up to 2^53: past that, an integer bound such as
# `maximum: 2^53 + 3` let 2^53 + 4 through, and others were refused as unsatisfiable.
_EXACT_LIMIT = 2**53
_BOUNDS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf")
_DATA_KEYWORDS = frozenset({"const", "enum", "default", "examples"})  # values, not schemas: their keys are data


def _inexact_bound(schema: Any) -> str | None:
    """Why a numeric bound of `schema` cannot be enforced exactly, or None; walked without recursion."""
    todo = [(schema, "")]
    while todo:
        item, where = todo.pop()
        if isinstance(item, list):
            todo.extend((v, f"{where}{i}/") for i, v in enumerate(item))
        if not isinstance(item, dict):
            continue
        for key, value in item.items():
            if key in _BOUNDS and type(value) is int and abs(value) > _EXACT_LIMIT:  # 1e300 is no count: left be
                return (
                    f"{key} {value} (at {where}{key}) is beyond 2^53, past which the grammar engine cannot enforce "
                    "a number exactly: narrow it or leave it out"
                )
            if key not in _DATA_KEYWORDS:
                todo.append((value, f"{where}{key}/"))
    return None


def _depth_of(value: Any) -> int:
    """How deep `value`'s objects and arrays nest, walked without recursion (a deep one must not exhaust a stack)."""
    depth, todo = 0, [(value, 1)]
    while todo:
        item, level = todo.pop()
        if isinstance(item, dict | list):
            depth = max(depth, level)
            todo.extend((v, level + 1) for v in (item.values() if isinstance(item, dict) else item))
    return depth


def json_schema_grammar(schema: dict[str, Any] | bool, param: str = "response_format") -> str:
    """The llguidance grammar text for a JSON schema, after checking that the schema is itself valid."""
    return _lark_free_json(checked_schema(schema, param), param)


def _lark_free_json(schema: Any, param: str = "response_format") -> str:
    from llguidance import LLMatcher

    if isinstance(schema, bool):  # `true` is any JSON, `false` none: llguidance reads objects only
        schema = {} if schema else {"not": {}}
    try:
        # A plain dict is what llguidance reads; its stubs name a TypedDict with the same key.
        return LLMatcher.grammar_from_json_schema(json.dumps(schema), defaults=_JSON_OPTIONS)  # type: ignore[arg-type]
    except ValueError as exc:
        raise GrammarError(f"invalid JSON schema: {exc}", param) from None


def compact_json(schema: dict[str, Any] | bool) -> dict[str, Any]:
    """`schema` for a `%json` rule of a lark grammar, with the same compact JSON as `json_schema_grammar` (its
    options ride in llguidance's `x-guidance` key; the schema's own settings there win, as they do there)."""
    if isinstance(schema, bool):
        return {"allOf": [schema], "x-guidance": dict(_JSON_OPTIONS)}
    return {**schema, "x-guidance": {**_JSON_OPTIONS, **schema.get("x-guidance", {})}}


class TokenMatcher:
    """One sequence's position in a grammar: which tokens may come next, and the tokens taken so far. It steps its
    own copy of a compiled matcher (`Constraint.matcher`)."""

    def __init__(self, matcher: Any, vocab_size: int) -> None:
        from llguidance.numpy import allocate_token_bitmask

        self._matcher = matcher
        self._bitmask = allocate_token_bitmask(1, vocab_size)
        self._vocab = vocab_size

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

    The grammar is compiled once per process (`GrammarCompiler` does it off the event loop, before the request is
    admitted) and each sequence gets a copy of that compiled matcher, which costs microseconds: an engine's step
    never compiles a grammar, which for a large schema takes seconds that every other sequence would wait.
    Pickled, it keeps its grammar and `tokenizer_key` only; unpickled in another process it uses that process's
    registered tokenizer of the same key (`bound`), which the process must have built first (`GrammarCompiler`),
    and compiles its matcher there at its first sequence."""

    grammar: str
    tokenizer_key: str
    tokenizer: Any = field(default=None, repr=False, compare=False)
    # the compiled matcher, at most one, that sequences copy; empty until this process compiles it
    compiled: list[Any] = field(default_factory=list, repr=False, compare=False)

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
        if not self.compiled:
            from llguidance import LLMatcher

            self.compiled.append(LLMatcher(tokenizer, self.grammar, log_level=0))
        return TokenMatcher(self.compiled[0].deep_copy(), tokenizer.vocab_size)


class GrammarCompiler:
    """Compiles and caches grammars for one tokenizer; every method that may be slow runs off the event loop, in
    the compiler's own threads (`COMPILE_THREADS`), so that compiles never take the threads the rest of the server
    shares. A grammar's first compile runs in a child process (`sandbox.Sandbox`) that is killed at
    `COMPILE_TIMEOUT_S`; a grammar that took too long is remembered and refused at once when it comes again."""

    def __init__(self, hf_tokenizer: Any, eos_token_ids: list[int] | None = None) -> None:
        self._hf = hf_tokenizer
        self._eos = eos_token_ids
        self._tokenizer: Any = None
        self._key = ""
        self._lock = threading.Lock()
        self._cache: OrderedDict[str, Constraint] = OrderedDict()
        # grammars the sandbox refused (too slow, or it died on them), and why: answered at once when sent again
        self._refused: OrderedDict[str, str] = OrderedDict()
        self._compiling: dict[str, asyncio.Future[Constraint]] = {}
        self._waiting: dict[str, int] = {}  # requests waiting for each grammar being compiled
        self._threads = ThreadPoolExecutor(max_workers=COMPILE_THREADS, thread_name_prefix="grammar")
        self._sandbox = Sandbox()

    def _ll_tokenizer(self) -> Any:
        with self._lock:
            if self._tokenizer is None:
                import llguidance.hf

                eos = self._eos or self._hf.eos_token_id
                tokenizer = llguidance.hf.from_tokenizer(self._hf, n_vocab=len(self._hf), eos_token=eos)
                self._key = tokenizer_key(self._hf, len(self._hf), eos)
                _TOKENIZERS[self._key] = tokenizer
                # Last: `prepare` reads a set tokenizer as "ready" without the lock, and `adopt` then reads the key
                # (set first, it once was not yet, and a replica's second request saw "another vocabulary").
                self._tokenizer = tokenizer
            return self._tokenizer

    def _compile_sync(self, grammar: str, param: str) -> Constraint:
        from llguidance import LLMatcher

        verdict = self._sandbox.check(grammar, COMPILE_TIMEOUT_S)
        if isinstance(verdict, Failure):
            why = (
                f"the schema took longer than {COMPILE_TIMEOUT_S:.0f} s to compile"
                if verdict is Failure.TOO_SLOW
                else "the grammar engine failed on this grammar (it nests too deep or is too large)"
            )
            with self._lock:
                self._refused[grammar] = why
                while len(self._refused) > CACHE_SIZE:
                    self._refused.popitem(last=False)
            raise GrammarError(why, param)
        # Compiled in time there: here it takes about as long, with the tokenizer.
        tokenizer = self._ll_tokenizer()
        compiled = LLMatcher(tokenizer, grammar, log_level=0)
        errors = [compiled.get_error()] if compiled.is_error() else []
        # A warning means a part of the schema would not be enforced: refuse it rather than ignore it.
        if problems := errors or verdict[1] or list(compiled.get_grammar_warnings()):
            raise GrammarError(f"this schema cannot be enforced: {'; '.join(problems)}", param)
        probe = TokenMatcher(compiled.deep_copy(), tokenizer.vocab_size)
        probe.allowed(tokenizer.vocab_size)  # the first step's mask: some grammars already fail there
        if (failure := probe.failure()) is not None:
            raise GrammarError(f"this schema cannot be enforced: {failure}", param)
        return Constraint(grammar, self._key, tokenizer, [compiled])

    async def prepare(self) -> None:
        """Build the token table now (seconds for a 151k vocabulary), so that the first request does not wait, and
        register it for the constraints that other processes send here."""
        if self._tokenizer is None:
            await asyncio.get_running_loop().run_in_executor(self._threads, self._ll_tokenizer)

    async def compile(self, grammar: str, param: str = "response_format") -> Constraint:
        """The constraint for `grammar`, from the cache or compiled in the compiler's threads. A request waits at
        most `WAIT_LIMIT_S` in all (its compile is killed at `COMPILE_TIMEOUT_S`; the rest is for the compiles
        queued before it and for building its matcher). At most `MAX_COMPILING` distinct grammars wait or compile
        at once; past that, or past the wait, the server is busy (`CompilerBusy`, a 429 with Retry-After), which is
        no fault of the grammar. A compile that every request waiting for it has left is dropped if it has not
        begun (one that has is killed at its limit all the same)."""
        if (hit := self._cache.get(grammar)) is not None:
            self._cache.move_to_end(grammar)
            return hit
        if (why := self._refused.get(grammar)) is not None:
            raise GrammarError(why, param)
        # One compile per grammar at a time: requests that send it meanwhile wait for the same one.
        if (work := self._compiling.get(grammar)) is None:
            if len(self._compiling) >= MAX_COMPILING:
                raise CompilerBusy(f"the server is compiling {len(self._compiling)} other grammars; retry shortly")
            work = self._compiling[grammar] = asyncio.ensure_future(self._compile(grammar, param))

            def finished(done: asyncio.Future[Constraint]) -> None:
                self._compiling.pop(grammar, None)
                self._waiting.pop(grammar, None)
                if not done.cancelled():
                    done.exception()  # taken: when every request that waited for it left first, nobody else does

            work.add_done_callback(finished)
        self._waiting[grammar] = self._waiting.get(grammar, 0) + 1
        try:
            async with asyncio.timeout(WAIT_LIMIT_S):
                return await asyncio.shield(work)  # a waiter that leaves does not cancel the others' compile
        except TimeoutError:
            raise CompilerBusy(
                f"the grammar could not be compiled within {WAIT_LIMIT_S:.0f} s: the server is compiling others; "
                "retry shortly"
            ) from None
        except GrammarError as exc:
            raise GrammarError(str(exc), param) from None  # named as this request names it
        finally:
            if grammar in self._waiting:
                self._waiting[grammar] -= 1
                if self._waiting[grammar] == 0 and not work.done():
                    work.cancel()  # nobody waits for it: a compile not begun is dropped from the queue

    async def _compile(self, grammar: str, param: str) -> Constraint:
        await self.prepare()
        loop = asyncio.get_running_loop()
        constraint = await loop.run_in_executor(self._threads, self._compile_sync, grammar, param)
        self._remember(constraint)
        return constraint

    async def adopt(self, constraint: Constraint) -> Constraint:
        """A constraint that another process compiled and checked (a Ray front), made this process's: bound to its
        tokenizer for the same vocabulary and its matcher compiled here once, in the compiler's threads, and cached,
        rather than at every sequence inside an engine's step. `GrammarError` for another vocabulary."""
        if (hit := self._cache.get(constraint.grammar)) is not None:
            return hit
        await self.prepare()
        if constraint.tokenizer_key != self._key:
            raise GrammarError("the grammar was compiled for another vocabulary than this process's model")

        def build() -> Constraint:
            from llguidance import LLMatcher

            compiled = LLMatcher(self._ll_tokenizer(), constraint.grammar, log_level=0)
            return Constraint(constraint.grammar, self._key, self._tokenizer, [compiled])

        adopted = await asyncio.get_running_loop().run_in_executor(self._threads, build)
        self._remember(adopted)
        return adopted

    def _remember(self, constraint: Constraint) -> None:
        self._cache[constraint.grammar] = constraint
        while len(self._cache) > CACHE_SIZE:
            self._cache.popitem(last=False)

    def close(self) -> None:
        """End the compile children (they end by themselves too when this process exits)."""
        self._threads.shutdown(wait=False, cancel_futures=True)
        self._sandbox.close()


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
    if response_format is None:
        return None
    kind = response_format.get("type")  # `{}` too is refused: it asks for no format, and OpenAI wants the type
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


# vLLM's structured outputs (`structured_outputs` in a request's extra body, and its older `guided_*` fields): the
# constraint kinds, and the options that are neutral here (llguidance is the one backend; its JSON is compact).
VLLM_KINDS = ("json", "regex", "choice", "grammar", "json_object")
_VLLM_NEUTRAL = frozenset({"disable_fallback", "disable_any_whitespace"})


def vllm_grammar(spec: dict[str, Any], param: str, nested: bool = True) -> tuple[str, str]:
    """(grammar text, its field) for vLLM's structured outputs `spec` (its `StructuredOutputsParams`): exactly one
    of `json` (a JSON schema, or its text), `regex`, `choice` (the output is one of the strings), `grammar` (Lark,
    or GBNF as llama.cpp and vLLM's xgrammar write it) and `json_object: true`. The field is `param.kind`, or
    `param` itself when not `nested` (the `guided_*` fields); `GrammarError` naming it (or `param`) for anything
    else; a grammar or regular expression that does not compile is refused when it is compiled."""
    if unknown := set(spec) - set(VLLM_KINDS) - _VLLM_NEUTRAL:
        raise GrammarError(f"unsupported field(s) {sorted(unknown)}: supported are {list(VLLM_KINDS)}", param)
    given = [k for k in VLLM_KINDS if spec.get(k) not in (None, False)]
    if len(given) != 1:
        raise GrammarError(f"give exactly one of {list(VLLM_KINDS)}, not {given or 'none'}", param)
    kind, value = given[0], spec[given[0]]
    where = f"{param}.{kind}" if nested else param
    return _vllm_kind_grammar(kind, value, where), where


def _vllm_kind_grammar(kind: str, value: Any, where: str) -> str:
    """The grammar text for one of vLLM's constraint kinds; `GrammarError` naming `where`."""
    from llguidance import LLMatcher
    from llguidance.gbnf_to_lark import any_to_lark, is_lark_syntax

    if kind == "json_object":
        if value is not True:
            raise GrammarError("json_object must be true", where)
        return json_schema_grammar({"type": "object"}, where)
    if kind == "json":
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError:
                raise GrammarError("a JSON schema, or its JSON text", where) from None
        return json_schema_grammar(value, where)
    if kind == "choice":
        if not isinstance(value, list) or not value or not all(isinstance(c, str) and c for c in value):
            raise GrammarError("a non-empty list of non-empty strings", where)
        # One lexeme (a terminal) of all the strings: as alternatives of a rule, the parser takes at most 2,000.
        return LLMatcher.grammar_from_lark("start: CHOICE\nCHOICE: " + " | ".join(json.dumps(c) for c in value) + "\n")
    if not isinstance(value, str) or not value:
        raise GrammarError("a non-empty string", where)
    if kind == "regex":
        return LLMatcher.grammar_from_regex(value)
    if not is_lark_syntax(value) and len(value) > MAX_GBNF_CHARS:
        # llguidance's GBNF converter runs here, on the event loop, in time that grows as the square of the rules
        raise GrammarError(f"a GBNF grammar has at most {MAX_GBNF_CHARS} characters; write a larger one in Lark", where)
    try:
        return LLMatcher.grammar_from_lark(any_to_lark(value))
    except Exception as exc:  # the GBNF converter's own errors name no type of theirs
        raise GrammarError(f"not a Lark or GBNF grammar: {exc}", where) from None
