"""How a completion splits into text and tool calls (`structured.tools.parse_tool_calls`), the one rule every
dialect's route answers with, streamed or not; and which `parameters` schemas a function may have."""

from __future__ import annotations

import json

import pytest

from qwen_api.structured.grammar import GrammarError
from qwen_api.structured.tools import CallRules, ParsedOutput, check_parameters, parse_tool_calls

CALL = '<tool_call>\n{"name": "f", "arguments": {"a": 1}}\n</tool_call>'


def test_a_call_and_the_text_beside_it() -> None:
    parsed = parse_tool_calls(f"Sure!\n{CALL}\n")
    assert parsed.content == "Sure!"
    [call] = parsed.tool_calls
    assert call["id"].startswith("call_") and call["function"] == {"name": "f", "arguments": '{"a": 1}'}
    assert parse_tool_calls(CALL).content is None  # only a call: no text


def test_the_answers_own_leading_whitespace_stays_as_a_stream_sent_it() -> None:
    """A stream sends the text before a call as it comes (all but its trailing whitespace); the whole answer must
    say the same, or the streamed and the plain text differ."""
    assert parse_tool_calls(f" Hi {CALL}").content == " Hi"
    assert parse_tool_calls(" Hi there").content == " Hi there"  # without a call: as written
    assert parse_tool_calls(f"\n{CALL}\n\nDone.").content == "Done."  # nothing before the call: nothing streamed


def test_a_call_cut_off_by_the_token_limit_never_reaches_the_text() -> None:
    assert parse_tool_calls('<tool_call>\n{"na').content is None
    cut = parse_tool_calls('Sure! <tool_call>{"name": "lookup", "argu')
    assert (cut.content, cut.tool_calls) == ("Sure!", [])
    whole_then_cut = parse_tool_calls(f'{CALL}\n<tool_call>{{"name": "g"')
    assert whole_then_cut.content is None and len(whole_then_cut.tool_calls) == 1


def test_an_argument_may_hold_the_closing_tag_itself() -> None:
    """The call's JSON is read as JSON: a `</tool_call>` inside a string (HTML, code, a model quoting the format)
    neither ends the block nor turns a whole call into text."""
    html = "<b>x</b></tool_call>"
    call = f'<tool_call>\n{{"name": "f", "arguments": {{"html": "{html}"}}}}\n</tool_call>'
    parsed = parse_tool_calls(f"Here: {call} done")
    assert (parsed.content, len(parsed.tool_calls)) == ("Here:  done", 1)
    assert json.loads(parsed.tool_calls[0]["function"]["arguments"]) == {"html": html}
    unclosed = parse_tool_calls(call.removesuffix("</tool_call>"))
    assert unclosed.content is None and json.loads(unclosed.tool_calls[0]["function"]["arguments"]) == {"html": html}


def test_json_nested_past_the_stack_is_no_call_and_no_crash() -> None:
    deep = "<tool_call>" + "[" * 100_000 + "]" * 100_000 + "</tool_call>"
    assert parse_tool_calls(f"x {deep}") == ParsedOutput(f"x {deep}", [])
    args = json.dumps("[" * 100_000 + "]" * 100_000)
    assert parse_tool_calls(f'<tool_call>{{"name": "f", "arguments": {args}}}</tool_call>').tool_calls == []


def test_a_whole_call_left_unclosed_with_text_after_it_is_a_call() -> None:
    """A strict function's grammar lets the closing tag be left out and text follow: the call counts, and the text
    after it stays content."""
    parsed = parse_tool_calls('Sure.<tool_call>\n{"name": "f", "arguments": {"a": 1}}\nLet me know.')
    assert parsed.content == "Sure.\nLet me know."
    assert [c["function"] for c in parsed.tool_calls] == [{"name": "f", "arguments": '{"a": 1}'}]


@pytest.mark.parametrize("cut", ["<", "<tool", "<tool_call", "<tool_call>\n", '<tool_call>\n{"name": "f", "argu'])
def test_a_forced_call_cut_off_anywhere_leaves_no_text(cut: str) -> None:
    """With `required` or a named function the answer is calls only: cut off by the token limit even inside its
    opening tag, nothing of it is content, plain or streamed."""
    rules = CallRules(frozenset({"f"}), forced=True)
    assert rules.split(cut) == ParsedOutput(None, [])
    stream = rules.stream()
    assert [stream.feed(c) for c in cut] == [""] * len(cut) and stream.finish() == ("", [])
    assert rules.split(CALL).tool_calls and rules.split(CALL).content is None


@pytest.mark.parametrize(
    "block",
    [
        "<tool_call>not json</tool_call>",
        '<tool_call>{"name": "f", "arguments": "Paris"}</tool_call>',  # arguments that are no JSON object
        '<tool_call>{"name": "f", "arguments": [1]}</tool_call>',
        '<tool_call>{"name": 3, "arguments": {}}</tool_call>',
    ],
)
def test_a_closed_block_that_is_no_call_stays_in_the_text_as_written(block: str) -> None:
    parsed = parse_tool_calls(f"x {block} y")
    assert (parsed.content, parsed.tool_calls) == (f"x {block} y", [])


def test_arguments_sent_as_json_text_come_back_as_the_objects_json() -> None:
    parsed = parse_tool_calls('<tool_call>{"name": "f", "arguments": "{\\"a\\":1}"}</tool_call>')
    assert json.loads(parsed.tool_calls[0]["function"]["arguments"]) == {"a": 1}


def test_parameters_are_an_objects_schema_or_left_out() -> None:
    check_parameters(None, "tools")
    check_parameters({}, "tools")  # no parameters, as some clients write it
    check_parameters({"type": "object", "properties": {"a": {"$ref": "#/$defs/A"}}, "$defs": {"A": {}}}, "tools")
    for bad in ({"type": "string"}, {"properties": {}}, {"type": "object", "properties": 3}):
        with pytest.raises(GrammarError) as info:
            check_parameters(bad, "tools.0.parameters")
        assert info.value.param == "tools.0.parameters"


def _rules(*names: str, parallel: bool = True) -> CallRules:
    return CallRules(frozenset(names or ("f", "g")), parallel)


def test_a_call_to_a_function_the_request_did_not_declare_is_no_call() -> None:
    """A client cannot run a function it never declared: such a block stays text, as written, closed or not."""
    stray = '<tool_call>\n{"name": "rm_rf", "arguments": {}}\n</tool_call>'
    parsed = _rules("f").split(f"Sure. {stray} {CALL}")
    assert parsed.content == f"Sure. {stray}" and [c["function"]["name"] for c in parsed.tool_calls] == ["f"]
    unclosed = 'Hi <tool_call>{"name": "rm_rf", "arguments": {}}'
    assert _rules("f").split(unclosed) == ParsedOutput(unclosed, [])
    assert _rules("f").split(f"{CALL}\n{unclosed}").content == unclosed
    assert len(parse_tool_calls(stray).tool_calls) == 1  # without declared names (no rules), any name


def test_without_parallel_calls_only_the_first_call_counts() -> None:
    second = CALL.replace('"f"', '"g"')
    for rules, names in ((_rules(), ["f", "g"]), (_rules(parallel=False), ["f"])):
        parsed = rules.split(f"Both: {CALL}\n{second}\nDone.")
        assert [c["function"]["name"] for c in parsed.tool_calls] == names
        assert parsed.content == "Both: \n\nDone."  # the text between the blocks as written


ANSWERS = [
    "Plain text, no call at all.  ",
    "  leading space, then a tag-like < tool_call and <tool_",
    f"Sure!\n{CALL}\n",
    f"Sure!  \n\n{CALL}\nAnd some text after the call.",
    f"{CALL}\n{CALL.replace('f', 'g')}",
    f"x <tool_call>not json</tool_call> y {CALL} z",
    'Cut off: <tool_call>{"name": "f", "argu',
    'A stray: <tool_call>{"name": "zz", "arguments": {}}</tool_call> tail',
    f"  \n{CALL}",
    'HTML: <tool_call>{"name": "f", "arguments": {"h": "</tool_call>"}}</tool_call> after',
    'Unclosed: <tool_call>{"name": "g", "arguments": {}} and text after',
]


@pytest.mark.parametrize("answer", ANSWERS)
@pytest.mark.parametrize("parallel", [True, False])
@pytest.mark.parametrize("piece", [1, 3, 7, 1000])
def test_a_streamed_answer_splits_exactly_as_the_whole_answer(answer: str, parallel: bool, piece: int) -> None:
    """Every dialect streams through `CallStream`: what it sends as it goes plus the rest at the end must be the
    content of the plain answer, and the calls the same, however the text arrives."""
    rules = _rules("f", "g", parallel=parallel)
    stream, sent = rules.stream(), ""
    for at in range(0, len(answer), piece):
        out = stream.feed(answer[at : at + piece])
        assert "<tool_call>" not in out
        sent += out
    rest, calls = stream.finish()
    whole = rules.split(answer)
    assert sent + rest == (whole.content or "")
    assert [c["function"] for c in calls] == [c["function"] for c in whole.tool_calls]
