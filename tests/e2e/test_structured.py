"""Structured outputs and tool calling, through the official openai SDK on real servers and real models.

The demo model (SmolLM2-135M) runs on both engines: its JSON must parse and validate for every seed, in a batch
beside unconstrained requests, streamed, with n > 1. Tool calls and the Qwen2 tool template run on the Qwen2
fixtures (a scripted Qwen2 that answers with a `<tool_call>` block).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from enum import StrEnum
from pathlib import Path
from typing import Any

import anthropic
import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from conftest import TOOL_SCHEMAS, WEATHER_DESCRIPTION, InProcessServer, sdk, serve_engine, serve_in_process


class Colour(StrEnum):
    red = "red"
    green = "green"
    blue = "blue"


class City(BaseModel):
    name: str = Field(max_length=24)
    population: int = Field(ge=0, le=100_000_000)
    colour: Colour


NESTED_SCHEMA = {
    "type": "object",
    "properties": {
        "title": {"type": "string", "maxLength": 20},
        "kind": {"type": "string", "enum": ["book", "film", "song"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 10}, "minItems": 1, "maxItems": 3},
        "author": {
            "type": "object",
            "properties": {
                "name": {"type": "string", "maxLength": 20},
                "born": {"type": "integer", "minimum": 1000, "maximum": 2100},
            },
            "required": ["name", "born"],
            "additionalProperties": False,
        },
    },
    "required": ["title", "kind", "tags", "author"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module", params=["llamacpp", "transformers"])
def demo(request: pytest.FixtureRequest, tiny_qwen2_dir: Path) -> Iterator[InProcessServer]:
    """The demo model on each engine."""
    if request.param == "llamacpp":
        server = serve_engine("llamacpp", tiny_qwen2_dir, max_num_return_sequences=4)
    else:
        server = serve_in_process(Path("demo"), engine="transformers", max_num_return_sequences=4)
    with server:
        yield server


def client_of(server: InProcessServer) -> openai.OpenAI:
    return sdk(openai.OpenAI, base_url=server.base_url + "/v1", api_key="none", max_retries=0, timeout=120)


def model_of(server: InProcessServer) -> str:
    return server.runtime.model_name


def test_parse_pydantic_model_for_20_seeds(demo: InProcessServer) -> None:
    client = client_of(demo)
    messages = [{"role": "user", "content": "Describe a city as JSON."}]

    def one(seed: int) -> City | None:
        completion = client.chat.completions.parse(
            model=model_of(demo), messages=messages, response_format=City, seed=seed, max_tokens=120, temperature=1.0
        )
        assert completion.choices[0].finish_reason == "stop", completion.choices[0].message.content
        return completion.choices[0].message.parsed

    with ThreadPoolExecutor(4) as pool:
        parsed = list(pool.map(one, range(20)))
    assert all(isinstance(p, City) for p in parsed)
    assert len({p.model_dump_json() for p in parsed if p is not None}) > 1  # seeds really differ


def test_responses_api_parse_follows_the_schema(demo: InProcessServer) -> None:
    """The Responses API's structured outputs (`text.format`), through the SDK's `responses.parse`."""
    client = client_of(demo)
    r = client.responses.parse(
        model=model_of(demo), input="Describe a city as JSON.", text_format=City, max_output_tokens=120, temperature=1.0
    )
    assert r.status == "completed", r.output_text
    assert isinstance(r.output_parsed, City)
    assert r.text is not None and r.text.format is not None and r.text.format.type == "json_schema"  # echoed
    with client.responses.stream(
        model=model_of(demo), input="Describe a city as JSON.", text_format=City, max_output_tokens=120
    ) as stream:
        final = stream.get_final_response()
    assert final.status == "completed" and isinstance(final.output_parsed, City)


def test_nested_schema_validates_beside_unconstrained_streamed_and_n(demo: InProcessServer) -> None:
    client = client_of(demo)
    fmt = {"type": "json_schema", "json_schema": {"name": "work", "schema": NESTED_SCHEMA, "strict": True}}
    messages = [{"role": "user", "content": "Give me a work of art."}]

    def constrained(seed: int) -> list[str]:
        out = client.chat.completions.create(
            model=model_of(demo), messages=messages, response_format=fmt, seed=seed, n=2, max_tokens=160
        )
        return [c.message.content or "" for c in out.choices]

    def free(seed: int) -> str:
        out = client.chat.completions.create(model=model_of(demo), messages=messages, seed=seed, max_tokens=40)
        return out.choices[0].message.content or ""

    def streamed(seed: int) -> str:
        stream = client.chat.completions.create(
            model=model_of(demo), messages=messages, response_format=fmt, seed=seed, max_tokens=160, stream=True
        )
        return "".join(c.choices[0].delta.content or "" for c in stream if c.choices)

    with ThreadPoolExecutor(6) as pool:
        texts = [t for ts in pool.map(constrained, range(3)) for t in ts]
        texts += list(pool.map(streamed, range(3)))
        free_texts = list(pool.map(free, range(3)))
    assert all(free_texts)
    for text in texts:
        jsonschema.validate(json.loads(text), NESTED_SCHEMA)


def test_json_object_on_completions_and_generate(demo: InProcessServer) -> None:
    client = client_of(demo)
    work = {"type": "json_schema", "json_schema": {"name": "work", "schema": NESTED_SCHEMA}}
    out = client.completions.create(
        model=model_of(demo),
        prompt="A work of art as JSON:",
        max_tokens=160,
        seed=3,
        extra_body={"response_format": work},
    )
    jsonschema.validate(json.loads(out.choices[0].text), NESTED_SCHEMA)
    out = client.chat.completions.create(
        model=model_of(demo),
        messages=[{"role": "user", "content": "{}"}],
        max_tokens=300,
        temperature=0,
        response_format={"type": "json_object"},
    )
    assert isinstance(json.loads(out.choices[0].message.content or ""), dict)
    fmt = {
        "type": "json_schema",
        "json_schema": {"name": "city", "schema": {**City.model_json_schema(), "additionalProperties": False}},
    }
    body = {"prompt": "A city, please", "max_length": 100, "num_return_sequences": 2, "response_format": fmt}
    reply = httpx.post(demo.base_url + "/generate", json=body, timeout=120)
    assert reply.status_code == 200, reply.text
    assert "response_format" not in reply.json()["parameters"]
    for text in reply.json()["generated_texts"]:
        City.model_validate_json(text)


@pytest.mark.parametrize(
    ("extra", "valid"),
    [
        ({"structured_outputs": {"choice": ["yes", "no", "maybe"]}}, lambda t: t in ("yes", "no", "maybe")),
        ({"structured_outputs": {"regex": "[0-9]{3}-[a-z]{2}"}}, lambda t: re.fullmatch("[0-9]{3}-[a-z]{2}", t)),
        (
            {"structured_outputs": {"json": {"type": "integer", "minimum": 0, "maximum": 999}}},
            lambda t: 0 <= json.loads(t) <= 999,
        ),
        (
            {"structured_outputs": {"grammar": 'root ::= "red" | "green" | "blue"'}},
            lambda t: t in ("red", "green", "blue"),
        ),
        ({"structured_outputs": {"grammar": 'start: "a"+ "b"'}}, lambda t: re.fullmatch("a+b", t)),
        ({"guided_choice": ["left", "right"], "guided_decoding_backend": "xgrammar"}, lambda t: t in ("left", "right")),
        ({"guided_json": '{"type": "boolean"}'}, lambda t: isinstance(json.loads(t), bool)),
        ({"guided_regex": "[A-Z]{4}"}, lambda t: re.fullmatch("[A-Z]{4}", t)),
    ],
    ids=["choice", "regex", "json", "gbnf", "lark", "guided-choice", "guided-json-text", "guided-regex"],
)
def test_vllm_structured_outputs_are_enforced(demo: InProcessServer, extra: dict, valid: Any) -> None:
    """vLLM's clients send `structured_outputs` (and the older `guided_*` fields) in extra_body: each constrains
    the answer as `response_format` does, on chat completions and completions, plain and streamed."""
    client, model = client_of(demo), model_of(demo)
    for seed in (1, 2):
        args = {"model": model, "max_tokens": 24, "temperature": 1.0, "seed": seed, "extra_body": extra}
        chat = client.chat.completions.create(messages=ASK, **args).choices[0]
        assert chat.finish_reason == "stop" and valid(chat.message.content), chat.message.content
        streamed = client.chat.completions.create(messages=ASK, stream=True, **args)
        assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == chat.message.content
        text = client.completions.create(prompt="Answer:", **args).choices[0].text
        assert valid(text), text


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"structured_outputs": {"regex": "[0-9"}}, "structured_outputs.regex"),  # does not compile
        ({"structured_outputs": {"choice": ["a"], "regex": "b"}}, "structured_outputs"),
        ({"structured_outputs": {"whitespace_pattern": " "}}, "structured_outputs"),
        ({"structured_outputs": {"choice": []}}, "structured_outputs.choice"),
        ({"structured_outputs": {"json": {"type": 5}}}, "structured_outputs.json"),
        ({"guided_regex": "a", "guided_choice": ["b"]}, "guided_choice"),
        ({"guided_json": {"type": "object"}, "response_format": {"type": "json_object"}}, "guided_json"),
        ({"guided_regex": "a", "tools": [{"type": "function", "function": {"name": "f"}}]}, "guided_regex"),
    ],
)
def test_bad_vllm_structured_outputs_are_a_400_naming_the_field(demo: InProcessServer, body: dict, param: str) -> None:
    payload = {"model": model_of(demo), "messages": ASK, "max_tokens": 4, **body}
    r = httpx.post(f"{demo.base_url}/v1/chat/completions", json=payload, timeout=60)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param, r.json()


@pytest.mark.parametrize(
    ("fmt", "needle"),
    [
        ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}, "invalid JSON schema"),
        ({"type": "json_schema", "json_schema": {"schema": {"type": "object"}}}, "name"),
        ({"type": "yaml"}, "unknown response_format type"),
        (
            {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "string", "format": "ipv9"}}},
            "ipv9",
        ),
    ],
)
def test_bad_response_format_is_a_400(demo: InProcessServer, fmt: dict, needle: str) -> None:
    reply = httpx.post(
        demo.base_url + "/v1/chat/completions",
        json={"model": model_of(demo), "messages": [{"role": "user", "content": "hi"}], "response_format": fmt},
        timeout=60,
    )
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == "response_format"
    assert needle in error["message"]


# ------------------------------------------------------------------------------------------------ tools
WEATHER = {
    "type": "function",
    "function": {"name": "get_weather", "description": WEATHER_DESCRIPTION, "parameters": TOOL_SCHEMAS["get_weather"]},
}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": TOOL_SCHEMAS["get_time"]}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
BAD_CALL = {"id": "c", "type": "function", "function": {"name": "get_weather", "arguments": "{city: Paris"}}
SCRIPTED_CALL = '<tool_call>{"name": "lookup","arguments":{"city":"Paris"}}'
LOOKUP = {"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}


def test_required_and_named_calls_validate(demo: InProcessServer) -> None:
    client = client_of(demo)
    for seed in range(3):
        out = client.chat.completions.create(
            model=model_of(demo), messages=ASK, tools=[WEATHER, TIME], tool_choice="required", seed=seed, max_tokens=80
        )
        choice = out.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.tool_calls, choice.message
        call = choice.message.tool_calls[0]
        assert call.id.startswith("call_") and "<tool_call>" not in (choice.message.content or "")
        jsonschema.validate(json.loads(call.function.arguments), TOOL_SCHEMAS[call.function.name])
    named = {"type": "function", "function": {"name": "get_time"}}
    out = client.chat.completions.create(
        model=model_of(demo), messages=ASK, tools=[WEATHER, TIME], tool_choice=named, seed=1, max_tokens=80
    )
    call = out.choices[0].message.tool_calls[0]
    assert call.function.name == "get_time"
    jsonschema.validate(json.loads(call.function.arguments), TOOL_SCHEMAS["get_time"])


def test_streamed_call_equals_plain_call_and_two_turns(demo: InProcessServer) -> None:
    client = client_of(demo)
    args = {"model": model_of(demo), "messages": ASK, "tools": [WEATHER], "tool_choice": "required"}
    plain = client.chat.completions.create(**args, temperature=0, max_tokens=80)
    with client.chat.completions.stream(**args, temperature=0, max_tokens=80) as stream:
        final = stream.get_final_completion()
    a, b = plain.choices[0].message.tool_calls[0], final.choices[0].message.tool_calls[0]
    assert (a.function.name, json.loads(a.function.arguments)) == (b.function.name, json.loads(b.function.arguments))
    assert final.choices[0].finish_reason == "tool_calls"
    history = [
        *ASK,
        {"role": "assistant", "content": None, "tool_calls": [a.model_dump(exclude_none=True)]},
        {"role": "tool", "tool_call_id": a.id, "content": json.dumps({"temperature": 21, "sky": "clear"})},
    ]
    answer = client.chat.completions.create(
        model=model_of(demo), messages=history, tools=[WEATHER], seed=0, max_tokens=40
    )
    assert answer.choices[0].finish_reason in ("stop", "length", "tool_calls")
    assert answer.choices[0].message.content or answer.choices[0].message.tool_calls


def test_a_forced_call_follows_a_schema_with_references(demo: InProcessServer) -> None:
    """`$ref`s into the function's own `$defs` (what pydantic writes for nested models, e.g. through
    `openai.pydantic_function_tool`), recursive ones too: a forced call was a 400 'Pointer does not exist', its
    references read against the call schema around the function's."""
    schema = {
        "type": "object",
        "properties": {"place": {"$ref": "#/$defs/Place"}, "route": {"$ref": "#/$defs/Stop"}},
        "required": ["place"],
        "additionalProperties": False,
        "$defs": {
            "Place": {
                "type": "object",
                "properties": {"city": {"type": "string", "maxLength": 12}},
                "required": ["city"],
                "additionalProperties": False,
            },
            "Stop": {  # recursive: a stop and the next one
                "type": "object",
                "properties": {"name": {"type": "string", "maxLength": 8}, "next": {"$ref": "#/$defs/Stop"}},
                "required": ["name"],
                "additionalProperties": False,
            },
        },
    }
    tool = {"type": "function", "function": {"name": "plan", "parameters": schema}}
    for choice in ("required", {"type": "function", "function": {"name": "plan"}}):
        out = client_of(demo).chat.completions.create(
            model=model_of(demo), messages=ASK, tools=[tool, TIME], tool_choice=choice, seed=3, max_tokens=120
        )
        [call] = out.choices[0].message.tool_calls or []
        if call.function.name == "plan":
            jsonschema.validate(json.loads(call.function.arguments), schema)
        else:
            jsonschema.validate(json.loads(call.function.arguments), TOOL_SCHEMAS["get_time"])


@pytest.mark.parametrize(
    ("change", "param"),
    [
        ({"tools": [{"type": "function", "function": {"parameters": {"type": "object"}}}]}, "tools"),
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        ({"messages": [*ASK, {"role": "tool", "content": "21 degrees"}]}, "messages"),
        (
            {
                "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": 3}}}],
                "tool_choice": "required",
            },
            "tools",
        ),
        (  # arguments are a JSON object: a schema of another type is refused, under auto too
            {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]},
            "tools.0.function.parameters",
        ),
        (  # an earlier call whose arguments are not JSON (found by Schemathesis: a 500 before)
            {"messages": [*ASK, {"role": "assistant", "content": None, "tool_calls": [BAD_CALL]}]},
            "messages.1.tool_calls.0.function.arguments",
        ),
    ],
)
def test_bad_tool_input_is_a_400(demo: InProcessServer, change: dict, param: str) -> None:
    body = {"model": model_of(demo), "messages": ASK, **change}
    reply = httpx.post(demo.base_url + "/v1/chat/completions", json=body, timeout=60)
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert param in (error["param"] or "") + error["message"]


def test_a_call_in_the_history_with_empty_arguments_means_no_arguments(demo: InProcessServer) -> None:
    """`arguments: ""` (a call of a function without parameters, as some clients send it) is read as `{}`."""
    history = [*ASK, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "get_weather", "arguments": ""}}]},
        {"role": "tool", "tool_call_id": "c", "content": "sunny"}]  # fmt: skip
    body = {"model": model_of(demo), "messages": history, "tools": [WEATHER], "max_tokens": 2}
    reply = httpx.post(demo.base_url + "/v1/chat/completions", json=body, timeout=60)
    assert reply.status_code == 200, reply.text
    from qwen_api.api.openai_protocol import FunctionCall

    assert FunctionCall(name="f", arguments=" ").arguments == "{}"


def test_qwen2_tool_template_renders_as_specified() -> None:
    from qwen_api.dev.random_qwen2 import build_qwen2_tokenizer
    from qwen_api.structured.tools import render_history, template_renders_tools

    tokenizer = build_qwen2_tokenizer()
    assert not template_renders_tools(tokenizer.chat_template)  # Qwen2-7B-Instruct's: the server renders tools
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    history = [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "content": "sunny"},
    ]
    messages = render_history(history, [WEATHER], own_block=True)
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    expected = (
        "<|im_start|>system\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
        "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
        + json.dumps(WEATHER)
        + "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
        "<tool_call></tool_call> XML tags:\n<tool_call>\n"
        '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\nWeather?<|im_end|>\n"
        '<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
        "</tool_call><|im_end|>\n"
        "<|im_start|>user\n<tool_response>\nsunny\n</tool_response><|im_end|>\n<|im_start|>assistant\n"
    )
    assert text == expected


def test_scripted_qwen2_tool_call_comes_back_as_tool_calls(tmp_path: Path) -> None:
    from qwen_api.dev.random_qwen2 import write_scripted_qwen2

    with serve_in_process(write_scripted_qwen2(tmp_path / "m", SCRIPTED_CALL)) as server:
        client = client_of(server)
        args = {"model": model_of(server), "messages": ASK, "tools": [LOOKUP], "temperature": 0, "max_tokens": 40}
        plain = client.chat.completions.create(**args)
        choice = plain.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        call = choice.message.tool_calls[0]
        assert (call.function.name, json.loads(call.function.arguments)) == ("lookup", {"city": "Paris"})
        with client.chat.completions.stream(**args) as stream:
            final = stream.get_final_completion()
        streamed = final.choices[0].message
        assert final.choices[0].finish_reason == "tool_calls" and not streamed.content
        assert streamed.tool_calls[0].function.name == "lookup"
        assert json.loads(streamed.tool_calls[0].function.arguments) == {"city": "Paris"}
        # Without tools the same text is plain content: nothing is parsed behind the client's back.
        bare = client.chat.completions.create(**{k: v for k, v in args.items() if k != "tools"})
        assert bare.choices[0].message.content == SCRIPTED_CALL and not bare.choices[0].message.tool_calls
        # A stop string inside the call's arguments does not cut the call (it was cut there, and its markup came
        # back as content); stop strings apply to content, as the same request without tools shows.
        stopped = client.chat.completions.create(**args, stop=["Paris", "xyz"])
        assert stopped.choices[0].finish_reason == "tool_calls" and stopped.choices[0].message.content is None
        assert json.loads(stopped.choices[0].message.tool_calls[0].function.arguments) == {"city": "Paris"}
        with client.chat.completions.stream(**args, stop=["Paris"]) as stream:
            final = stream.get_final_completion()
        assert json.loads(final.choices[0].message.tool_calls[0].function.arguments) == {"city": "Paris"}
        assert final.choices[0].finish_reason == "tool_calls" and not final.choices[0].message.content
        bare = client.chat.completions.create(**{k: v for k, v in args.items() if k != "tools"}, stop=["Paris"])
        assert bare.choices[0].message.content == SCRIPTED_CALL[: SCRIPTED_CALL.index("Paris")]
        assert bare.choices[0].finish_reason == "stop"
        # Cut by max_tokens inside the call: no call, and its markup is not content either, streamed or not.
        cut = client.chat.completions.create(**{**args, "max_tokens": 6})
        assert (cut.choices[0].finish_reason, cut.choices[0].message.content) == ("length", "")
        assert not cut.choices[0].message.tool_calls
        chunks = list(client.chat.completions.create(**{**args, "max_tokens": 6}, stream=True))
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ""
        assert chunks[-1].choices[0].finish_reason == "length"
        assert not any(c.choices[0].delta.tool_calls for c in chunks if c.choices)


# Text, whitespace, then a call: the text beside a call drops its trailing whitespace, streamed or not.
SPACED_CALL = 'Checking now.  \n<tool_call>{"name": "lookup","arguments":{"city":"Paris"}}'


def test_every_dialect_streams_the_text_beside_a_call_as_its_plain_answer_has_it(tmp_path: Path) -> None:
    """Chat completions, Responses and Messages split an answer into text and calls by one rule (`CallRules`),
    streamed or not: the streamed text is the plain answer's (chat's stream once sent the whitespace before the
    call, which its plain answer drops). A call to a function the request did not declare is no call: the
    client could not run it, and it comes back as the text the model wrote, on every route."""
    import anthropic

    from qwen_api.dev.random_qwen2 import write_scripted_qwen2

    with serve_in_process(write_scripted_qwen2(tmp_path / "m", SPACED_CALL)) as server:
        client, model = client_of(server), model_of(server)
        claude = sdk(anthropic.Anthropic, base_url=server.base_url, api_key="unused", max_retries=0, timeout=120)
        lookup = {"name": "lookup", "parameters": {"type": "object"}}
        other = {"name": "get_weather", "parameters": {"type": "object"}}
        for declared, text, calls in (
            (lookup, "Checking now.", [("lookup", {"city": "Paris"})]),
            (other, SPACED_CALL, []),
        ):
            args = {"model": model, "messages": ASK, "temperature": 0, "max_tokens": 40}
            args["tools"] = [{"type": "function", "function": declared}]
            plain = client.chat.completions.create(**args).choices[0]
            chunks = list(client.chat.completions.create(**args, stream=True))
            streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            got = [(c.function.name, json.loads(c.function.arguments)) for c in plain.message.tool_calls or []]
            assert (plain.message.content or "", streamed, got) == (text, text, calls)
            assert plain.finish_reason == chunks[-1].choices[0].finish_reason == ("tool_calls" if calls else "stop")

            r_args = {"model": model, "input": ASK, "temperature": 0, "max_output_tokens": 40}
            r_args["tools"] = [{"type": "function", **declared}]
            response = client.responses.create(**r_args)
            deltas = [e.delta for e in client.responses.create(**r_args, stream=True) if e.type.endswith("text.delta")]
            r_calls = [(o.name, json.loads(o.arguments)) for o in response.output if o.type == "function_call"]
            assert (response.output_text, "".join(deltas), r_calls) == (text, text, calls)

            m_args = {"model": model, "messages": ASK, "max_tokens": 40, "extra_body": {"temperature": 0}}
            m_args["tools"] = [{"name": declared["name"], "input_schema": declared["parameters"]}]
            message = claude.messages.create(**m_args)
            with claude.messages.stream(**m_args) as stream:
                m_streamed = "".join(stream.text_stream)
            m_text = "".join(b.text for b in message.content if b.type == "text")
            uses = [(b.name, b.input) for b in message.content if b.type == "tool_use"]
            assert (m_text, m_streamed, uses) == (text, text, calls)
            assert message.stop_reason == ("tool_use" if calls else "end_turn")


# A call in compact JSON, as a grammar writes it: the strict functions' grammar lets the model's own answer through.
COMPACT_CALL = 'Sure.\n<tool_call>{"name":"lookup","arguments":{"n":7}}'


@pytest.fixture(scope="module")
def compact(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InProcessServer]:
    from qwen_api.dev.random_qwen2 import write_scripted_qwen2

    with serve_in_process(write_scripted_qwen2(tmp_path_factory.mktemp("compact-call"), COMPACT_CALL)) as server:
        yield server


def _lookup(required: list[str], strict: bool = True) -> dict[str, Any]:
    properties = {"n": {"type": "integer"}, "unit": {"type": "string", "enum": ["km", "mi"]}}
    schema = {"type": "object", "properties": properties, "required": required, "additionalProperties": False}
    return {"name": "lookup", "parameters": schema, "strict": strict}


def test_strict_functions_hold_auto_calls_to_their_schema_on_every_dialect(compact: InProcessServer) -> None:
    """`strict: true` (what openai-agents and `openai.pydantic_function_tool` always send) was accepted and not
    enforced under `auto`: the call came back without a required argument. Now each call the model opens follows
    its function's schema, on chat completions, Responses and Messages, while the text around it stays free."""
    import anthropic

    client, model = client_of(compact), model_of(compact)
    claude = sdk(anthropic.Anthropic, base_url=compact.base_url, api_key="unused", max_retries=0, timeout=120)
    for function, intact in (
        (_lookup(["n"]), True),
        (_lookup(["n", "unit"]), False),
        (_lookup(["n", "unit"], False), True),
    ):
        schema = function["parameters"]
        tools = [{"type": "function", "function": function}]
        args = {"model": model, "messages": ASK, "tools": tools, "temperature": 0, "max_tokens": 40}
        chat = client.chat.completions.create(**args).choices[0]
        r_args = {"model": model, "input": ASK, "temperature": 0, "max_output_tokens": 40}
        response = client.responses.create(**r_args, tools=[{"type": "function", **function}])
        m_tools = [{"name": "lookup", "input_schema": schema, "strict": function["strict"]}]
        message = claude.messages.create(
            model=model, messages=ASK, tools=m_tools, max_tokens=40, extra_body={"temperature": 0}
        )
        calls = [json.loads(c.function.arguments) for c in chat.message.tool_calls or []]
        calls += [json.loads(o.arguments) for o in response.output if o.type == "function_call"]
        calls += [b.input for b in message.content if b.type == "tool_use"]
        if intact:  # the model's own call is allowed: strict, it follows the schema; not strict, anything goes
            assert (chat.message.content, response.output[0].content[0].text) == ("Sure.", "Sure.")
            assert calls == [{"n": 7}] * 3
        else:  # its own call lacks "unit": held to the schema, the call comes back whole on every dialect, and what
            # the model wrote after it (the grammar lets a strict call go unclosed and text follow) stays content
            assert chat.message.content.startswith("Sure.")
            assert response.output[0].content[0].text == chat.message.content
            assert len(calls) == 3 and {"n": 7} not in calls
            for call in calls:
                jsonschema.validate(call, schema)


def test_the_sdk_helpers_messages_go_back_in_the_history_as_they_came(compact: InProcessServer) -> None:
    """An agent appends the message the SDK returned; after `stream()` or `parse()` it carries the helpers' own
    fields (`tool_calls[].index`, `parsed`, `function.parsed_arguments`, `annotations`), which were 400s."""
    client, model = client_of(compact), model_of(compact)
    args = {"model": model, "tools": [{"type": "function", "function": _lookup(["n"])}], "max_tokens": 20}
    with client.chat.completions.stream(messages=ASK, temperature=0, **args) as stream:
        streamed = stream.get_final_completion().choices[0].message
    parsed = client.chat.completions.parse(messages=ASK, temperature=0, **args).choices[0].message
    for message in (streamed, parsed):
        assert message.tool_calls
        result = {"role": "tool", "tool_call_id": message.tool_calls[0].id, "content": "7 km"}
        again = client.chat.completions.create(messages=[*ASK, message, result], **args)
        assert again.choices[0].message is not None
    echoed = {"role": "assistant", "content": "Hi.", "annotations": [], "parsed": {"a": 1}, "refusal": None}
    assert client.chat.completions.create(messages=[*ASK, echoed, *ASK], **args).choices
    # and the Responses API's neutral fields are neutral here too; storing is not
    neutral = {"store": False, "metadata": {"k": "v"}, "prompt_cache_key": "p", "safety_identifier": "s"}
    assert client.chat.completions.create(messages=ASK, **args, **neutral, service_tier="auto").choices
    with pytest.raises(openai.BadRequestError, match="keeps no completions"):
        client.chat.completions.create(messages=ASK, **args, store=True)


def test_the_native_engine_enforces_a_schema_too(tiny_qwen2_dir: Path) -> None:
    """Random weights would never write this JSON by themselves: only the mask can make every answer valid."""
    schema = {
        "type": "object",
        "properties": {"kind": {"enum": ["cat", "dog"]}, "ok": {"type": "boolean"}},
        "required": ["kind", "ok"],
        "additionalProperties": False,
    }
    with serve_in_process(tiny_qwen2_dir, engine="native", max_num_return_sequences=4) as server:
        client = client_of(server)
        response = client.chat.completions.create(
            model=client.models.list().data[0].id,
            messages=[{"role": "user", "content": "Pick an animal."}],
            response_format={"type": "json_schema", "json_schema": {"name": "pick", "schema": schema, "strict": True}},
            n=3,
            temperature=1.0,
            max_tokens=64,
        )
        for choice in response.choices:
            jsonschema.validate(json.loads(choice.message.content or ""), schema)
            assert choice.finish_reason == "stop"


def test_a_constraint_crosses_a_process_as_its_grammar_and_binds_to_that_process_tokenizer(
    tiny_qwen2_dir: Path,
) -> None:
    """What a Ray replica receives: the pickled constraint carries its grammar and the vocabulary's key, not
    llguidance's tokenizer (which cannot be pickled); the other process binds it once it has built its own, and
    its matcher then allows exactly what this process's allows."""
    import asyncio
    import pickle
    import subprocess
    import sys

    from transformers import AutoTokenizer

    from qwen_api.structured.grammar import GrammarCompiler, json_schema_grammar

    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    compiler = GrammarCompiler(AutoTokenizer.from_pretrained(tiny_qwen2_dir))
    constraint = asyncio.run(compiler.compile(json_schema_grammar(schema)))
    blob = pickle.dumps(constraint)
    assert len(blob) < len(constraint.grammar) + 1000  # the grammar and a key, nothing the size of a vocabulary
    here = constraint.matcher()
    allowed = [int(here.allowed(152064).sum())]
    here.advance(int(here.allowed(152064).nonzero()[0][0]))  # "{"
    allowed.append(int(here.allowed(152064).sum()))
    script = f"""
import asyncio, pickle, sys
from transformers import AutoTokenizer
from qwen_api.structured.grammar import GrammarCompiler, GrammarError
constraint = pickle.loads(sys.stdin.buffer.read())
assert not constraint.bound()
try:
    constraint.matcher()
    raise SystemExit("a matcher without a tokenizer")
except GrammarError:
    pass
asyncio.run(GrammarCompiler(AutoTokenizer.from_pretrained({str(tiny_qwen2_dir)!r})).prepare())
assert constraint.bound()
there = constraint.matcher()
counts = [int(there.allowed(152064).sum())]
there.advance(int(there.allowed(152064).nonzero()[0][0]))
counts.append(int(there.allowed(152064).sum()))
print(counts)
"""
    done = subprocess.run([sys.executable, "-c", script], input=blob, capture_output=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    assert done.stdout.decode().strip().splitlines()[-1] == str(allowed)


PICK = {
    "type": "function",
    "function": {
        "name": "pick",
        "parameters": {
            "type": "object",
            "properties": {"kind": {"enum": ["cat", "dog"]}, "size": {"type": "integer", "minimum": 0, "maximum": 99}},
            "required": ["kind", "size"],
            "additionalProperties": False,
        },
    },
}
ANSWER_SCHEMA = {
    "type": "object",
    "properties": {"ok": {"type": "boolean"}},
    "required": ["ok"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def native_tiny(tiny_qwen2_dir: Path) -> Iterator[InProcessServer]:
    """Random weights: whatever a grammar leaves them free to write, they write, whitespace included."""
    with serve_in_process(tiny_qwen2_dir, engine="native", max_num_return_sequences=8) as server:
        yield server


def test_a_forced_call_is_compact_whole_and_beyond_stop_strings(native_tiny: InProcessServer) -> None:
    """The call's JSON had free whitespace: random weights padded it with newlines and tabs until max_tokens, and
    the unfinished markup came back as content. And a stop string inside the markup (`call`, a newline) cut it
    into content. A forced call is the whole answer, so no stop string applies to it."""
    client = client_of(native_tiny)
    for stop in (None, ["call", "\n", "_"]):
        out = client.chat.completions.create(
            model=model_of(native_tiny), messages=ASK, tools=[PICK], tool_choice="required", n=6, temperature=1.0,
            seed=5, max_tokens=60, stop=stop,
        )  # fmt: skip
        for choice in out.choices:
            assert choice.finish_reason == "tool_calls", (stop, choice)
            assert not choice.message.content, (stop, choice.message.content)
            (call,) = choice.message.tool_calls or []
            jsonschema.validate(json.loads(call.function.arguments), PICK["function"]["parameters"])


HTML = "<b>x</b></tool_call>"
EMIT = {
    "type": "function",
    "function": {
        "name": "emit",
        "strict": True,
        "parameters": {
            "type": "object",
            "properties": {"html": {"const": HTML}},
            "required": ["html"],
            "additionalProperties": False,
        },
    },
}


def test_a_call_whose_argument_holds_the_closing_tag_is_a_call_on_every_dialect(native_tiny: InProcessServer) -> None:
    """An argument may hold `</tool_call>` (HTML, code): the parser ended the block there, so a forced call came back
    as its raw markup in the content, with no call, on every dialect. And a forced call cut off by the token limit
    inside its opening tag (`<tool`) came back as that text: a forced answer is calls only."""
    client, model = client_of(native_tiny), model_of(native_tiny)
    args = {"model": model, "messages": ASK, "tools": [EMIT], "tool_choice": "required", "max_tokens": 60}
    plain = client.chat.completions.create(**args)
    (call,) = plain.choices[0].message.tool_calls or []
    assert json.loads(call.function.arguments) == {"html": HTML} and not plain.choices[0].message.content
    with client.chat.completions.stream(**args) as stream:
        final = stream.get_final_completion()
    assert json.loads(final.choices[0].message.tool_calls[0].function.arguments) == {"html": HTML}
    responses = client.responses.create(
        model=model, input="Give me JSON.", tools=[{"type": "function", **EMIT["function"]}], tool_choice="required"
    )
    assert [(o.type, json.loads(o.arguments)) for o in responses.output] == [("function_call", {"html": HTML})]
    claude = sdk(anthropic.Anthropic, base_url=native_tiny.base_url, api_key="unused", max_retries=0, timeout=120)
    tool = {"name": "emit", "input_schema": EMIT["function"]["parameters"], "strict": True}
    message = claude.messages.create(
        model=model, max_tokens=60, messages=ASK, tools=[tool], tool_choice={"type": "tool", "name": "emit"}
    )
    assert [(b.type, getattr(b, "input", None)) for b in message.content] == [("tool_use", {"html": HTML})]
    for max_tokens in (1, 2, 3):  # `<`, `<tool`, `<tool_call`: the opening tag is several tokens
        cut = client.chat.completions.create(**{**args, "max_tokens": max_tokens})
        assert (cut.choices[0].finish_reason, cut.choices[0].message.content) == ("length", ""), max_tokens
        streamed = client.chat.completions.create(**{**args, "max_tokens": max_tokens}, stream=True)
        assert not "".join(c.choices[0].delta.content or "" for c in streamed if c.choices), max_tokens
        short = claude.messages.create(
            model=model, max_tokens=max_tokens, messages=ASK, tools=[tool], tool_choice={"type": "any"}
        )
        assert short.stop_reason == "max_tokens" and not any(b.type == "text" and b.text for b in short.content)


def test_a_forced_call_to_a_function_without_parameters_has_no_arguments(native_tiny: InProcessServer) -> None:
    """A function declared without `parameters` (or with `{}`) takes none: random weights wrote made-up keys into
    its arguments, or ran to max_tokens inside them."""
    client = client_of(native_tiny)
    for function in ({"name": "ping"}, {"name": "ping", "parameters": {}}):
        out = client.chat.completions.create(
            model=model_of(native_tiny), messages=ASK, tools=[{"type": "function", "function": function}], n=4,
            tool_choice={"type": "function", "function": {"name": "ping"}}, temperature=1.0, seed=1, max_tokens=40,
        )  # fmt: skip
        for choice in out.choices:
            assert choice.finish_reason == "tool_calls", choice
            assert [c.function.arguments for c in choice.message.tool_calls or []] == ["{}"]


def test_auto_tools_beside_a_response_format_may_call_or_answer_in_the_format(native_tiny: InProcessServer) -> None:
    """OpenAI's agents send `tools` (auto) and a `response_format` together: the model either calls a tool or answers
    in the format. The grammar was the format's alone, so no call could ever come. A bias picks the branch: on `<`
    (how a call opens) calls, on `{` (how the JSON opens) content."""
    tokenizer = native_tiny.runtime.generator().tokenizer
    (lt,), (brace,) = (tokenizer(t, add_special_tokens=False)["input_ids"] for t in ("<", "{"))
    fmt = {"type": "json_schema", "json_schema": {"name": "answer", "schema": ANSWER_SCHEMA}}
    client = client_of(native_tiny)
    for first, calls in ((lt, True), (brace, False)):
        out = client.chat.completions.create(
            model=model_of(native_tiny), messages=ASK, tools=[PICK], response_format=fmt, n=3, temperature=1.0,
            seed=9, max_tokens=80, logit_bias={str(first): 100},
        )  # fmt: skip
        for choice in out.choices:
            if calls:
                assert choice.finish_reason == "tool_calls", choice
                for call in choice.message.tool_calls or []:
                    jsonschema.validate(json.loads(call.function.arguments), PICK["function"]["parameters"])
            else:
                assert choice.finish_reason == "stop" and not choice.message.tool_calls, choice
                jsonschema.validate(json.loads(choice.message.content or ""), ANSWER_SCHEMA)


EXPLODING = {  # llguidance compiles it, then gives up matching: the lexer's regex grows past its limit
    "type": "object",
    "properties": {"s": {"type": "string", "pattern": "^(([a-z]{1,100}){1,100}){1,100}$"}},
    "required": ["s"],
}
ENDLESS = {  # every object must hold another: no JSON ends, and the parser gives up on the first key
    "$defs": {"n": {"type": "object", "properties": {"c": {"$ref": "#/$defs/n"}}, "required": ["c"]}},
    "$ref": "#/$defs/n",
}


def _schema_failures_are_errors_not_invalid_json(server: InProcessServer) -> None:
    """A schema llguidance accepts but gives up on while matching made the output end early, `finish_reason: stop`,
    200 with invalid JSON. Now the request fails: 400 `schema_not_followed`, or an error event once streaming."""
    client = client_of(server)
    args = {"model": model_of(server), "messages": ASK, "max_tokens": 40, "seed": 1}
    for schema in (EXPLODING, ENDLESS):
        fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
        with pytest.raises(openai.BadRequestError) as failed:
            client.chat.completions.create(**args, response_format=fmt)
        assert failed.value.code == "schema_not_followed" and "schema" in failed.value.message
        with httpx.stream(
            "POST", f"{server.base_url}/v1/chat/completions", json={**args, "response_format": fmt, "stream": True},
            timeout=60,
        ) as r:  # fmt: skip
            events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
        assert "schema" in events[-1]["error"]["message"], events[-1]
        assert all(c["choices"][0]["finish_reason"] is None for c in events[:-1] if c.get("choices"))
    # one whose first step already fails is refused before generating, like any schema that cannot be enforced
    itself = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "#"}}}
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(**args, response_format=itself)
    assert refused.value.param == "response_format"
    assert client.chat.completions.create(**args).choices[0].message.content is not None  # the engine still serves


def test_a_schema_the_grammar_engine_gives_up_on_is_an_error(demo: InProcessServer) -> None:
    _schema_failures_are_errors_not_invalid_json(demo)


def test_a_schema_the_grammar_engine_gives_up_on_is_an_error_on_the_native_engine(native_tiny: InProcessServer) -> None:
    _schema_failures_are_errors_not_invalid_json(native_tiny)
