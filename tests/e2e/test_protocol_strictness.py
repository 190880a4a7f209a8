"""The OpenAI-style dialects are as strict as the README says, through real HTTP on the scripted Qwen2 (the session's
server this test group already runs): an empty prompt is the 400 `empty_prompt` however it is written; `param`
names the request's field (`input` on the Responses API, and never one of pydantic's union-branch tags); format
objects (`response_format`, `text.format`) are closed and strict; an empty stored-state value is refused as a
non-empty one is; and a schema the grammar engine gives up on mid-stream is `schema_not_followed` in the stream's
error event, as it is before a stream begins.
"""

from __future__ import annotations

from typing import Any

import httpx
import openai
import pytest

from conftest import InProcessServer, sdk, sse_events

HI = [{"role": "user", "content": "Hi"}]
ERROR_FIELDS = {"message", "type", "param", "code"}
# Every object must hold another: llguidance compiles it, then gives up a few tokens into the output.
ENDLESS = {"type": "object", "properties": {"a": {"$ref": "#"}}, "required": ["a"], "additionalProperties": False}
# How pydantic names the arm of a union that failed (`constrained-str`, `list[str]`, `literal[...]`, `str`, a model's
# class name): none of them is a field.
TAG_MARKS = ("[", "-")
TYPE_TAGS = {"str", "int", "float", "bool", "dict", "list"}


def model(server: InProcessServer) -> str:
    assert server.runtime is not None
    return server.runtime.model_name


def post(server: InProcessServer, path: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(f"{server.base_url}{path}", json=body, timeout=120)


def openai_error(reply: httpx.Response, status: int = 400) -> dict[str, Any]:
    """The one error object of an OpenAI-shaped error reply, after checking its status and shape."""
    assert reply.status_code == status, reply.text
    body = reply.json()
    assert set(body) == {"error"} and set(body["error"]) == ERROR_FIELDS, body
    error: dict[str, Any] = body["error"]
    return error


def assert_field_paths(message: str) -> None:
    """Each `path: what` part of an error message names its field by a path with no union-branch tag in it."""
    for part in message.split("; "):
        path, _, _ = part.partition(": ")
        for segment in path.split("."):
            assert not any(mark in segment for mark in TAG_MARKS), message
            assert segment not in TYPE_TAGS and not segment[:1].isupper(), message


# ------------------------------------------------------------------------------------------ 1. the empty prompt
def test_an_empty_string_prompt_is_the_same_empty_prompt_400_as_a_list_of_one(
    scripted_server: InProcessServer,
) -> None:
    errors = []
    for prompt in ("", [""]):
        reply = post(scripted_server, "/v1/completions", {"model": model(scripted_server), "prompt": prompt})
        error = openai_error(reply)
        assert (error["type"], error["code"], error["param"]) == ("invalid_request_error", "empty_prompt", "prompt")
        errors.append(error)
    assert errors[0] == errors[1]
    # an empty list holds no prompt at all: still a 400 naming the field
    error = openai_error(post(scripted_server, "/v1/completions", {"model": model(scripted_server), "prompt": []}))
    assert error["param"] == "prompt" and error["type"] == "invalid_request_error"


def test_the_sdk_sees_an_empty_prompt_as_empty_prompt(scripted_server: InProcessServer) -> None:
    client = sdk(openai.OpenAI, base_url=f"{scripted_server.base_url}/v1", api_key="x", max_retries=0, timeout=60)
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=model(scripted_server), prompt="", max_tokens=3)
    assert info.value.code == "empty_prompt" and info.value.param == "prompt"


# ------------------------------------------------------------------------------------------ 2. param
def test_a_prompt_beyond_the_context_on_responses_names_input(scripted_server: InProcessServer) -> None:
    body = {"model": model(scripted_server), "input": "hello " * 40000, "max_output_tokens": 10}
    error = openai_error(post(scripted_server, "/v1/responses", body))
    assert (error["code"], error["param"]) == ("context_length_exceeded", "input")
    messages = {**body, "input": [{"role": "user", "content": "hello " * 40000}]}
    assert openai_error(post(scripted_server, "/v1/responses", messages))["param"] == "input"


@pytest.mark.parametrize(
    ("path", "fields", "param"),
    [
        ("/v1/responses", {"input": ""}, "input"),
        ("/v1/responses", {"input": []}, "input"),
        ("/v1/responses", {"input": "Hi", "conversation": 5}, "conversation"),
        ("/v1/completions", {"prompt": [1, "a"]}, "prompt"),
        ("/v1/completions", {"prompt": 5}, "prompt"),
        ("/v1/chat/completions", {"messages": HI, "stop": 5}, "stop"),
        ("/v1/chat/completions", {"messages": HI, "tool_choice": "sometimes"}, "tool_choice"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, "messages.0.content"),
        (
            "/v1/chat/completions",
            {"messages": HI, "tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": {"x": 1}},
            "tool_choice",
        ),
    ],
)
def test_validation_params_are_field_paths_without_union_tags(
    scripted_server: InProcessServer, path: str, fields: dict[str, Any], param: str
) -> None:
    error = openai_error(post(scripted_server, path, {"model": model(scripted_server), **fields}))
    assert (error["type"], error["param"], error["code"]) == ("invalid_request_error", param, None)
    assert_field_paths(error["message"])


def test_the_messages_dialect_names_fields_without_union_tags(scripted_server: InProcessServer) -> None:
    """Anthropic's shape has no `param`: its message names the field, through the same path."""
    body = {"model": model(scripted_server), "max_tokens": 5, "messages": [{"role": "user", "content": 5}]}
    reply = post(scripted_server, "/v1/messages", body)
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["type"] == "invalid_request_error" and error["message"].startswith("messages.0.content: ")
    assert_field_paths(error["message"])


# ------------------------------------------------------------------------------------------ 3. format objects
# Each bad format as chat's `response_format` and as the Responses API's flat `text.format`, and what the error names.
BAD_FORMATS = [
    (
        {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}, "strict": "yes"}},
        {"type": "json_schema", "name": "x", "schema": {"type": "object"}, "strict": "yes"},
        "strict",
    ),
    (
        {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}, "strict": 1}},
        {"type": "json_schema", "name": "x", "schema": {"type": "object"}, "strict": 1},
        "strict",
    ),
    ({"type": "json_object", "schema": {}}, {"type": "json_object", "schema": {}}, "schema"),
    ({"type": "text", "name": "x"}, {"type": "text", "name": "x"}, "name"),
    (
        {"type": "json_schema", "json_schema": {"name": "x", "schema": {}, "frobnicate": True}},
        {"type": "json_schema", "name": "x", "schema": {}, "frobnicate": True},
        "frobnicate",
    ),
    ({"type": "json_object", "frobnicate": 1}, {"type": "json_object", "frobnicate": 1}, "frobnicate"),
    (
        {"type": "json_schema", "json_schema": {"name": "x", "schema": {}, "description": 5}},
        {"type": "json_schema", "name": "x", "schema": {}, "description": 5},
        "description",
    ),
]


@pytest.mark.parametrize(("chat_format", "responses_format", "needle"), BAD_FORMATS)
def test_format_objects_refuse_unknown_fields_and_wrong_types(
    scripted_server: InProcessServer, chat_format: dict, responses_format: dict, needle: str
) -> None:
    name = model(scripted_server)
    chat = post(
        scripted_server, "/v1/chat/completions", {"model": name, "messages": HI, "response_format": chat_format}
    )
    error = openai_error(chat)
    assert (error["type"], error["param"]) == ("invalid_request_error", "response_format")
    assert needle in error["message"]
    body = {"model": name, "input": "Hi", "text": {"format": responses_format}}
    error = openai_error(post(scripted_server, "/v1/responses", body))
    assert (error["type"], error["param"]) == ("invalid_request_error", "text.format")
    assert needle in error["message"]


@pytest.mark.parametrize("strict", [True, False, None])
def test_well_formed_formats_still_serve(scripted_server: InProcessServer, strict: bool | None) -> None:
    """The shapes OpenAI's SDKs send (chat's nested `json_schema`, the Responses API's flat one, `strict` true, false
    or null, a `description`) are served; the closed checks above refuse nothing they send."""
    name, schema = model(scripted_server), {"type": "object", "properties": {}, "additionalProperties": False}
    spec = {"name": "empty", "description": "Nothing.", "schema": schema, "strict": strict}
    for fmt in ({"type": "json_schema", "json_schema": spec}, {"type": "json_object"}, {"type": "text"}):
        body = {"model": name, "messages": HI, "max_tokens": 8, "response_format": fmt}
        assert post(scripted_server, "/v1/chat/completions", body).status_code == 200
    for fmt in ({"type": "json_schema", **spec}, {"type": "json_object"}, {"type": "text"}):
        body = {"model": name, "input": "Hi", "max_output_tokens": 8, "text": {"format": fmt}}
        reply = post(scripted_server, "/v1/responses", body)
        assert reply.status_code == 200, reply.text


@pytest.mark.parametrize(
    ("field", "value"), [("conversation", {}), ("prompt", {}), ("previous_response_id", ""), ("conversation", "")]
)
def test_empty_stored_state_is_refused_like_any_other(
    scripted_server: InProcessServer, field: str, value: object
) -> None:
    body = {"model": model(scripted_server), "input": "Hi", "max_output_tokens": 3, field: value}
    error = openai_error(post(scripted_server, "/v1/responses", body))
    assert (error["type"], error["param"], error["code"]) == ("invalid_request_error", field, "unsupported_parameter")
    neutral = post(scripted_server, "/v1/responses", {**body, field: None})  # null: left out
    assert neutral.status_code == 200, neutral.text


# ------------------------------------------------------------------------------------------ 4. mid-stream failure
def test_a_schema_given_up_on_mid_stream_is_schema_not_followed_in_the_error_event(
    scripted_server: InProcessServer,
) -> None:
    fmt = {"type": "json_schema", "name": "endless", "schema": ENDLESS}
    body = {"model": model(scripted_server), "input": "Hi", "max_output_tokens": 200, "text": {"format": fmt}}
    error = openai_error(post(scripted_server, "/v1/responses", body))  # before a stream: a 400
    assert (error["type"], error["code"]) == ("invalid_request_error", "schema_not_followed")
    with httpx.stream("POST", f"{scripted_server.base_url}/v1/responses", json={**body, "stream": True}) as reply:
        assert reply.status_code == 200
        events = sse_events(reply)
    name, last = events[-2]
    assert name == "error" and last["type"] == "error", events[-3:]
    assert last["code"] == "schema_not_followed" and last["param"] is None and "schema" in last["message"]
    assert [n for n, _ in events].count("error") == 1
    assert events[-1][0] == "response.failed" and events[-1][1]["response"]["status"] == "failed"
    assert not any(n in ("response.completed", "response.incomplete") for n, _ in events)


def test_a_schema_given_up_on_mid_stream_on_chat_has_the_400s_type_and_code(scripted_server: InProcessServer) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "endless", "schema": ENDLESS}}
    body = {"model": model(scripted_server), "messages": HI, "max_tokens": 200, "response_format": fmt}
    before = openai_error(post(scripted_server, "/v1/chat/completions", body))
    with httpx.stream("POST", f"{scripted_server.base_url}/v1/chat/completions", json={**body, "stream": True}) as r:
        assert r.status_code == 200
        events = [data for _, data in sse_events(r, done=True)]
    error = events[-1]["error"]
    assert set(error) == ERROR_FIELDS
    assert (
        (error["type"], error["code"])
        == (before["type"], before["code"])
        == (
            "invalid_request_error",
            "schema_not_followed",
        )
    )
