"""Function tool calling on OpenAI's Responses API (`POST /v1/responses`), through the official openai SDK.

Forced calls (`required`, a named function) run on the demo model (SmolLM2 on llama.cpp), whose calls only the
grammar makes valid; `auto` runs on a scripted Qwen2 that always answers with text and a `<tool_call>` block, so
the split into a message and a function_call item, plain and streamed, is exact. The history an SDK client sends
back (`input += response.output`, then `function_call_output`s) must reach the model as the same prompt as the
equivalent chat completions request: the token counts are compared.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import openai
import pytest

from conftest import TOOL_SCHEMAS, WEATHER_DESCRIPTION, InProcessServer, sdk, serve_engine, serve_in_process, sse_events

WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": WEATHER_DESCRIPTION,
    "parameters": TOOL_SCHEMAS["get_weather"],
    "strict": True,
}
TIME = {"type": "function", "name": "get_time", "parameters": TOOL_SCHEMAS["get_time"]}
LOOKUP = {"type": "function", "name": "lookup", "parameters": {"type": "object"}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
# What the scripted Qwen2 answers to anything: some text, then a call (its block left open, as small models do;
# the script needs distinct tokens, and the closing tag would repeat the opening one's).
TEXT_BEFORE = "Sure!"
SCRIPT = TEXT_BEFORE + ' <tool_call>{"name": "lookup","arguments":{"city":"Paris"}}'


def chat_tool(tool: dict[str, Any]) -> dict[str, Any]:
    """The same function tool in chat completions' nested shape."""
    return {"type": "function", "function": {k: v for k, v in tool.items() if k != "type"}}


@pytest.fixture(scope="module")
def demo() -> Iterator[InProcessServer]:
    """The demo model (SmolLM2-135M, no tool training) on llama.cpp: only the grammar makes its calls valid."""
    with serve_engine("llamacpp", Path("unused")) as server:
        yield server


@pytest.fixture(scope="module")
def scripted(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InProcessServer]:
    from qwen_api.dev.random_qwen2 import write_scripted_qwen2

    with serve_in_process(write_scripted_qwen2(tmp_path_factory.mktemp("scripted-call"), SCRIPT)) as server:
        yield server


def client_of(server: InProcessServer) -> openai.OpenAI:
    return sdk(openai.OpenAI, base_url=server.base_url + "/v1", api_key="none", max_retries=0, timeout=120)


def model_of(server: InProcessServer) -> str:
    assert server.runtime is not None
    return server.runtime.model_name


def chat_prompt_tokens(server: InProcessServer, messages: list[dict[str, Any]], tools: list[dict] | None) -> int:
    """What /v1/chat/completions counts as the prompt of these messages and (Responses-shaped) tools."""
    chat_tools = {"tools": [chat_tool(t) for t in tools]} if tools else {}
    out = client_of(server).chat.completions.create(
        model=model_of(server), messages=messages, max_tokens=1, temperature=0, **chat_tools
    )
    assert out.usage is not None
    return out.usage.prompt_tokens


def assert_call_item(item: Any, name: str) -> dict[str, Any]:
    """A function_call output item as OpenAI's: ids `fc_...` and `call_...`, completed, arguments JSON text."""
    assert item.type == "function_call" and item.name == name, item
    assert item.id.startswith("fc_") and item.call_id.startswith("call_") and item.status == "completed", item
    arguments = json.loads(item.arguments)
    assert isinstance(arguments, dict)
    return arguments


# ------------------------------------------------------------------------------------------------ forced calls
def test_required_and_named_calls_validate_plain_and_streamed(demo: InProcessServer) -> None:
    client = client_of(demo)
    args: dict[str, Any] = {"model": model_of(demo), "input": ASK, "tools": [WEATHER, TIME], "max_output_tokens": 80}
    for _ in range(2):  # sampled: whatever the model picks, the grammar keeps it a valid call
        r = client.responses.create(**args, tool_choice="required", temperature=1.0)
        assert r.status == "completed" and r.output_text == "", r.output
        [item] = r.output  # the whole answer is one call: no message item
        jsonschema.validate(assert_call_item(item, item.name), TOOL_SCHEMAS[item.name])
    assert [t.name for t in r.tools] == ["get_weather", "get_time"] and r.tool_choice == "required"  # echoed
    named = {"type": "function", "name": "get_time"}
    r = client.responses.create(**args, tool_choice=named, temperature=0)
    [item] = r.output
    jsonschema.validate(assert_call_item(item, "get_time"), TOOL_SCHEMAS["get_time"])
    assert r.tool_choice.type == "function" and r.tool_choice.name == "get_time"  # type: ignore[union-attr]
    # Streamed, greedy: the same call, through the SDK's stream helper.
    with client.responses.stream(**args, tool_choice=named, temperature=0) as stream:
        final = stream.get_final_response()
    [streamed] = final.output
    assert streamed.type == "function_call" and (streamed.name, streamed.arguments) == (item.name, item.arguments)


def test_round_trip_feeds_the_call_and_its_output_back(demo: InProcessServer) -> None:
    """The SDK's pattern: `input += response.output`, then a function_call_output; the next answer is a 200, and the
    model saw the history as /v1/chat/completions shows the same conversation (same prompt token count)."""
    client = client_of(demo)
    tools = [WEATHER]
    first = client.responses.create(
        model=model_of(demo), input=ASK, tools=tools, tool_choice="required", temperature=0, max_output_tokens=80
    )
    [call] = first.output
    assert call.type == "function_call"
    result = json.dumps({"temperature": 21, "sky": "clear"})
    history: list[Any] = [
        *ASK,
        *first.output,
        {"type": "function_call_output", "call_id": call.call_id, "output": result},
    ]
    second = client.responses.create(
        model=model_of(demo), input=history, tools=tools, temperature=0, max_output_tokens=40
    )
    assert second.status in ("completed", "incomplete") and second.output
    chat = [
        *ASK,
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": call.call_id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}]},
        {"role": "tool", "tool_call_id": call.call_id, "content": result},
    ]  # fmt: skip
    assert second.usage is not None and second.usage.input_tokens == chat_prompt_tokens(demo, chat, tools)


# ------------------------------------------------------------------------------------------------ auto
def test_auto_call_comes_back_as_a_message_and_a_function_call(scripted: InProcessServer) -> None:
    client = client_of(scripted)
    args: dict[str, Any] = {"model": model_of(scripted), "input": "Weather in Paris?", "temperature": 0}
    r = client.responses.create(**args, tools=[LOOKUP])
    assert r.status == "completed" and [o.type for o in r.output] == ["message", "function_call"], r.output
    assert r.output_text == TEXT_BEFORE and r.output[0].status == "completed"  # type: ignore[union-attr]
    assert assert_call_item(r.output[1], "lookup") == {"city": "Paris"}
    # tool_choice none: no tools shown (the prompt of a request without them), nothing parsed: the text as written.
    none, without = client.responses.create(**args, tools=[LOOKUP], tool_choice="none"), client.responses.create(**args)
    for bare in (none, without):
        assert [o.type for o in bare.output] == ["message"] and bare.output_text == SCRIPT
    assert none.usage is not None and without.usage is not None and r.usage is not None
    assert none.usage.input_tokens == without.usage.input_tokens < r.usage.input_tokens
    assert none.tool_choice == "none" and [t.name for t in none.tools] == ["lookup"]  # echoed as sent
    # Cut by max_output_tokens inside the call ('Sure! <tool_call>{"'): no call, and the text before it, without
    # the markup of the call cut off, streamed or not; incomplete.
    cut = client.responses.create(**args, tools=[LOOKUP], max_output_tokens=6)
    assert cut.status == "incomplete" and [o.type for o in cut.output] == ["message"]
    assert cut.output[0].status == "incomplete" and cut.output_text == TEXT_BEFORE  # type: ignore[union-attr]
    streamed = list(client.responses.create(**args, tools=[LOOKUP], max_output_tokens=6, stream=True))
    text = "".join(e.delta for e in streamed if e.type == "response.output_text.delta")
    assert text == TEXT_BEFORE and streamed[-1].type == "response.incomplete"


def test_auto_call_streamed_events_in_order(scripted: InProcessServer) -> None:
    client = client_of(scripted)
    args: dict[str, Any] = {
        "model": model_of(scripted),
        "input": "Weather in Paris?",
        "temperature": 0,
        "tools": [LOOKUP],
    }
    events = list(client.responses.create(**args, stream=True))
    types = [e.type for e in events]
    deltas = [e for e in events if e.type == "response.output_text.delta"]
    assert types == [
        "response.created", "response.in_progress", "response.output_item.added", "response.content_part.added",
        *["response.output_text.delta"] * len(deltas),
        "response.output_text.done", "response.content_part.done", "response.output_item.done",
        "response.output_item.added", "response.function_call_arguments.delta",
        "response.function_call_arguments.done", "response.output_item.done", "response.completed",
    ]  # fmt: skip
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert "".join(d.delta for d in deltas) == TEXT_BEFORE  # the markup was held back, never sent as text
    message_id = events[2].item.id  # type: ignore[union-attr]
    assert all(e.output_index == 0 and e.item_id == message_id for e in deltas)
    added, delta, done, item_done, completed = events[-5:]
    assert added.output_index == 1 and added.item.type == "function_call"  # type: ignore[union-attr]
    assert added.item.arguments == "" and added.item.status == "in_progress"  # type: ignore[union-attr]
    call_id = added.item.id  # type: ignore[union-attr]
    assert (delta.item_id, delta.output_index, done.item_id, done.output_index) == (call_id, 1, call_id, 1)  # type: ignore[union-attr]
    assert json.loads(delta.delta) == {"city": "Paris"} and done.arguments == delta.delta  # type: ignore[union-attr]
    assert item_done.output_index == 1 and item_done.item.id == call_id  # type: ignore[union-attr]
    assert assert_call_item(item_done.item, "lookup") == {"city": "Paris"}  # type: ignore[union-attr]
    response = completed.response  # type: ignore[union-attr]
    assert response.status == "completed" and [o.type for o in response.output] == ["message", "function_call"]
    assert response.output_text == TEXT_BEFORE and response.output[1].call_id == added.item.call_id  # type: ignore[union-attr]
    # The SDK's stream helper reassembles the same response.
    with client.responses.stream(**args) as stream:
        helper = list(stream)
        final = stream.get_final_response()
    snapshots = [e.snapshot for e in helper if e.type == "response.function_call_arguments.delta"]
    assert [json.loads(s) for s in snapshots] == [{"city": "Paris"}]
    assert final.output_text == TEXT_BEFORE and [o.type for o in final.output] == ["message", "function_call"]
    assert assert_call_item(final.output[1], "lookup") == {"city": "Paris"}
    # On the wire: named events, each its data's type, no [DONE].
    with httpx.stream("POST", f"{scripted.base_url}/v1/responses", json={**args, "stream": True}, timeout=60) as reply:
        raw = sse_events(reply)
    assert all(name == data["type"] for name, data in raw) and raw[-1][0] == "response.completed"


def test_history_of_calls_renders_as_on_chat_completions(scripted: InProcessServer) -> None:
    """`input += response.output` (a message and a function_call: one assistant turn), two consecutive calls (one
    turn), their outputs (tool messages): the same prompt as the equivalent chat completions request."""
    client = client_of(scripted)
    args: dict[str, Any] = {"model": model_of(scripted), "temperature": 0, "tools": [LOOKUP, TIME]}
    first = client.responses.create(**args, input=ASK)
    call = first.output[1]
    assert call.type == "function_call"
    history: list[Any] = [
        *ASK,
        *first.output,
        {"type": "function_call_output", "call_id": call.call_id, "output": "sunny"},
    ]
    second = client.responses.create(**args, input=history, max_output_tokens=2)
    chat_call = {"id": call.call_id, "type": "function", "function": {"name": "lookup", "arguments": call.arguments}}
    chat = [
        *ASK,
        {"role": "assistant", "content": TEXT_BEFORE, "tool_calls": [chat_call]},
        {"role": "tool", "tool_call_id": call.call_id, "content": "sunny"},
    ]
    assert second.usage is not None and second.usage.input_tokens == chat_prompt_tokens(scripted, chat, args["tools"])
    calls = [
        {"type": "function_call", "call_id": "a", "name": "lookup", "arguments": '{"city": "Oslo"}'},
        {"type": "function_call", "call_id": "b", "name": "get_time", "arguments": ""},  # empty: no arguments
    ]
    outputs = [  # text parts, as the SDK may send them; an output may come later than the next call
        {"type": "function_call_output", "call_id": "b", "output": [{"type": "input_text", "text": "12:00"}]},
        {"type": "function_call_output", "call_id": "a", "output": "rain"},
    ]
    third = client.responses.create(
        **args, input=[*ASK, *calls, *outputs], instructions="Be terse.", max_output_tokens=2
    )
    chat = [
        {"role": "system", "content": "Be terse."},
        *ASK,
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "a", "type": "function", "function": {"name": "lookup", "arguments": '{"city": "Oslo"}'}},
            {"id": "b", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "b", "content": "12:00"},
        {"role": "tool", "tool_call_id": "a", "content": "rain"},
    ]  # fmt: skip
    assert third.usage is not None and third.usage.input_tokens == chat_prompt_tokens(scripted, chat, args["tools"])


# ------------------------------------------------------------------------------------------------ bad input
CALL = {"type": "function_call", "call_id": "c1", "name": "lookup", "arguments": "{}"}
IMAGE = {"type": "input_image", "image_url": "https://example.com/a.png"}
IMAGE_OUTPUT = {"type": "function_call_output", "call_id": "c1", "output": [IMAGE]}  # text only here


@pytest.mark.parametrize(
    ("change", "param", "needle"),
    [
        ({"tools": [{"type": "web_search"}]}, "tools", "only function tools"),
        ({"tools": [{"type": "function", "parameters": {"type": "object"}}]}, "tools.0.name", "required"),
        ({"tools": [LOOKUP, LOOKUP]}, "tools", "same name"),
        ({"tools": [{"type": "function", "name": "f", "parameters": {"type": 3}}]}, "tools.0.parameters", "schema"),
        ({"tools": [LOOKUP], "tool_choice": {"type": "function", "name": "nope"}}, "tool_choice", "nope"),
        ({"tool_choice": "required"}, "tool_choice", "a tool must be given"),
        ({"tools": [LOOKUP], "tool_choice": {"type": "file_search"}}, "tool_choice", "built-in"),
        ({"tools": [LOOKUP], "tool_choice": "sometimes"}, "tool_choice", "required"),
        (
            {"input": [*ASK, {"type": "function_call_output", "call_id": "c9", "output": "x"}]},
            "input.1.call_id",
            "no function_call",
        ),
        (
            {"input": [*ASK, {"type": "function_call_output", "call_id": "c1", "output": "x"}, CALL]},
            "input.1.call_id",
            "no function_call",
        ),
        ({"input": [*ASK, {**CALL, "arguments": "{city: Paris"}]}, "input.1.arguments", "JSON"),
        ({"input": [*ASK, CALL, CALL]}, "input.2.call_id", "earlier function_call"),
        (  # its arguments are a JSON object: a function whose schema is of another type could not be called
            {"tools": [{"type": "function", "name": "f", "parameters": {"type": "string"}}]},
            "tools.0.parameters",
            '"object"',
        ),
        ({"input": [*ASK, CALL, IMAGE_OUTPUT]}, "input.2.output", "input_text"),
    ],
)
def test_bad_tool_input_is_a_400_naming_the_field(
    scripted: InProcessServer, change: dict[str, Any], param: str, needle: str
) -> None:
    body = {"model": model_of(scripted), "input": ASK, "max_output_tokens": 2, **change}
    reply = httpx.post(f"{scripted.base_url}/v1/responses", json=body, timeout=60)
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param, error
    assert needle in error["message"], error
