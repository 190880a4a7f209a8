"""Tool use on Anthropic's Messages API, through the official `anthropic` SDK on real servers.

Forced calls (`tool_choice` any or a named tool) run on the demo SmolLM2 (llama.cpp), whose input must validate
against the tool's `input_schema` whatever it samples; the `auto` path runs on a scripted Qwen2 that always answers
with text and then a `<tool_call>` block, so its tool_use blocks, stop reason and stream events are exact. History
(`tool_use` and `tool_result` blocks) is rendered as chat completions renders it: `count_tokens` equals `/tokenize` on
the same conversation in OpenAI's shape. Structured outputs (`output_config.format`, the SDK's `messages.parse`) run
on the demo model too, alone and beside tools; the SDK's beta tool runner, which asks for a message thread, on the
scripted Qwen2.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from enum import StrEnum
from typing import Any

import anthropic
import httpx
import jsonschema
import pytest
from pydantic import BaseModel

from qwen_api.engine.loading import resolve_model

from conftest import TOOL_SCHEMAS, WEATHER_DESCRIPTION, InProcessServer, sdk, serve_in_process

WEATHER = {"name": "get_weather", "description": WEATHER_DESCRIPTION, "input_schema": TOOL_SCHEMAS["get_weather"]}
TIME = {"name": "get_time", "input_schema": TOOL_SCHEMAS["get_time"]}
LOOKUP = {"name": "lookup", "description": "Look a city up.", "input_schema": {"type": "object"}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
# What the scripted Qwen2 answers to any chat prompt: text, then a call (no closing tag: its tokens must be distinct).
TEXT = "One moment."
SCRIPT = TEXT + '\n<tool_call>{"name": "lookup","arguments":{"city":"Paris"}}'
GREEDY = {"extra_body": {"temperature": 0}}


@pytest.fixture(scope="module")
def scripted(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InProcessServer]:
    from qwen_api.dev.random_qwen2 import write_scripted_qwen2

    with serve_in_process(write_scripted_qwen2(tmp_path_factory.mktemp("scripted-call"), SCRIPT)) as server:
        yield server


@pytest.fixture(scope="module")
def demo() -> Iterator[InProcessServer]:
    """SmolLM2-135M on llama.cpp: a real model, held to the call grammar."""
    source = resolve_model("demo")
    assert source.gguf_file is not None
    with serve_in_process(source.path / source.gguf_file, engine="llamacpp") as server:
        yield server


def claude(server: InProcessServer) -> anthropic.Anthropic:
    return sdk(anthropic.Anthropic, base_url=server.base_url, api_key="unused", max_retries=0, timeout=120)


def name(server: InProcessServer) -> str:
    assert server.runtime is not None
    return server.runtime.model_name


# ------------------------------------------------------------------------------------------ forced calls (grammar)
def test_tool_choice_any_is_one_call_whose_input_validates_beyond_stop_sequences(demo: InProcessServer) -> None:
    m = claude(demo).messages.create(
        model=name(demo), messages=ASK, tools=[WEATHER, TIME], max_tokens=80,
        tool_choice={"type": "any", "disable_parallel_tool_use": True},
        stop_sequences=["\n", "call", '"'],  # a forced call is the whole answer: no stop sequence cuts it
    )  # fmt: skip
    assert m.stop_reason == "tool_use" and m.stop_sequence is None, m.content
    [use] = m.content
    assert use.type == "tool_use" and use.id.startswith("toolu_") and use.name in ("get_weather", "get_time")
    jsonschema.validate(use.input, TOOL_SCHEMAS[use.name])


def test_tool_choice_tool_streams_the_named_call_as_block_0(demo: InProcessServer) -> None:
    """A forced call has no text: its tool_use block is block 0, its input one `input_json_delta`."""
    with claude(demo).messages.stream(
        model=name(demo), messages=ASK, tools=[WEATHER, TIME], tool_choice={"type": "tool", "name": "get_time"},
        max_tokens=80,
    ) as stream:  # fmt: skip
        events = [e for e in stream if e.type not in ("text", "input_json", "ping")]  # the SDK's derived events aside
        final = stream.get_final_message()
    assert [e.type for e in events] == [
        "message_start", "content_block_start", "content_block_delta", "content_block_stop", "message_delta",
        "message_stop",
    ]  # fmt: skip
    start, delta = events[1], events[2]
    assert start.index == delta.index == 0 and start.content_block.type == "tool_use"
    assert start.content_block.name == "get_time" and start.content_block.input == {}
    assert delta.delta.type == "input_json_delta"
    jsonschema.validate(json.loads(delta.delta.partial_json), TOOL_SCHEMAS["get_time"])
    [use] = final.content
    assert use.type == "tool_use" and use.id == start.content_block.id and final.stop_reason == "tool_use"
    assert use.input == json.loads(delta.delta.partial_json)


# ------------------------------------------------------------------------------------------ auto (the scripted Qwen2)
def test_auto_call_is_a_tool_use_block_beyond_stop_sequences(scripted: InProcessServer) -> None:
    client = claude(scripted)
    args: dict[str, Any] = {"model": name(scripted), "messages": ASK, "max_tokens": 60, **GREEDY}
    for extra in ({}, {"tool_choice": {"type": "auto"}}, {"stop_sequences": ["Paris", "lookup"]}):
        m = client.messages.create(**args, tools=[LOOKUP], **extra)
        assert m.stop_reason == "tool_use" and m.stop_sequence is None, m.content
        [text, use] = m.content
        assert text.type == "text" and text.text == TEXT
        assert use.type == "tool_use" and use.id.startswith("toolu_")
        assert (use.name, use.input) == ("lookup", {"city": "Paris"})
    # Without tools, or with tool_choice none (the tools not shown), the same answer is text, as written.
    bare = client.messages.create(**args)
    none = client.messages.create(**args, tools=[LOOKUP], tool_choice={"type": "none"})
    for m in (bare, none):
        assert [b.type for b in m.content] == ["text"] and m.content[0].text == SCRIPT
        assert m.stop_reason == "end_turn"
    assert none.usage.input_tokens == bare.usage.input_tokens
    # Stop sequences still apply to the text: the same request without tools is cut.
    cut = client.messages.create(**args, stop_sequences=["Paris"])
    assert cut.content[0].text == SCRIPT[: SCRIPT.index("Paris")] and cut.stop_reason == "stop_sequence"
    # max_tokens inside the call ('One moment.\n<tool_call>{"'): the text before it, never the call's markup,
    # streamed or not
    short = {**args, "max_tokens": 7, "tools": [LOOKUP]}
    truncated = client.messages.create(**short)
    assert [(b.type, b.text) for b in truncated.content] == [("text", TEXT)]  # type: ignore[union-attr]
    assert truncated.stop_reason == "max_tokens"
    with client.messages.stream(**short) as stream:
        assert "".join(stream.text_stream) == TEXT and stream.get_final_message().stop_reason == "max_tokens"


def test_auto_call_streamed_as_events_and_accumulated_by_the_sdk(scripted: InProcessServer) -> None:
    client, args = claude(scripted), {"model": name(scripted), "messages": ASK, "tools": [LOOKUP], "max_tokens": 60}
    with client.messages.stream(**args, **GREEDY) as stream:
        events = list(stream)
        final = stream.get_final_message()
    raw = [e for e in events if e.type not in ("text", "input_json")]  # the SDK's own derived events aside
    types = [e.type for e in raw if e.type != "ping"]
    assert types[:2] == ["message_start", "content_block_start"]
    assert types[-6:] == [
        "content_block_stop", "content_block_start", "content_block_delta", "content_block_stop", "message_delta",
        "message_stop",
    ]  # fmt: skip
    assert set(types[2:-6]) == {"content_block_delta"}
    starts = [e for e in raw if e.type == "content_block_start"]
    assert [(e.index, e.content_block.type) for e in starts] == [(0, "text"), (1, "tool_use")]
    tool_start = starts[1].content_block
    assert tool_start.name == "lookup" and tool_start.input == {} and tool_start.id.startswith("toolu_")
    deltas = [e for e in raw if e.type == "content_block_delta"]
    texts = [e.delta.text for e in deltas if e.index == 0]
    assert "".join(texts) == TEXT and not any("<" in t for t in texts)  # no markup leaks, not even a partial tag
    [json_delta] = [e.delta for e in deltas if e.index == 1]
    assert json_delta.type == "input_json_delta" and json.loads(json_delta.partial_json) == {"city": "Paris"}
    [message_delta] = [e for e in raw if e.type == "message_delta"]
    assert message_delta.delta.stop_reason == "tool_use" and message_delta.usage.output_tokens > 0
    assert final.stop_reason == "tool_use"
    [text, use] = final.content
    assert text.type == "text" and text.text == TEXT
    assert use.type == "tool_use" and use.id == tool_start.id and use.input == {"city": "Paris"}
    # A stop sequence inside the call does not cut it when streamed either.
    with client.messages.stream(**args, **GREEDY, stop_sequences=["Paris"]) as stream:
        stopped = stream.get_final_message()
    assert [b.type for b in stopped.content] == ["text", "tool_use"] and stopped.stop_reason == "tool_use"
    assert stopped.content[1].input == {"city": "Paris"}


# ------------------------------------------------------------------------------------------ history and counting
ROUND_TRIP = [
    *ASK,
    {
        "role": "assistant",
        "content": [
            {"type": "text", "text": "Let me look."},
            {"type": "tool_use", "id": "toolu_1", "name": "lookup", "input": {"city": "Paris"}},
        ],
    },
    {
        "role": "user",
        "content": [
            {"type": "tool_result", "tool_use_id": "toolu_1", "content": "21 degrees, clear"},
            {"type": "text", "text": "And in "},
            {"type": "text", "text": "Lyon?"},
        ],
    },
    {"role": "assistant",
     "content": [{"type": "tool_use", "id": "toolu_2", "name": "lookup", "input": {"city": "Lyon"}}]},
    {
        "role": "user",
        "content": [
            {"type": "tool_result", "tool_use_id": "toolu_2", "content": [{"type": "text", "text": "no such city"}],
             "is_error": True},
        ],
    },
]  # fmt: skip
# The same conversation as chat completions reads it.
OPENAI_ROUND_TRIP = [
    *ASK,
    {"role": "assistant", "content": "Let me look.", "tool_calls": [
        {"id": "toolu_1", "type": "function", "function": {"name": "lookup", "arguments": '{"city": "Paris"}'}}]},
    {"role": "tool", "tool_call_id": "toolu_1", "content": "21 degrees, clear"},
    {"role": "user", "content": "And in Lyon?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "toolu_2", "type": "function", "function": {"name": "lookup", "arguments": '{"city": "Lyon"}'}}]},
    # a tool_result with is_error: the model reads that the call failed, not only what its text says
    {"role": "tool", "tool_call_id": "toolu_2", "content": "Error: no such city"},
]  # fmt: skip
OPENAI_LOOKUP = {"type": "function", "function": {"name": "lookup", "description": "Look a city up.",
                                                  "parameters": {"type": "object"}}}  # fmt: skip


def test_round_trip_with_tool_results_and_counts_as_chat_completions(scripted: InProcessServer) -> None:
    client, model = claude(scripted), name(scripted)
    m = client.messages.create(model=model, messages=ROUND_TRIP, tools=[LOOKUP], max_tokens=60, **GREEDY)
    assert m.stop_reason == "tool_use" and m.content[-1].type == "tool_use"
    counted = client.messages.count_tokens(model=model, messages=ROUND_TRIP, tools=[LOOKUP])
    assert counted.input_tokens == m.usage.input_tokens
    # The prompt is chat completions' for the same conversation: the calls, results and tools block alike.
    for tools, openai_tools in (([LOOKUP], [OPENAI_LOOKUP]), (None, None)):
        extra = {"tools": openai_tools} if openai_tools else {}
        r = httpx.post(f"{scripted.base_url}/tokenize", json={"messages": OPENAI_ROUND_TRIP, **extra}, timeout=30)
        assert r.status_code == 200, r.text
        kwargs = {"tools": tools} if tools else {}
        assert (
            client.messages.count_tokens(model=model, messages=ROUND_TRIP, **kwargs).input_tokens == r.json()["count"]
        )
    text = httpx.post(f"{scripted.base_url}/detokenize", json={"tokens": r.json()["tokens"]}).json()["prompt"]
    assert '<tool_call>\n{"name": "lookup", "arguments": {"city": "Paris"}}\n</tool_call>' in text
    assert "<tool_response>\n21 degrees, clear\n</tool_response>" in text and "And in Lyon?" in text
    assert "<tool_response>\nError: no such city\n</tool_response>" in text
    # The response's own blocks go back as they came: the SDK's objects in the next request.
    result = {"type": "tool_result", "tool_use_id": m.content[-1].id, "content": "ok"}
    again = [*ASK, {"role": "assistant", "content": m.content}, {"role": "user", "content": [result]}]
    assert client.messages.create(model=model, messages=again, tools=[LOOKUP], max_tokens=5).stop_reason


def test_count_tokens_counts_the_tools_and_a_prefill_still_works(scripted: InProcessServer) -> None:
    client, model = claude(scripted), name(scripted)
    without = client.messages.count_tokens(model=model, messages=ASK).input_tokens
    with_tools = client.messages.count_tokens(model=model, messages=ASK, tools=[WEATHER, TIME]).input_tokens
    hidden = client.messages.count_tokens(
        model=model,
        messages=ASK,
        tools=[WEATHER, TIME],
        tool_choice={"type": "none"},
    ).input_tokens
    assert with_tools > without == hidden
    m = client.messages.create(model=model, messages=ASK, tools=[WEATHER, TIME], max_tokens=1)
    assert m.usage.input_tokens == with_tools
    # A last assistant turn is a prefill, with tools as without: counted after the template's assistant opener.
    prefill = [*ASK, {"role": "assistant", "content": "Sure"}]
    expected = with_tools + len(scripted.runtime.generator().text_prompt_ids("Sure"))
    assert client.messages.count_tokens(model=model, messages=prefill, tools=[WEATHER, TIME]).input_tokens == expected
    assert (
        client.messages.create(model=model, messages=prefill, tools=[WEATHER, TIME], max_tokens=2).usage.input_tokens
        == expected
    )


# ------------------------------------------------------------------------------------------ refusals
CALL = {"type": "tool_use", "id": "toolu_1", "name": "lookup", "input": {}}
RESULT = {"type": "tool_result", "tool_use_id": "toolu_1", "content": "ok"}


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "server tool"),
        ({"tools": [{"type": "bash_20250124", "name": "bash"}]}, "server tool"),
        ({"tools": [LOOKUP, LOOKUP]}, "unique"),
        ({"tools": [LOOKUP], "tool_choice": {"type": "tool", "name": "nope"}}, "nope"),
        ({"tool_choice": {"type": "any"}}, "needs tools"),
        ({"tool_choice": {"type": "tool", "name": "lookup"}}, "needs tools"),
        ({"tools": [LOOKUP], "tool_choice": {"type": "sometimes"}}, "tool_choice"),
        ({"tools": [{"name": "f", "input_schema": {"type": "object", "properties": {"a": {"type": 3}}}}]}, "tools.0"),
        ({"tools": [{"name": "f", "input_schema": {"type": "string"}}]}, "tools.0.input_schema"),
        ({"tools": [{"name": "bad name!", "input_schema": {"type": "object"}}]}, "tools.0.name"),
        ({"messages": [*ASK, {"role": "assistant", "content": "Hm."}, {"role": "user", "content": [RESULT]}]},
         "toolu_1"),
        ({"messages": [{"role": "user", "content": [CALL]}]}, "assistant turns"),
        ({"messages": [*ASK, {"role": "assistant", "content": [RESULT]}]}, "user turns"),
        ({"messages": [*ASK, {"role": "assistant", "content": [CALL]}]}, "tool_use"),
        ({"messages": [*ASK, {"role": "assistant", "content": [CALL]}, {"role": "user", "content": [RESULT]},
                       {"role": "assistant", "content": [CALL]}, {"role": "user", "content": [RESULT]}]}, "unique"),
        ({"messages": [*ASK, {"role": "assistant", "content": [{**CALL, "input": "{}"}]}]},
         "input: Input should be a valid dictionary"),
        ({"output_config": {"format": {"type": "json_schema", "schema": {"type": 3}}}},
         "output_config.format.schema: invalid JSON schema"),
        ({"output_config": {"format": {"type": "json_schema"}}}, "output_config.format.schema"),
        ({"output_config": {"format": {"type": "json_object"}}}, "output_config.format.type"),
        ({"output_config": {"format": {"type": "json_schema", "schema": {}, "name": "x"}}},
         "output_config.format.name"),
        ({"output_config": {"effort": "low"}}, "output_config.effort: this model has no effort levels"),
        ({"output_config": {"task_budget": {"type": "tokens", "total": 9}}}, "output_config.task_budget"),
        ({"output_config": {"verbosity": "low"}}, "output_config.verbosity"),
        ({"messages": [*ASK, {"role": "assistant", "content": "{"}],
          "output_config": {"format": {"type": "json_schema", "schema": {}}}}, "output_config.format"),
    ],
    ids=[
        "server-tool", "server-tool-bash", "duplicate-names", "unknown-named-tool", "any-without-tools",
        "tool-without-tools", "unknown-choice", "invalid-schema", "non-object-schema", "bad-name", "result-without-use",
        "use-in-user-turn", "result-in-assistant-turn", "use-in-final-turn", "repeated-use-id", "input-not-object",
        "invalid-format-schema", "format-without-schema", "format-json-object", "format-unknown-field", "effort",
        "task-budget", "output-config-unknown-field", "format-after-prefill",
    ],
)  # fmt: skip
def test_bad_tool_requests_are_400_in_anthropic_shape(scripted: InProcessServer, change: dict, needle: str) -> None:
    body = {"model": name(scripted), "messages": ASK, **change}
    for route, extra in (("messages", {"max_tokens": 10}), ("messages/count_tokens", {})):
        r = httpx.post(f"{scripted.base_url}/v1/{route}", json={**body, **extra}, timeout=30)
        assert r.status_code == 400, (route, r.text)
        payload = r.json()
        assert payload["type"] == "error" and set(payload["error"]) == {"type", "message"}
        assert payload["error"]["type"] == "invalid_request_error" and needle in payload["error"]["message"], payload
    with pytest.raises(anthropic.BadRequestError):
        claude(scripted).messages.create(max_tokens=10, **body)


# ------------------------------------------------------------------------------------------ structured outputs
class Colour(StrEnum):
    red = "red"
    green = "green"
    blue = "blue"


class Place(BaseModel):
    city: str
    population: int
    colour: Colour


DESCRIBE = [{"role": "user", "content": "Describe a city as JSON."}]
ANSWER = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
          "additionalProperties": False}  # fmt: skip


def test_output_config_format_through_the_sdk_parse_plain_and_streamed(demo: InProcessServer) -> None:
    """`messages.parse(output_format=Model)` sends `output_config.format`: the text is JSON in that schema, held
    there by the grammar (the SDK drops `maxLength` and such from the schema it sends; the grammar holds the rest)."""
    client = claude(demo)
    args: dict[str, Any] = {"model": name(demo), "messages": DESCRIBE, "max_tokens": 120, "output_format": Place}
    m = client.messages.parse(**args, **GREEDY)
    assert m.stop_reason == "end_turn", m.content
    assert isinstance(m.parsed_output, Place)
    # greedy, as the plain answer: sampled, the demo model may write a name that runs to max_tokens, since the SDK
    # sends the schema without its maxLength (a cut JSON the SDK then fails to parse; this failed in CI)
    with client.messages.stream(**args, **GREEDY) as stream:
        final = stream.get_final_message()
    assert final.stop_reason == "end_turn" and isinstance(final.parsed_output, Place), final.content
    assert final.parsed_output == m.parsed_output
    # The raw field, as langchain-anthropic sends it; count_tokens takes it too (the prompt is the same).
    fmt = {"output_config": {"format": {"type": "json_schema", "schema": ANSWER}}}
    raw = client.messages.create(model=name(demo), messages=DESCRIBE, max_tokens=20, **fmt, **GREEDY)
    jsonschema.validate(json.loads(raw.content[0].text), ANSWER)  # type: ignore[union-attr]
    counted = client.messages.count_tokens(model=name(demo), messages=DESCRIBE, **fmt).input_tokens
    assert counted == raw.usage.input_tokens
    # Stop sequences apply to the text, as chat completions' `stop` beside a `response_format`: one may cut it.
    cut = client.messages.create(model=name(demo), messages=DESCRIBE, max_tokens=20, stop_sequences=["{"], **fmt)
    assert cut.stop_reason == "stop_sequence" and cut.content == []  # empty: no block, as Anthropic answers


def test_output_config_format_beside_tools(demo: InProcessServer) -> None:
    """With `auto` tools the answer is calls or text in the format, as chat completions has it with a
    `response_format`; a forced call is the whole answer, the format has nothing to shape."""
    client = claude(demo)
    fmt = {"format": {"type": "json_schema", "schema": ANSWER}}
    args: dict[str, Any] = {"model": name(demo), "messages": ASK, "tools": [WEATHER], "output_config": fmt}
    for temperature, parallel in ((0.0, True), (1.0, False)):
        choice = {"tool_choice": {"type": "auto", "disable_parallel_tool_use": True}} if not parallel else {}
        m = client.messages.create(**args, **choice, max_tokens=80, extra_body={"temperature": temperature})
        if m.stop_reason == "tool_use":  # calls only: no text beside them, the grammar has none
            assert {b.type for b in m.content} == {"tool_use"} and (parallel or len(m.content) == 1), m.content
            for use in m.content:
                jsonschema.validate(use.input, TOOL_SCHEMAS["get_weather"])  # type: ignore[union-attr]
        else:
            assert m.stop_reason == "end_turn" and [b.type for b in m.content] == ["text"], m.content
            jsonschema.validate(json.loads(m.content[0].text), ANSWER)  # type: ignore[union-attr]
    forced = client.messages.create(**args, max_tokens=80, tool_choice={"type": "tool", "name": "get_weather"})
    assert forced.stop_reason == "tool_use" and [b.type for b in forced.content] == ["tool_use"]
    jsonschema.validate(forced.content[0].input, TOOL_SCHEMAS["get_weather"])  # type: ignore[union-attr]


def test_an_output_config_schema_that_cannot_be_enforced_is_a_400_naming_it(scripted: InProcessServer) -> None:
    body = {"model": name(scripted), "messages": ASK, "max_tokens": 10,
            "output_config": {"format": {"type": "json_schema", "schema": {"$ref": "#"}}}}  # fmt: skip
    r = httpx.post(f"{scripted.base_url}/v1/messages", json=body, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error", r.text
    assert r.json()["error"]["message"].startswith("output_config.format.schema: "), r.text


# ------------------------------------------------------------------------------------------ the SDK's tool runner
def test_the_sdk_tool_runner_goes_on_without_a_thread(
    scripted: InProcessServer, caplog: pytest.LogCaptureFixture
) -> None:
    """The beta tool runner asks for a server-held thread by default (`thread: {"type": "create"}`): refused, with
    Anthropic's `thread_unsupported_request` details, on which the runner sends the whole history instead."""
    caplog.set_level(logging.INFO, logger="anthropic.lib.threads")
    ran: list[str] = []

    @anthropic.beta_tool
    def lookup(city: str) -> str:
        """Look a city up."""
        ran.append(city)
        return "21 degrees"

    client, args = claude(scripted), {"model": name(scripted), "messages": ASK, "max_tokens": 60, **GREEDY}
    for thread in ({}, {"thread": False}):
        ran.clear()
        caplog.clear()
        replies = list(client.beta.messages.tool_runner(**args, tools=[lookup], max_iterations=2, **thread))
        assert [m.stop_reason for m in replies] == ["tool_use", "tool_use"], thread
        assert ran[:1] == ["Paris"] and replies[0].content[1].input == {"city": "Paris"}  # type: ignore[union-attr]
        # the SDK's own account: the first request asked for a thread, and the runner went on without one
        went_on = "continuing without a thread" in caplog.text
        assert went_on == (thread == {}), caplog.text
    # The refusal itself says why and what to do; a thread to continue is refused alike; null is no thread.
    url, body = f"{scripted.base_url}/v1/messages", {"model": name(scripted), "messages": ASK, "max_tokens": 5}
    for thread in ({"type": "create"}, {"type": "continue", "previous_message_id": "msg_1"}):
        r = httpx.post(url, json={**body, "thread": thread}, timeout=30)
        assert r.status_code == 400 and r.json()["type"] == "error", r.text
        error = r.json()["error"]
        assert error["type"] == "invalid_request_error" and "keeps no message threads" in error["message"]
        assert "thread=False" in error["message"] and error["details"] == {"error_code": "thread_unsupported_request"}
    with pytest.raises(anthropic.BadRequestError) as info:
        client.beta.messages.create(**body, thread={"type": "create"})
    assert info.value.error_code == "thread_unsupported_request"
    assert httpx.post(url, json={**body, "thread": None}, timeout=30).status_code == 200
