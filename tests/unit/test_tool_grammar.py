"""The grammar `auto` puts on an answer when a function is `strict` (`structured/tools.strict_calls_grammar`): free
text, in which every `<tool_call>` is a call to a declared function whose arguments follow its `parameters` (a
strict one's; any object for the others). Driven through llguidance's own matcher on Qwen2's vocabulary."""

from __future__ import annotations

from typing import Any

import pytest

from qwen_api.structured.tools import tools_grammar

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "strict": True,
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "temp": {"type": "integer"}},
            "required": ["city", "temp"],
            "additionalProperties": False,
        },
    },
}
LOOSE = {"type": "function", "function": {"name": "lookup", "parameters": {"type": "object", "properties": {}}}}
CALL = '<tool_call>\n{"name":"get_weather","arguments":{"city":"Paris","temp":3}}\n</tool_call>'


@pytest.fixture(scope="module")
def matcher() -> Any:
    import llguidance.hf
    from llguidance import LLMatcher

    from qwen_api.dev.random_qwen2 import build_qwen2_tokenizer

    hf = build_qwen2_tokenizer()
    tokenizer = llguidance.hf.from_tokenizer(hf, n_vocab=len(hf), eos_token=hf.eos_token_id)

    def follows(grammar: str, text: str) -> bool:
        """Whether `grammar` lets the model write `text` and then end its answer."""
        m = LLMatcher(tokenizer, grammar, log_level=0)
        ids = hf(text, add_special_tokens=False)["input_ids"]
        return all(m.consume_token(i) for i in ids) and m.is_accepting()

    return follows


def test_auto_without_a_strict_function_is_unconstrained() -> None:
    loose_weather = {**WEATHER, "function": {**WEATHER["function"], "strict": False}}
    assert tools_grammar([loose_weather, LOOSE], forced=False) is None


@pytest.mark.parametrize(
    "text",
    [
        "Plain text: no call, with <b>markup</b> and a < b.",
        f"Sure.\n{CALL}",
        f"Sure.\n{CALL}\nAnd text after it.",
        CALL.removesuffix("\n</tool_call>"),  # a small model may end right after the JSON
        '<tool_call>{"name":"lookup","arguments":{"anything":[1,2]}}</tool_call>',  # not strict: any object
        f"{CALL}\n{CALL}",
    ],
)
def test_text_and_calls_that_follow_their_functions_are_allowed(matcher: Any, text: str) -> None:
    assert matcher(tools_grammar([WEATHER, LOOSE], forced=False), text)


@pytest.mark.parametrize(
    "text",
    [
        '<tool_call>\n{"name":"get_weather","arguments":{"city":"Paris"}}',  # a required argument missing
        '<tool_call>\n{"name":"get_weather","arguments":{"city":"Paris","temp":"warm"}}',  # of the wrong type
        '<tool_call>\n{"name":"get_weather","arguments":{"city":"Paris","temp":3,"x":1}}',  # one not declared
        '<tool_call>\n{"name":"rm_rf","arguments":{}}',  # a function nobody declared
        "<tool_call>\nnot json",
    ],
)
def test_a_call_that_breaks_a_strict_function_cannot_be_written(matcher: Any, text: str) -> None:
    assert not matcher(tools_grammar([WEATHER, LOOSE], forced=False), text)


def test_without_parallel_calls_one_call_is_held_to_its_function(matcher: Any) -> None:
    one = tools_grammar([WEATHER], forced=False, parallel=False)
    assert one is not None and matcher(one, f"Sure.\n{CALL}")


def test_a_reference_to_an_anchor_survives_the_call_schema(matcher: Any) -> None:
    """A function's schema sits under the call schema's `$defs`, its JSON pointers re-rooted there; a reference to
    an `$anchor` is a name, found wherever it sits, and stays (it was rewritten into a pointer that did not exist)."""
    anchored = {
        "type": "function",
        "function": {
            "name": "count",
            "strict": True,
            "parameters": {
                "type": "object",
                "properties": {"n": {"$ref": "#num"}},
                "required": ["n"],
                "$defs": {"num": {"$anchor": "num", "type": "integer"}},
            },
        },
    }
    grammar = tools_grammar([anchored], forced=False)
    assert grammar is not None
    assert matcher(grammar, '<tool_call>\n{"name":"count","arguments":{"n":3}}\n</tool_call>')
    assert not matcher(grammar, '<tool_call>\n{"name":"count","arguments":{"n":"three"}}')
    assert tools_grammar([anchored], forced=True)  # the forced call's grammar too
