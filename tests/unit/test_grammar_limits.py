"""The grammar compiler's limits (`structured/grammar.py`, `structured/sandbox.py`): a schema that llguidance takes
minutes to compile is refused at the time limit with its compile killed, remembered, and never in the way of the
other schemas; each sequence copies one compiled matcher instead of compiling its own; the schema check on the event
loop is bounded and reads patterns as JSON Schema's regular expressions."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from qwen_api.structured import grammar as G


def allof_chain(links: int) -> dict[str, Any]:
    """1.7 KB of schema whose compile doubles with each link (24 links: about two minutes)."""
    defs = {}
    for i in range(links):
        nxt = {"$ref": f"#/$defs/a{i + 1}"} if i < links - 1 else {"type": "string", "pattern": "^[ab]{3}$"}
        defs[f"a{i}"] = {"allOf": [nxt, nxt]}
    return {"$defs": defs, "$ref": "#/$defs/a0"}


@pytest.fixture()
def compiler(tiny_qwen2_dir: Path) -> Any:
    from transformers import AutoTokenizer

    compiler = G.GrammarCompiler(AutoTokenizer.from_pretrained(tiny_qwen2_dir))
    yield compiler
    compiler.close()


def test_a_schema_too_slow_to_compile_is_killed_remembered_and_blocks_nobody(
    compiler: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(G, "COMPILE_TIMEOUT_S", 1.0)
    slow, simple = G.json_schema_grammar(allof_chain(24)), G.json_schema_grammar({"type": "string"})

    async def timed(grammar: str) -> tuple[str, float]:
        start = time.monotonic()
        try:
            await compiler.compile(grammar)
            return "ok", time.monotonic() - start
        except G.GrammarError as exc:
            return str(exc), time.monotonic() - start

    async def scenario() -> None:
        await compiler.compile(simple)  # the token table and a first child, started before the clock runs
        # the same slow schema twice (one compile, both refused) beside a new simple one
        (first, t1), (second, t2), (other, _) = await asyncio.gather(
            timed(slow), timed(slow), timed(G.json_schema_grammar({"type": "integer"}))
        )
        assert first == second == "the schema took longer than 1 s to compile"
        assert t1 < 10 and t2 < 10  # killed at its limit (plus a child's start), not two minutes later
        assert other == "ok", other
        again, t4 = await timed(slow)
        assert again == first and t4 < 0.1  # remembered: refused at once, no second compile
        await compiler.compile(simple)  # and the compiler goes on

    asyncio.run(scenario())
    # the killed child is gone: nothing keeps burning a core after the answer; the others wait for grammars
    children = [process for process, _ in compiler._sandbox._children]
    assert all(process.is_alive() for process in children)
    assert len(children) == compiler._sandbox._idle.qsize() <= G.COMPILE_THREADS


def test_sequences_copy_one_compiled_matcher(compiler: Any) -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    constraint = asyncio.run(compiler.compile(G.json_schema_grammar(schema)))
    assert len(constraint.compiled) == 1
    compiled = constraint.compiled[0]
    one, two = constraint.matcher(), constraint.matcher()
    assert constraint.compiled == [compiled]  # no compile per sequence
    width = constraint.tokenizer.vocab_size
    allowed = one.allowed(width)
    token = int(allowed.nonzero()[0][0])
    assert one.advance(token)
    assert (two.allowed(width) == allowed).all()  # each sequence steps its own copy
    # a constraint that crossed a process compiles its matcher there once, at its first sequence
    crossed = G.Constraint(constraint.grammar, constraint.tokenizer_key, constraint.tokenizer)
    crossed.matcher(), crossed.matcher()
    assert len(crossed.compiled) == 1


@pytest.mark.parametrize("pattern", [r"^(?<year>[0-9]{4})-[0-9]{2}$", r"^\p{Lu}[a-z]+$"])
def test_json_schema_patterns_are_ecma_regular_expressions(compiler: Any, pattern: str) -> None:
    """Valid in JSON Schema (ECMA-262), invalid in Python's `re`: once refused as 'invalid JSON schema'."""
    asyncio.run(compiler.compile(G.json_schema_grammar({"type": "string", "pattern": pattern})))


def test_a_bad_pattern_is_still_refused(compiler: Any) -> None:
    with pytest.raises(G.GrammarError):
        asyncio.run(compiler.compile(G.json_schema_grammar({"type": "string", "pattern": "^(a"})))


def test_boolean_schemas_are_schemas(compiler: Any) -> None:
    asyncio.run(compiler.compile(G.json_schema_grammar(True)))


def test_the_schema_check_on_the_event_loop_is_fast_and_bounded() -> None:
    """It runs inside request validation: a 1.3 MB schema took the pure-Python checker 4 s, every stream waiting."""
    wide = {"type": "object", "properties": {f"p{i}": {"type": "string", "pattern": "^[a-z]+$"} for i in range(25_000)}}
    start = time.monotonic()
    G.checked_schema(wide, "tools.0.function.parameters")
    deep: dict[str, Any] = {}
    node = deep
    for _ in range(3000):
        node["items"] = node = {}
    with pytest.raises(G.GrammarError, match="nests 3001 levels deep"):
        G.checked_schema(deep)
    assert time.monotonic() - start < 1.0
    with pytest.raises(G.GrammarError, match=r"invalid JSON schema: .* \(at properties/a/minLength\)") as info:
        G.checked_schema({"type": "object", "properties": {"a": {"minLength": "x"}}}, "tools.0.function.parameters")
    assert info.value.param == "tools.0.function.parameters"
    with pytest.raises(G.GrammarError, match="invalid JSON schema"):  # the verdict is remembered, not the param
        G.checked_schema({"type": "object", "properties": {"a": {"minLength": "x"}}})
    # checked against 2020-12 whatever `$schema` says: an unknown one is never fetched
    G.checked_schema({"$schema": "http://127.0.0.1:9/never-fetched", "type": "object"})
