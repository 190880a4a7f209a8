"""The other API dialects through their official SDKs against live servers: OpenAI's Responses API (`openai`),
Anthropic's Messages API (`anthropic`, sync, async and streaming), `/v1/models` and `/v1/models/{id}` (in each
dialect's shape), `/tokenize` and `/detokenize`. Exact text, stop sequences and usage on the scripted Qwen2; the API
key, admission and cancellation on a tiny random Qwen2 with room for one sequence.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, get_args

import anthropic
import httpx
import openai
import pytest
from openai.types.responses import ResponseError

from conftest import SCRIPT, InProcessServer, sdk, serve_in_process, sse_events

STOP = "<<STOP>>"
BEFORE_STOP = SCRIPT[: SCRIPT.index(STOP)]
KEY = "s3cret-key"
HI = [{"role": "user", "content": "Hi"}]
# anthropic 2.x's methods take no sampling arguments (temperature, top_p, top_k): they go in the body as extras.
GREEDY = {"extra_body": {"temperature": 0}}


@pytest.fixture(scope="module")
def guarded(tiny_qwen2_dir: Path) -> Iterator[InProcessServer]:
    """A random tiny Qwen2 (answers run to their length) behind an API key, with room for one sequence."""
    with serve_in_process(tiny_qwen2_dir, api_key=KEY, max_batch_size=1, max_waiting_sequences=0) as server:
        yield server


def oai(server: InProcessServer, key: str = "unused") -> openai.OpenAI:
    return sdk(openai.OpenAI, base_url=f"{server.base_url}/v1", api_key=key, max_retries=0, timeout=120)


def claude(server: InProcessServer, key: str = "unused") -> anthropic.Anthropic:
    return sdk(anthropic.Anthropic, base_url=server.base_url, api_key=key, max_retries=0, timeout=120)


def name(server: InProcessServer) -> str:
    assert server.runtime is not None
    return server.runtime.model_name


def prompt_ids(server: InProcessServer, messages: list[dict[str, str]]) -> list[int]:
    return server.runtime.generator().chat_prompt_ids(messages)


def script_tokens(server: InProcessServer) -> list[int]:
    return server.runtime.generator().text_prompt_ids(SCRIPT)


def tokens_through_stop(server: InProcessServer) -> int:
    """How many of the script's tokens the model produces until the stop string is complete: an independent count."""
    generator, ids = server.runtime.generator(), script_tokens(server)
    return next(k for k in range(1, len(ids) + 1) if STOP in generator.tokenizer.decode(ids[:k]))


# ------------------------------------------------------------------------------------------------ Responses API
def test_responses_create_exact_text_and_usage(scripted_server: InProcessServer) -> None:
    r = oai(scripted_server).responses.create(
        model=name(scripted_server), instructions="Be terse.", input="Hi", temperature=0, store=False
    )
    assert r.object == "response" and r.id.startswith("resp_") and r.status == "completed"
    assert r.output_text == SCRIPT and r.incomplete_details is None
    [item] = r.output
    assert item.type == "message" and item.role == "assistant" and item.status == "completed"
    expected_input = len(prompt_ids(scripted_server, [{"role": "system", "content": "Be terse."}, *HI]))
    assert r.usage is not None
    assert (r.usage.input_tokens, r.usage.output_tokens) == (expected_input, len(script_tokens(scripted_server)) + 1)
    assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens
    assert r.temperature == 0 and r.instructions == "Be terse."


def test_responses_input_messages_with_text_parts(scripted_server: InProcessServer) -> None:
    history = [
        {"role": "developer", "content": "Be terse."},
        {"role": "user", "content": [{"type": "input_text", "text": "Hi "}, {"type": "input_text", "text": "there"}]},
        {
            "type": "message",
            "role": "assistant",
            "content": [{"type": "output_text", "text": "Hello", "annotations": []}],
        },
        {"role": "user", "content": "Again"},
    ]
    r = oai(scripted_server).responses.create(model=name(scripted_server), input=history, temperature=0)
    flat = [
        {"role": "system", "content": "Be terse."},
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "Again"},
    ]
    assert r.output_text == SCRIPT
    assert r.usage is not None and r.usage.input_tokens == len(prompt_ids(scripted_server, flat))


def test_responses_stream_events_in_order(scripted_server: InProcessServer) -> None:
    with oai(scripted_server).responses.stream(model=name(scripted_server), input="Hi", temperature=0) as stream:
        events = list(stream)
        final = stream.get_final_response()
    types = [e.type for e in events]
    head = ["response.created", "response.in_progress", "response.output_item.added", "response.content_part.added"]
    tail = ["response.output_text.done", "response.content_part.done", "response.output_item.done"]
    assert types[:4] == head and types[-4:] == [*tail, "response.completed"]
    assert set(types[4:-4]) == {"response.output_text.delta"}
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == SCRIPT
    assert final.output_text == SCRIPT and final.status == "completed"
    assert final.usage is not None and final.usage.output_tokens == len(script_tokens(scripted_server)) + 1
    assert final.usage.input_tokens == len(prompt_ids(scripted_server, HI))


def test_responses_stream_is_named_sse_without_done(scripted_server: InProcessServer) -> None:
    body = {"model": name(scripted_server), "input": "Hi", "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{scripted_server.base_url}/v1/responses", json=body, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r)
    assert all(event == data["type"] for event, data in events)
    assert events[-1][1]["response"]["output"][0]["content"][0]["text"] == SCRIPT


def test_responses_cut_by_max_output_tokens_is_incomplete(scripted_server: InProcessServer) -> None:
    client = oai(scripted_server)
    r = client.responses.create(model=name(scripted_server), input="Hi", temperature=0, max_output_tokens=3)
    assert r.status == "incomplete" and r.incomplete_details is not None
    assert r.incomplete_details.reason == "max_output_tokens"
    assert r.usage is not None and r.usage.output_tokens == 3
    assert r.output_text and SCRIPT.startswith(r.output_text)
    events = list(
        client.responses.create(
            model=name(scripted_server), input="Hi", temperature=0, max_output_tokens=3, stream=True
        )
    )
    assert events[-1].type == "response.incomplete"
    assert events[-1].response.usage.output_tokens == 3 and events[-1].response.output_text == r.output_text


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"tools": [{"type": "web_search"}]}, "tools"),  # built-in tools; function tools: test_responses_tools
        ({"previous_response_id": "resp_123"}, "previous_response_id"),
        ({"store": True}, "store"),
        ({"background": True}, "background"),
        ({"text": {"format": {"type": "json_schema", "schema": {}}}}, "text.format"),  # no name
        ({"text": {"format": {"type": "xml"}}}, "text.format"),
        ({"truncation": "auto"}, "truncation"),
        ({"include": ["file_search_call.results"]}, "include"),
        ({"top_logprobs": 3}, "top_logprobs"),  # without include: message.output_text.logprobs
        ({"reasoning": {"effort": "high"}}, "reasoning"),
        ({"temperature": 2.5}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"max_output_tokens": 0}, "max_output_tokens"),
        ({"max_output_tokens": 10**6}, "max_output_tokens"),
        ({"input": ""}, "input"),
        ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, "input"),
        ({"extra_body": {"frobnicate": 1}}, "frobnicate"),
        ({"text": {"format": {"type": "json_schema", "name": "x"}}}, "text.format"),  # a schema is required here
    ],
)
def test_responses_refusals_are_400_naming_the_field(
    scripted_server: InProcessServer, kwargs: dict, param: str
) -> None:
    kwargs = {"input": "Hi", **kwargs}
    with pytest.raises(openai.BadRequestError) as info:
        oai(scripted_server).responses.create(model=name(scripted_server), **kwargs)
    error = info.value.body
    assert isinstance(error, dict) and set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    assert param in (error["param"] or "") or param in error["message"]


def test_responses_prompt_beyond_context_and_unknown_model(scripted_server: InProcessServer) -> None:
    client = oai(scripted_server)
    with pytest.raises(openai.BadRequestError) as info:
        client.responses.create(model=name(scripted_server), input="hello " * 40000, max_output_tokens=10)
    error = info.value.body
    assert isinstance(error, dict) and error["code"] == "context_length_exceeded"
    assert "10 new tokens" in error["message"] and "limit of" in error["message"]
    with pytest.raises(openai.NotFoundError) as info:
        client.responses.create(model="gpt-5", input="Hi")
    assert isinstance(info.value.body, dict) and info.value.body["code"] == "model_not_found"


# Every object must hold another: llguidance compiles it, then gives up a few tokens into the output.
ENDLESS = {"type": "object", "properties": {"a": {"$ref": "#"}}, "required": ["a"], "additionalProperties": False}
# The codes a failed Response's `error` may have: a closed set in the official SDK.
RESPONSE_ERROR_CODES = set(get_args(ResponseError.model_fields["code"].annotation))


def assert_ends_failed(events: list[Any], code: str, type_: str, message: str) -> Any:
    """A failed Responses stream, as the SDK parsed it: the `error` event with this server's own code, then
    `response.failed` last (the response so far: its message item `incomplete` with the text the deltas sent,
    `error` with a code of the SDK's set), every event numbered in order. Returns the failed Response."""
    types = [e.type for e in events]
    assert types[0] == "response.created" and types[-2:] == ["error", "response.failed"], types[-4:]
    assert not {"response.completed", "response.incomplete"} & set(types)
    assert [e.sequence_number for e in events] == list(range(len(events)))
    error_event, failed = events[-2], events[-1].response
    assert error_event.code == code and message in error_event.message
    assert failed.id == events[0].response.id and failed.status == "failed" and failed.error is not None
    assert failed.error.code in RESPONSE_ERROR_CODES and failed.error.message == error_event.message
    assert failed.error.model_dump()["type"] == type_
    assert failed.incomplete_details is None and failed.usage is None
    [item] = failed.output
    assert item.type == "message" and item.status == "incomplete"
    assert item.content[0].text == "".join(e.delta for e in events if e.type == "response.output_text.delta")
    return failed


def test_responses_stream_failed_mid_way_ends_with_response_failed(tiny_qwen2_dir: Path) -> None:
    """A stream past the request's deadline ends as OpenAI ends a failed response (no bare `error` event last):
    the SDK's stream helper gets `response.failed` with the server's message and the text it had sent."""
    with serve_in_process(tiny_qwen2_dir, request_timeout=0.5, max_new_tokens_limit=4000) as server:
        args = {"model": name(server), "input": "go", "max_output_tokens": 4000, "temperature": 0}
        with oai(server).responses.stream(**args) as stream:
            events = list(stream)
            with pytest.raises(RuntimeError):  # the SDK's own: no `response.completed`; the failure is the event
                stream.get_final_response()
        failed = assert_ends_failed(events, "request_timeout", "timeout", "timed out after 0.5 s")
        assert failed.error is not None and failed.error.code == "server_error" and failed.model == name(server)
        assert failed.output_text, "the deltas sent before the deadline are in the failed response"
        body = {**args, "stream": True}
        with httpx.stream("POST", f"{server.base_url}/v1/responses", json=body, timeout=60) as r:
            raw = sse_events(r)  # no [DONE] either
        assert [n for n, _ in raw][-2:] == ["error", "response.failed"]
        assert all(n == data["type"] for n, data in raw)


def test_responses_stream_with_a_schema_given_up_on_ends_with_response_failed(
    scripted_server: InProcessServer,
) -> None:
    fmt = {"type": "json_schema", "name": "endless", "schema": ENDLESS}
    events = list(
        oai(scripted_server).responses.create(
            model=name(scripted_server), input="Hi", max_output_tokens=200, text={"format": fmt}, stream=True
        )
    )
    failed = assert_ends_failed(events, "schema_not_followed", "invalid_request_error", "schema")
    assert failed.error is not None and failed.error.code == "invalid_prompt"


# ------------------------------------------------------------------------------------------------ Anthropic API
def test_messages_exact_text_usage_and_end_turn(scripted_server: InProcessServer) -> None:
    m = claude(scripted_server).messages.create(
        model=name(scripted_server),
        system=[{"type": "text", "text": "Be "}, {"type": "text", "text": "terse."}],
        messages=HI,
        max_tokens=100,
        **GREEDY,
        metadata={"user_id": "u-1"},
    )
    assert m.type == "message" and m.role == "assistant" and m.id.startswith("msg_")
    assert [b.type for b in m.content] == ["text"] and m.content[0].text == SCRIPT
    assert m.stop_reason == "end_turn" and m.stop_sequence is None
    expected_input = len(prompt_ids(scripted_server, [{"role": "system", "content": "Be terse."}, *HI]))
    assert (m.usage.input_tokens, m.usage.output_tokens) == (expected_input, len(script_tokens(scripted_server)) + 1)


def test_messages_stop_sequence_and_max_tokens(scripted_server: InProcessServer) -> None:
    client = claude(scripted_server)
    m = client.messages.create(
        model=name(scripted_server), messages=HI, max_tokens=100, **GREEDY, stop_sequences=["nope", STOP]
    )
    assert m.content[0].text == BEFORE_STOP
    assert m.stop_reason == "stop_sequence" and m.stop_sequence == STOP
    assert m.usage.output_tokens == tokens_through_stop(scripted_server)
    m = client.messages.create(model=name(scripted_server), messages=HI, max_tokens=3, **GREEDY)
    assert m.stop_reason == "max_tokens" and m.usage.output_tokens == 3 and SCRIPT.startswith(m.content[0].text)


def test_an_empty_message_has_no_content_blocks_plain_or_streamed(scripted_server: InProcessServer) -> None:
    """An answer a stop sequence ends before any text is `content: []`, as Anthropic's (which refuses an empty text
    block sent back in a history): it was one empty text block, and its stream opened that block."""
    client, first = claude(scripted_server), SCRIPT[:1]
    args = {"model": name(scripted_server), "messages": HI, "max_tokens": 20, **GREEDY, "stop_sequences": [first]}
    m = client.messages.create(**args)
    assert (m.content, m.stop_reason, m.stop_sequence) == ([], "stop_sequence", first)
    with client.messages.stream(**args) as stream:
        events = [e.type for e in stream]
        final = stream.get_final_message()
    assert final.content == [] and "content_block_start" not in events and events[-1] == "message_stop"


def test_messages_stream_with_sdk_helper(scripted_server: InProcessServer) -> None:
    with claude(scripted_server).messages.stream(
        model=name(scripted_server), messages=HI, max_tokens=100, **GREEDY, stop_sequences=[STOP]
    ) as stream:
        pieces = list(stream.text_stream)
        final = stream.get_final_message()
    assert "".join(pieces) == BEFORE_STOP and not any("<" in p for p in pieces)  # the stop string never leaks
    assert final.content[0].text == BEFORE_STOP
    assert final.stop_reason == "stop_sequence" and final.stop_sequence == STOP
    assert final.usage.output_tokens == tokens_through_stop(scripted_server)
    assert final.usage.input_tokens == len(prompt_ids(scripted_server, HI))


def test_messages_stream_events_in_order(scripted_server: InProcessServer) -> None:
    body = {"model": name(scripted_server), "messages": HI, "max_tokens": 100, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{scripted_server.base_url}/v1/messages", json=body, timeout=60) as r:
        assert r.status_code == 200
        events = sse_events(r)
    assert all(event == data["type"] for event, data in events)
    types = [t for t, _ in events if t != "ping"]
    assert types[:2] == ["message_start", "content_block_start"]
    assert types[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert set(types[2:-3]) == {"content_block_delta"}
    text = "".join(d["delta"]["text"] for t, d in events if t == "content_block_delta")
    assert text == SCRIPT
    assert events[0][1]["message"]["usage"]["input_tokens"] == len(prompt_ids(scripted_server, HI))
    [delta] = [d for t, d in events if t == "message_delta"]
    assert delta["delta"] == {"stop_reason": "end_turn", "stop_sequence": None}
    assert delta["usage"]["output_tokens"] == len(script_tokens(scripted_server)) + 1


def test_streamed_message_delta_carries_the_whole_usage(scripted_server: InProcessServer) -> None:
    """`message_delta.usage` is cumulative, input tokens included, as Anthropic's is: langchain-anthropic builds a
    stream's usage from it alone, and read 0 input tokens. The same usage as the plain answer's, and message_start's
    input count; prompt caching is not tracked and reads 0 in all three."""
    client = claude(scripted_server)
    kwargs = {"model": name(scripted_server), "messages": HI, "max_tokens": 100, **GREEDY}
    expected = {
        "input_tokens": len(prompt_ids(scripted_server, HI)),
        "output_tokens": len(script_tokens(scripted_server)) + 1,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
    }
    plain = client.messages.create(**kwargs)
    assert plain.usage.model_dump(exclude_none=True) == expected
    with client.messages.stream(**kwargs) as stream:
        events = list(stream)
        final = stream.get_final_message()
    [start] = [e for e in events if e.type == "message_start"]
    [delta] = [e for e in events if e.type == "message_delta"]
    assert delta.usage.model_dump(exclude_none=True) == expected  # the SDK's MessageDeltaUsage
    assert start.message.usage.model_dump(exclude_none=True) == {**expected, "output_tokens": 0}
    assert final.usage.model_dump(exclude_none=True) == expected


def test_messages_async_client_plain_and_streamed_together(scripted_server: InProcessServer) -> None:
    async def main() -> tuple[str, str]:
        client = anthropic.AsyncAnthropic(base_url=scripted_server.base_url, api_key="unused", max_retries=0)
        async with client:
            return await both(client)

    async def both(client: anthropic.AsyncAnthropic) -> tuple[str, str]:
        kwargs = {"model": name(scripted_server), "messages": HI, "max_tokens": 100, **GREEDY}

        async def streamed() -> str:
            async with client.messages.stream(**kwargs) as stream:
                return "".join([p async for p in stream.text_stream])

        plain, text = await asyncio.gather(client.messages.create(**kwargs), streamed())
        return plain.content[0].text, text

    assert asyncio.run(main()) == (SCRIPT, SCRIPT)


def test_count_tokens_equals_usage_input_tokens(scripted_server: InProcessServer) -> None:
    client = claude(scripted_server)
    conversation = {
        "model": name(scripted_server),
        "system": "Be terse.",
        "messages": [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": [{"type": "text", "text": "Hello!"}]},
            {"role": "user", "content": "你好 🦜"},
        ],
    }
    counted = client.messages.count_tokens(**conversation).input_tokens
    m = client.messages.create(**conversation, max_tokens=1, **GREEDY)
    assert counted == m.usage.input_tokens > 10
    # A last assistant turn is a prefill: counted after the template's assistant opener.
    prefill = {**conversation, "messages": [*conversation["messages"], {"role": "assistant", "content": "Sure"}]}
    generator = scripted_server.runtime.generator()
    expected = counted + len(generator.text_prompt_ids("Sure"))
    assert client.messages.count_tokens(**prefill).input_tokens == expected
    assert client.messages.create(**prefill, max_tokens=1).usage.input_tokens == expected


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"extra_body": {"temperature": 1.5}}, "temperature"),
        ({"extra_body": {"temperature": -0.1}}, "temperature"),
        ({"extra_body": {"top_p": 0}}, "top_p"),
        ({"extra_body": {"top_k": -1}}, "top_k"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": 10**6}, "max_tokens"),
        ({"stop_sequences": ["x"] * 9}, "stop_sequences"),
        ({"stop_sequences": [""]}, "stop_sequences"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]}, "messages"),
        ({"messages": [{"role": "system", "content": "Hi"}]}, "messages"),
        ({"messages": [{"role": "assistant", "content": "Sure"}]}, "messages"),
        ({"messages": [*HI, {"role": "assistant", "content": "Sure "}]}, "messages"),
        ({"tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "tools"),  # server tools
        ({"thinking": {"type": "enabled", "budget_tokens": 1024}}, "thinking"),
        ({"extra_body": {"frobnicate": 1}}, "frobnicate"),
    ],
)
def test_messages_out_of_range_is_400_in_anthropic_shape(
    scripted_server: InProcessServer, kwargs: dict, field: str
) -> None:
    kwargs = {"messages": HI, "max_tokens": 10, **kwargs}
    with pytest.raises(anthropic.BadRequestError) as info:
        claude(scripted_server).messages.create(model=name(scripted_server), **kwargs)
    body = info.value.body
    assert isinstance(body, dict) and body["type"] == "error" and set(body["error"]) == {"type", "message"}
    assert body["error"]["type"] == "invalid_request_error" and field in body["error"]["message"]


def test_messages_missing_max_tokens_bad_json_and_unknown_model(scripted_server: InProcessServer) -> None:
    url = f"{scripted_server.base_url}/v1/messages"
    for content in (json.dumps({"model": name(scripted_server), "messages": HI}), "{not json"):
        r = httpx.post(url, content=content, headers={"content-type": "application/json"}, timeout=30)
        assert r.status_code == 400 and r.json()["type"] == "error"
        assert r.json()["error"]["type"] == "invalid_request_error"
    assert "max_tokens" in httpx.post(url, json={"model": name(scripted_server), "messages": HI}).text
    for route, extra in (("messages", {"max_tokens": 5}), ("messages/count_tokens", {})):
        r = httpx.post(f"{url.removesuffix('messages')}{route}", json={"model": "claude-x", "messages": HI, **extra})
        assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
    with pytest.raises(anthropic.NotFoundError):
        claude(scripted_server).messages.count_tokens(model="claude-x", messages=HI)


def test_messages_prompt_beyond_context_is_400_naming_both_numbers(scripted_server: InProcessServer) -> None:
    with pytest.raises(anthropic.BadRequestError) as info:
        claude(scripted_server).messages.create(
            model=name(scripted_server), messages=[{"role": "user", "content": "hello " * 40000}], max_tokens=10
        )
    body = info.value.body
    assert isinstance(body, dict) and body["error"]["type"] == "invalid_request_error"
    assert "10 new tokens" in body["error"]["message"] and "limit of" in body["error"]["message"]


# ------------------------------------------------------------------------------- API key, admission, cancellation
def test_api_key_as_bearer_or_x_api_key_and_wrong_key_in_each_shape(guarded: InProcessServer) -> None:
    kwargs = {"model": name(guarded), "messages": HI, "max_tokens": 2}
    assert claude(guarded, KEY).messages.create(**kwargs).usage.output_tokens == 2  # the SDK sends a bearer token
    by_header = sdk(
        anthropic.Anthropic, base_url=guarded.base_url, api_key=None, default_headers={"X-Api-Key": KEY}, max_retries=0
    )
    assert by_header.messages.count_tokens(model=name(guarded), messages=HI).input_tokens > 0
    with pytest.raises(anthropic.AuthenticationError) as info:
        claude(guarded, "wrong").messages.create(**kwargs)
    assert isinstance(info.value.body, dict) and info.value.body["error"]["type"] == "authentication_error"
    assert oai(guarded, KEY).responses.create(model=name(guarded), input="Hi", max_output_tokens=2).status
    with pytest.raises(openai.AuthenticationError) as oinfo:
        oai(guarded, "wrong").responses.create(model=name(guarded), input="Hi", max_output_tokens=2)
    assert isinstance(oinfo.value.body, dict) and oinfo.value.body["type"] == "authentication_error"
    for path in ("/tokenize", "/detokenize"):
        r = httpx.post(f"{guarded.base_url}{path}", json={"prompt": "Hi"}, headers={"x-api-key": "wrong"})
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"


def test_full_server_refuses_in_each_shape_and_a_departed_stream_frees_its_slot(guarded: InProcessServer) -> None:
    headers = {"authorization": f"Bearer {KEY}"}
    body = {"model": name(guarded), "input": "Hi", "max_output_tokens": 1500, "stream": True}
    with httpx.Client(base_url=guarded.base_url, headers=headers, timeout=60) as http:
        with http.stream("POST", "/v1/responses", json=body) as stream:  # takes the only slot
            assert stream.status_code == 200
            lines = stream.iter_lines()  # held: a dropped iterator would close the response, and so leave
            assert next(lines) == "event: response.created"
            r = http.post("/v1/messages", json={"model": name(guarded), "messages": HI, "max_tokens": 5})
            assert r.status_code == 429 and r.headers["retry-after"] == "1"
            assert r.json()["type"] == "error" and r.json()["error"]["type"] == "rate_limit_error"
            r = http.post("/v1/responses", json={"model": name(guarded), "input": "Hi", "max_output_tokens": 5})
            assert r.status_code == 429 and r.json()["error"]["type"] == "server_overloaded"
        # The client left: its sequence is cancelled and the slot is free again well before 1500 tokens.
        deadline = time.monotonic() + 20
        while (
            r := http.post("/v1/messages", json={"model": name(guarded), "messages": HI, "max_tokens": 2})
        ).status_code == 429:
            assert time.monotonic() < deadline, "the departed stream still holds its slot"
            time.sleep(0.1)
        assert r.status_code == 200 and r.json()["usage"]["output_tokens"] == 2


# -------------------------------------------------------------------------------------- models, tokenize, detokenize
def test_retrieve_model(scripted_server: InProcessServer) -> None:
    model = oai(scripted_server).models.retrieve(name(scripted_server))
    assert model.id == name(scripted_server) and model.object == "model"
    with pytest.raises(openai.NotFoundError) as info:
        oai(scripted_server).models.retrieve("gpt-4")
    assert isinstance(info.value.body, dict) and info.value.body["code"] == "model_not_found"


def test_models_in_anthropic_shape_for_anthropic_requests(scripted_server: InProcessServer) -> None:
    """A request with `anthropic-version` (the anthropic SDK always sends it) gets Anthropic's model list and
    ModelInfo, an unknown id Anthropic's 404; without it, OpenAI's objects exactly as before."""
    model, runtime = name(scripted_server), scripted_server.runtime
    created_at = datetime.datetime.fromtimestamp(runtime.created, datetime.UTC)
    client = claude(scripted_server)
    page = client.models.list()
    assert (page.has_more, page.first_id, page.last_id) == (False, model, model)
    [info] = page.data
    assert (info.type, info.id, info.display_name, info.created_at) == ("model", model, model, created_at)
    assert info.lifecycle == "active"
    assert [m.id for m in client.models.list()] == [model]  # the SDK's pager stops at has_more false
    assert client.models.list(after_id=model).data == [] and client.models.list(before_id=model).data == []
    assert client.models.list(limit=1).data == [info] and client.models.list(limit=1000).data == [info]
    for limit in (0, 1001):  # Anthropic's page sizes are 1 to 1000
        with pytest.raises(anthropic.BadRequestError) as bad:
            client.models.list(limit=limit)
        assert isinstance(bad.value.body, dict) and bad.value.body["error"]["type"] == "invalid_request_error"
    assert client.models.retrieve(model) == info
    with pytest.raises(anthropic.NotFoundError) as info_404:
        client.models.retrieve("claude-x")
    body = info_404.value.body
    assert isinstance(body, dict) and set(body) == {"type", "error"} and body["type"] == "error"
    assert body["error"]["type"] == "not_found_error" and "claude-x" in body["error"]["message"]
    raw = httpx.get(f"{scripted_server.base_url}/v1/models", headers={"anthropic-version": "2023-06-01"}).json()
    assert raw["data"][0]["created_at"] == created_at.strftime("%Y-%m-%dT%H:%M:%SZ")
    # OpenAI's clients: unchanged.
    openai_model = {"id": model, "object": "model", "created": runtime.created, "owned_by": "qwen-api"}
    assert httpx.get(f"{scripted_server.base_url}/v1/models").json() == {"object": "list", "data": [openai_model]}
    assert httpx.get(f"{scripted_server.base_url}/v1/models/{model}").json() == openai_model
    assert [m.model_dump(exclude_none=True) for m in oai(scripted_server).models.list()] == [openai_model]


def test_tokenize_detokenize_round_trip_on_the_qwen2_tokenizer(guarded: InProcessServer) -> None:
    text = "写一个递归函数来计算阶乘 🦜🧬 and the answer is 42. <|im_end|>"
    with httpx.Client(base_url=guarded.base_url, headers={"x-api-key": KEY}, timeout=30) as http:
        r = http.post("/tokenize", json={"model": name(guarded), "prompt": text})
        assert r.status_code == 200
        out = r.json()
        assert out["tokens"] == guarded.runtime.generator().text_prompt_ids(text)
        assert (
            out["count"] == len(out["tokens"]) > 10
            and out["max_model_len"] == guarded.runtime.generator().engine.max_context_tokens
        )
        assert 151645 in out["tokens"]  # a raw prompt's control token is the control token, as /v1/completions reads it
        assert http.post("/detokenize", json={"tokens": out["tokens"]}).json() == {"prompt": text}


def test_tokenize_chat_messages_counts_as_chat_completions(scripted_server: InProcessServer) -> None:
    messages = [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "你好 🦜"}]
    r = httpx.post(f"{scripted_server.base_url}/tokenize", json={"messages": messages}, timeout=30)
    assert r.status_code == 200
    chat = oai(scripted_server).chat.completions.create(model=name(scripted_server), messages=messages, max_tokens=1)
    assert chat.usage is not None and r.json()["count"] == chat.usage.prompt_tokens
    text = httpx.post(f"{scripted_server.base_url}/detokenize", json={"tokens": r.json()["tokens"]}).json()["prompt"]
    assert text.startswith("<|im_start|>system\nBe terse.<|im_end|>") and text.endswith("<|im_start|>assistant\n")


def test_tokenize_counts_tools_and_tool_history_as_chat_completions(scripted_server: InProcessServer) -> None:
    """A conversation with a call and its result, and the tools shown: the same ids chat completions reads (the
    calls and results were dropped, and the tools block missing)."""
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    messages = [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    ]
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    client, base = oai(scripted_server), scripted_server.base_url
    for shown in (None, tools):
        extra = {"tools": shown} if shown else {}
        r = httpx.post(f"{base}/tokenize", json={"messages": messages, **extra}, timeout=30)
        assert r.status_code == 200, r.text
        chat = client.chat.completions.create(model=name(scripted_server), messages=messages, max_tokens=1, **extra)
        assert chat.usage is not None and r.json()["count"] == chat.usage.prompt_tokens
        text = httpx.post(f"{base}/detokenize", json={"tokens": r.json()["tokens"]}).json()["prompt"]
        assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in text
        assert "<tool_response>\nsunny\n</tool_response>" in text and "<|im_start|>tool" not in text
        assert ("# Tools" in text) == (shown is not None)
    r = httpx.post(f"{base}/tokenize", json={"prompt": "hi", "tools": tools}, timeout=30)
    assert r.status_code == 400 and "tools" in r.json()["error"]["message"]


@pytest.mark.parametrize(
    ("path", "body", "status", "needle"),
    [
        ("/tokenize", {"prompt": ""}, 400, "prompt"),
        ("/tokenize", {}, 400, "either"),
        ("/tokenize", {"prompt": "a", "messages": HI}, 400, "either"),
        ("/tokenize", {"messages": []}, 400, "messages"),
        ("/tokenize", {"prompt": 5}, 400, "prompt"),
        ("/tokenize", {"prompt": "a", "model": "gpt-4"}, 404, "gpt-4"),
        ("/detokenize", {"tokens": []}, 400, "tokens"),
        ("/detokenize", {"tokens": [-1]}, 400, "tokens"),
        ("/detokenize", {"tokens": [10**9]}, 400, "vocabulary"),
        ("/detokenize", {"tokens": ["12"]}, 400, "tokens"),
        ("/detokenize", {"tokens": [1.5]}, 400, "tokens"),
        ("/detokenize", {"tokens": [True]}, 400, "tokens"),
        ("/detokenize", {"prompt": "a"}, 400, "tokens"),
    ],
)
def test_tokenize_bad_input_is_4xx_in_openai_shape(
    scripted_server: InProcessServer, path: str, body: dict, status: int, needle: str
) -> None:
    r = httpx.post(f"{scripted_server.base_url}{path}", json=body, timeout=30)
    assert r.status_code == status
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and needle in error["message"] + str(error["param"])
