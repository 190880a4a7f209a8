"""The grammar compiler's limits (`structured/grammar.py`, `structured/sandbox.py`): a schema that llguidance takes
minutes to compile is refused at the time limit with its compile killed, remembered, and never in the way of the
other schemas; each sequence copies one compiled matcher instead of compiling its own; the schema check on the event
loop is bounded and reads patterns as JSON Schema's regular expressions."""

from __future__ import annotations

import asyncio
import subprocess
import sys
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
    assert all(process.poll() is None for process in children)
    assert len(children) == compiler._sandbox._idle.qsize() <= G.COMPILE_THREADS


def test_the_sandbox_works_in_a_process_whose_main_is_stdin(tmp_path: Path) -> None:
    """A server started from a script read on stdin (`python - <<EOF`): multiprocessing's spawn re-ran the parent's
    main script in each child, there was none, and every structured request failed. The child is its own module."""
    script = (
        "from qwen_api.structured.sandbox import Failure, Sandbox\n"
        "sandbox = Sandbox()\n"
        "print(sandbox.check('start: \"a\"', 30), sandbox.check('start: nothing', 30))\n"
        "sandbox.close()\n"
    )
    done = subprocess.run(
        [sys.executable, "-"], input=script, capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
    ok, refused = done.stdout.split(") (")
    assert ok == "(False, []" and refused.startswith("True, [") and "nothing" in refused, done.stdout


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


def test_a_grammar_the_engine_dies_on_is_refused_as_such(compiler: Any) -> None:
    """A Lark rule chain thousands of links deep overflows llguidance's native stack: the child dies on it, the
    server does not, and the grammar is refused for what happened (it once read "took longer than 10 s")."""
    deep = "start: r0\n" + "\n".join(f"r{i}: r{i + 1}" for i in range(10_000)) + '\nr10000: "a"\n'
    from llguidance import LLMatcher

    grammar = LLMatcher.grammar_from_lark(deep)
    for _ in range(2):  # the second time from memory
        with pytest.raises(G.GrammarError, match="failed on this grammar"):
            asyncio.run(compiler.compile(grammar, "structured_outputs.grammar"))
    asyncio.run(compiler.compile(G.json_schema_grammar({"type": "string"})))  # a new child takes the next one


def test_the_compile_queue_is_bounded_and_drops_what_nobody_waits_for(
    compiler: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(G, "COMPILE_TIMEOUT_S", 2.0)
    monkeypatch.setattr(G, "MAX_COMPILING", 3)
    checked: list[str] = []
    check = compiler._sandbox.check
    monkeypatch.setattr(compiler._sandbox, "check", lambda g, t: checked.append(g) or check(g, t))
    slow = [G.json_schema_grammar(allof_chain(24 + k)) for k in range(3)]

    async def scenario() -> None:
        await compiler.prepare()
        busy = [asyncio.ensure_future(compiler.compile(g)) for g in slow[:2]]  # both compile threads taken
        await asyncio.sleep(0.5)
        left = asyncio.ensure_future(compiler.compile(slow[2]))  # queued behind them
        await asyncio.sleep(0.1)
        with pytest.raises(G.CompilerBusy):  # a fourth distinct grammar: past the bound, at once
            await compiler.compile(G.json_schema_grammar({"type": "integer"}))
        left.cancel()  # its only client leaves before its compile begins
        await asyncio.gather(*busy, return_exceptions=True)
        await asyncio.sleep(0.5)
        assert slow[2] not in checked  # dropped from the queue, never compiled for nobody
        await compiler.compile(G.json_schema_grammar({"type": "integer"}))  # and the compiler is free again

    asyncio.run(scenario())


def test_large_choice_lists_and_the_gbnf_bound(compiler: Any) -> None:
    choices = [f"c{i}" for i in range(5000)]  # past the parser's 2,000 alternatives in one rule
    constraint = asyncio.run(compiler.compile(G.vllm_grammar({"choice": choices}, "structured_outputs")[0]))
    matcher = constraint.compiled[0].deep_copy()
    assert all(matcher.consume_token(t) for t in compiler._hf("c4999", add_special_tokens=False)["input_ids"])
    assert matcher.is_accepting()
    rules = "root ::= r0\n" + "\n".join(f'r{i} ::= "x{i}" r{i + 1} | "y"' for i in range(2000)) + '\nr2000 ::= "z"\n'
    start = time.monotonic()
    with pytest.raises(G.GrammarError, match="at most 16000 characters") as info:
        G.vllm_grammar({"grammar": rules}, "structured_outputs")
    assert info.value.param == "structured_outputs.grammar" and time.monotonic() - start < 0.5


def test_concurrent_adopts_on_a_fresh_compiler_all_bind(
    compiler: Any, tiny_qwen2_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A replica's first requests arrive together: each must wait for the token table and its key (the second once
    saw the table set but not yet the key, and refused the grammar as for another vocabulary)."""
    import pickle

    from transformers import AutoTokenizer

    constraint = asyncio.run(compiler.compile(G.json_schema_grammar({"type": "integer"})))
    there = G.GrammarCompiler(AutoTokenizer.from_pretrained(tiny_qwen2_dir))
    key_of = G.tokenizer_key
    monkeypatch.setattr(G, "tokenizer_key", lambda *a: time.sleep(1.0) or key_of(*a))  # a wide window

    async def together() -> list[Any]:
        first = asyncio.ensure_future(there.adopt(pickle.loads(pickle.dumps(constraint))))
        while there._tokenizer is None:  # until the table is set (once, its key was not yet)
            await asyncio.sleep(0.01)
        rest = [asyncio.ensure_future(there.adopt(pickle.loads(pickle.dumps(constraint)))) for _ in range(3)]
        return list(await asyncio.gather(first, *rest))

    try:
        assert all(c.bound() for c in asyncio.run(together()))
    finally:
        there.close()


def test_numeric_bounds_past_2_to_the_53_are_refused_not_enforced_loosely() -> None:
    """The grammar engine reads bounds as 64-bit floats: `maximum: 2^53 + 3` let 2^53 + 4 through with finish
    "stop", and int64's whole range was refused as a regex it could not build. Such a bound is a 400 naming it;
    2^53 itself, a property named like a keyword, and data (`const`, `enum`) that merely hold such keys are fine."""

    def integer(**bounds: int) -> dict[str, Any]:
        return {"type": "object", "properties": {"i": {"type": "integer", **bounds}}}

    with pytest.raises(G.GrammarError, match=r"minimum 9007199254740993 \(at properties/i/minimum\) is beyond 2\^53"):
        G.checked_schema(integer(minimum=2**53 + 1, maximum=2**53 + 3))
    with pytest.raises(G.GrammarError, match="minimum -9223372036854775808"):
        G.checked_schema({"anyOf": [{"type": "integer", "minimum": -(2**63), "maximum": 2**63 - 1}]})
    G.checked_schema(integer(minimum=-(2**53), maximum=2**53))
    G.checked_schema({"type": "object", "properties": {"maximum": {"type": "integer", "maximum": 10}}})
    G.checked_schema({"const": {"maximum": 10**30}, "enum": [{"minimum": 10**30}]})
    G.checked_schema({"type": "number", "maximum": 1e300})  # a float bound, not a count: no exactness lost
