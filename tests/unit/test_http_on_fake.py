"""The HTTP layer on a fake engine, in-process (no model, no socket): shapes, streaming, errors, admission."""

from __future__ import annotations

import asyncio
import copy
import json
from collections.abc import Awaitable, Callable
from typing import Any

import httpx

from qwen_api.admission import Admission
from qwen_api.api.app import create_app, observe_with
from qwen_api.dev.fake_engine import FakeEngine
from qwen_api.dev.random_qwen2 import build_qwen2_tokenizer
from qwen_api.runtime import Runtime
from qwen_api.settings import Settings
from qwen_api.textgen import TextGenerator

TOKENIZER = build_qwen2_tokenizer()
ANSWER = "Paris is the capital of France."


def run(
    test: Callable[[httpx.AsyncClient, FakeEngine, Admission], Awaitable[None]],
    tokenizer: Any = TOKENIZER,
    **settings: Any,
) -> None:
    """Run `test` against create_app(...) over a fake engine that answers ANSWER."""
    fake = FakeEngine(TOKENIZER(ANSWER, add_special_tokens=False)["input_ids"])

    async def main() -> None:
        runtime = Runtime(lambda: TextGenerator(fake, tokenizer), "fake-model")
        admission = Admission(Settings(**settings).admission_capacity())
        app = create_app(Settings(**settings), runtime, admission)
        runtime.connect(on_ready=observe_with(app.state.metrics))
        runtime.start()
        await runtime.wait_ready()
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            await test(client, fake, admission)
        await runtime.close()

    asyncio.run(main())


def test_generate_answers_in_the_specification_shape() -> None:
    async def test(client: httpx.AsyncClient, fake: FakeEngine, _: Admission) -> None:
        r = await client.post("/generate", json={"prompt": "Capital of France?", "num_return_sequences": 2})
        assert r.status_code == 200
        body = r.json()
        assert body["generated_texts"] == [ANSWER, ANSWER]
        assert body["parameters"] == {
            "prompt": "Capital of France?", "max_length": 512, "temperature": 0.7, "top_p": 0.9, "top_k": 50,
            "num_return_sequences": 2,
        }  # fmt: skip
        prompt_ids, params = fake.calls[0]
        assert TOKENIZER.decode(prompt_ids).endswith(
            "<|im_start|>user\nCapital of France?<|im_end|>\n<|im_start|>assistant\n"
        )
        assert (params.max_new_tokens, params.temperature, params.top_p, params.top_k) == (512, 0.7, 0.9, 50)

    run(test)


def test_chat_completions_stream_as_openai_chunks_then_done() -> None:
    async def test(client: httpx.AsyncClient, *_: object) -> None:
        body = {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}], "stream": True,
                "stream_options": {"include_usage": True}}  # fmt: skip
        r = await client.post("/v1/chat/completions", json=body)
        lines = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
        assert lines[-1] == "[DONE]"
        chunks = [json.loads(line) for line in lines[:-1]]
        text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
        assert text == ANSWER
        assert chunks[-1]["usage"]["completion_tokens"] == len(TOKENIZER(ANSWER)["input_ids"])

    run(test)


def test_errors_keep_their_family_shape() -> None:
    async def test(client: httpx.AsyncClient, *_: object) -> None:
        assert (await client.get("/v1/nope")).json()["error"]["code"] == "not_found"
        assert (await client.get("/v1/chat/completions")).json()["error"]["code"] == "method_not_allowed"
        assert (await client.get("/nope")).json() == {"detail": "Not Found"}
        seed = await client.post("/generate", json={"prompt": "hi", "max_length": "5"})
        assert seed.status_code == 422 and seed.json()["detail"][0]["loc"] == ["body", "max_length"]
        anthropic = await client.post("/v1/messages", json={"model": "fake-model"})
        assert anthropic.status_code == 400 and anthropic.json()["type"] == "error"
        surrogate = await client.post(
            "/v1/completions", content=b'{"model": "fake-model", "prompt": "\\udfff"}',
            headers={"content-type": "application/json"},
        )  # fmt: skip
        assert surrogate.status_code == 400 and "surrogate" in surrogate.json()["error"]["message"]

    run(test)


def _nested(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = {"a": value}
    return value


def test_input_nested_past_the_limit_is_a_4xx_in_each_route_shape() -> None:
    """Objects 500 deep (4 KB of JSON): the recursive surrogate check hit Python's recursion limit, a 500 on every
    route. Refused now, whatever the depth (iteratively), with the route's own error shape."""
    from qwen_api.api.schema import MAX_NESTING, _content_problem

    assert _content_problem([_nested(MAX_NESTING - 1)]) is None  # MAX_NESTING levels in all
    assert "deeper than" in (_content_problem([_nested(MAX_NESTING)]) or "")
    assert "deeper than" in (_content_problem(_nested(200_000)) or "")
    deep = _nested(500)
    chat = {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}]}
    cases = [
        ("/v1/chat/completions", {**chat, "logit_bias": deep}, 400, "error"),
        ("/v1/chat/completions", {**chat, "tools": [{"type": "function", "function": {"name": "f", "parameters": deep}}]},
         400, "error"),
        ("/v1/completions", {"model": "fake-model", "prompt": "hi", "logit_bias": deep}, 400, "error"),
        ("/v1/responses", {"model": "fake-model", "input": "hi", "metadata": deep}, 400, "error"),
        ("/v1/messages", {"model": "fake-model", "max_tokens": 4, "messages": [], "metadata": deep}, 400, "type"),
        ("/v1/messages/count_tokens", {"model": "fake-model", "messages": [], "system": deep}, 400, "type"),
        ("/tokenize", {"prompt": "hi", "model": deep}, 400, "error"),
        ("/generate", {"prompt": "hi", "max_length": deep}, 422, "detail"),
    ]  # fmt: skip

    async def test(client: httpx.AsyncClient, *_: object) -> None:
        for path, body, status, key in cases:
            r = await client.post(path, json=body)
            assert r.status_code == status, (path, r.text[:300])
            assert key in r.json() and "deeper than" in r.text, (path, r.text[:300])

    run(test)


def test_n_past_what_admission_could_ever_take_is_a_4xx_not_a_429() -> None:
    """With 2 batch slots and 1 waiting place, 4 samples can never be admitted: a 429 would have the client retry
    for good. The cap on n is the smaller of --max-num-return-sequences and that capacity."""

    async def test(client: httpx.AsyncClient, *_: object) -> None:
        chat = {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
        over = await client.post("/v1/chat/completions", json={**chat, "n": 4})
        assert over.status_code == 400 and over.json()["error"]["param"] == "n", over.text
        assert "at most 3" in over.json()["error"]["message"]
        seed = await client.post("/generate", json={"prompt": "hi", "max_length": 3, "num_return_sequences": 4})
        assert seed.status_code == 422 and seed.json()["detail"][0]["loc"] == ["body", "num_return_sequences"]
        fits = await client.post("/v1/chat/completions", json={**chat, "n": 3})
        assert fits.status_code == 200 and len(fits.json()["choices"]) == 3

    run(test, max_batch_size=2, max_waiting_sequences=1)


def test_a_full_server_refuses_at_once_with_429() -> None:
    async def test(client: httpx.AsyncClient, _: FakeEngine, admission: Admission) -> None:
        held = admission.acquire(admission.capacity)
        try:
            r = await client.post("/generate", json={"prompt": "hi"})
            assert r.status_code == 429 and r.headers["retry-after"] == "1"
            v1 = await client.post("/v1/completions", json={"model": "fake-model", "prompt": "hi"})
            assert v1.status_code == 429 and v1.json()["error"]["type"] == "server_overloaded"
        finally:
            held.release()
        assert (await client.post("/generate", json={"prompt": "hi"})).status_code == 200

    run(test, max_batch_size=2, max_waiting_sequences=0)


def test_no_route_or_dependency_runs_in_the_thread_pool(monkeypatch: Any) -> None:
    """FastAPI runs a plain `def` route or dependency in its thread pool: a round trip to a worker thread per call
    per request (a chat request made six, a quarter of its server CPU: bench/stream_overhead.py --tokens 1). The
    inference routes, the probes and the metrics run on the event loop only."""
    import fastapi.dependencies.utils
    import fastapi.routing

    pooled: list[str] = []
    for module in (fastapi.dependencies.utils, fastapi.routing):
        original = module.run_in_threadpool

        def counted(func: Any, *args: Any, _original: Any = original, **kwargs: Any) -> Any:
            pooled.append(getattr(func, "__qualname__", repr(func)))
            return _original(func, *args, **kwargs)

        monkeypatch.setattr(module, "run_in_threadpool", counted)

    async def test(client: httpx.AsyncClient, fake: FakeEngine, admission: Admission) -> None:
        chat = {"model": "fake-model", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
        calls = [
            ("POST", "/v1/chat/completions", chat),
            ("POST", "/v1/chat/completions", {**chat, "stream": True}),
            ("POST", "/v1/completions", {"model": "fake-model", "prompt": "Hi", "max_tokens": 4}),
            ("POST", "/generate", {"prompt": "Hi", "max_length": 4}),
            ("POST", "/v1/messages", {"model": "fake-model", "max_tokens": 4, "messages": chat["messages"]}),
            ("POST", "/v1/responses", {"model": "fake-model", "input": "Hi", "max_output_tokens": 4}),
            ("GET", "/health", None),
            ("GET", "/", None),
            ("GET", "/v1/models", None),
            ("GET", "/metrics", None),
        ]
        for method, path, body in calls:
            response = await client.request(method, path, json=body)
            assert response.status_code == 200, (path, response.text)
        assert not pooled, f"run in the thread pool: {sorted(set(pooled))}"

    run(test)


def test_vllm_continue_final_message_and_add_generation_prompt() -> None:
    """vLLM's prompt-shaping fields: a continued assistant message is the start of the answer (the prompt ends with
    its text, no end of turn; the answer is what follows it); without the generation prompt the prompt ends after
    the last message. /tokenize counts what chat completions reads; what cannot go together is a 400."""
    history = [{"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "It is"}]
    chat = {"model": "fake-model", "messages": history, "max_tokens": 20}

    async def test(client: httpx.AsyncClient, fake: FakeEngine, _: Admission) -> None:
        r = await client.post("/v1/chat/completions", json={**chat, "continue_final_message": True})
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == ANSWER
        prompt_ids, _ = fake.calls[-1]
        assert TOKENIZER.decode(prompt_ids).endswith("Capital of France?<|im_end|>\n<|im_start|>assistant\nIt is")
        counted = await client.post("/tokenize", json={"messages": history, "continue_final_message": True})
        assert counted.json()["tokens"] == prompt_ids == fake.calls[-1][0]
        assert r.json()["usage"]["prompt_tokens"] == len(prompt_ids)
        r = await client.post("/v1/chat/completions", json={**chat, "add_generation_prompt": False})
        assert r.status_code == 200
        assert TOKENIZER.decode(fake.calls[-1][0]).endswith("<|im_start|>assistant\nIt is<|im_end|>\n")
        default = await client.post("/tokenize", json={"messages": history})
        assert TOKENIZER.decode(default.json()["tokens"]).endswith("It is<|im_end|>\n<|im_start|>assistant\n")
        schema = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}
        for extra, where in (
            ({"continue_final_message": True, "add_generation_prompt": True}, "/v1/chat/completions"),
            ({"continue_final_message": True, "messages": history[:1]}, "/v1/chat/completions"),
            ({"continue_final_message": True, "response_format": schema}, "/v1/chat/completions"),
            ({"continue_final_message": True, "messages": history[1:]}, "/tokenize"),
        ):
            r = await client.post(
                where, json={**chat, **extra} if where != "/tokenize" else {"messages": history, **extra}
            )
            assert r.status_code == 400 and r.json()["error"]["param"] == "continue_final_message", (extra, r.text)

    run(test)


def test_vllm_chat_echo_repeats_the_last_assistant_message() -> None:
    """vLLM's `echo` on chat completions: the answer's content starts with the last message's when that is an
    assistant's (continued or not), plain and streamed (a content chunk right after the role chunk); after a user's
    message it adds nothing."""
    history = [{"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "It is "}]
    chat = {"model": "fake-model", "messages": history, "max_tokens": 20, "echo": True}

    async def test(client: httpx.AsyncClient, fake: FakeEngine, _: Admission) -> None:
        for extra in ({"continue_final_message": True, "add_generation_prompt": False}, {}):
            r = await client.post("/v1/chat/completions", json={**chat, **extra})
            assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "It is " + ANSWER
        streamed = {**chat, "stream": True, "n": 2, "logprobs": True, "return_token_ids": True}
        r = await client.post("/v1/chat/completions", json=streamed)
        events = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
        for index in (0, 1):
            choices = [e["choices"][0] for e in events if e["choices"][0]["index"] == index]
            deltas = [c["delta"] for c in choices]
            assert deltas[0] == {"role": "assistant", "content": ""} and deltas[1] == {"content": "It is "}
            assert choices[1]["logprobs"] is None and "token_ids" not in choices[1]  # none of the answer's tokens
            assert "".join(d.get("content", "") for d in deltas) == "It is " + ANSWER
        # a message of text parts reads as its parts joined by newlines (as vLLM renders it), echoed so too
        parts = [{"type": "text", "text": "It is"}, {"type": "text", "text": "sunny: "}]
        r = await client.post(
            "/v1/chat/completions", json={**chat, "messages": [history[0], {**history[1], "content": parts}]}
        )
        assert r.json()["choices"][0]["message"]["content"] == "It is\nsunny: " + ANSWER
        r = await client.post("/v1/chat/completions", json={**chat, "messages": history[:1]})
        assert r.json()["choices"][0]["message"]["content"] == ANSWER

    run(test)


def test_vllm_chat_template_kwargs_reach_the_template() -> None:
    """vLLM's `chat_template_kwargs` are variables for the chat template (here one that reads `enable_thinking`, as
    Qwen3's does, and refuses a `style` it does not know), on chat completions and /tokenize alike; a variable the
    server sets itself, or one the template refuses, is a 400 naming the field."""
    tokenizer = copy.deepcopy(TOKENIZER)
    tokenizer.chat_template = (
        "{% if style is defined and style != 'plain' %}{{ raise_exception('unknown style ' + style) }}{% endif %}"
        "{% if budget is defined %}{{ budget // 2 }}{% endif %}{% if times is defined %}{{ 'x' * times }}{% endif %}"
        + TOKENIZER.chat_template
        + "{% if enable_thinking is defined and not enable_thinking %}/no_think{% endif %}"
    )
    messages = [{"role": "user", "content": "Capital of France?"}]
    chat = {"model": "fake-model", "messages": messages, "max_tokens": 20}

    async def test(client: httpx.AsyncClient, fake: FakeEngine, _: Admission) -> None:
        r = await client.post("/v1/chat/completions", json={**chat, "chat_template_kwargs": {"enable_thinking": False}})
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == ANSWER
        assert TOKENIZER.decode(fake.calls[-1][0]).endswith("<|im_start|>assistant\n/no_think")
        counted = await client.post(
            "/tokenize", json={"messages": messages, "chat_template_kwargs": {"enable_thinking": False}}
        )
        assert counted.json()["tokens"] == fake.calls[-1][0]
        r = await client.post("/v1/chat/completions", json={**chat, "chat_template_kwargs": {"style": "plain"}})
        assert r.status_code == 200 and not TOKENIZER.decode(fake.calls[-1][0]).endswith("/no_think")
        r = await client.post("/v1/chat/completions", json={**chat, "chat_template_kwargs": {"budget": 8}})
        assert r.status_code == 200 and TOKENIZER.decode(fake.calls[-1][0]).startswith("4<|im_start|>")
        r = await client.post("/v1/chat/completions", json={**chat, "chat_template_kwargs": {"times": 100}})
        assert r.status_code == 200 and "x" * 100 in TOKENIZER.decode(fake.calls[-1][0])
        # a text the template makes too long for the context (4,096 tokens here) is refused before it is tokenised
        r = await client.post("/v1/chat/completions", json={**chat, "chat_template_kwargs": {"times": 10**7}})
        assert r.status_code == 400 and "at least 39062 tokens" in r.json()["error"]["message"], r.text
        refused = (
            {"add_generation_prompt": False},
            {"messages": []},
            {"style": "fancy"},
            {"no way": 1},
            {"bos_token": "x"},
        )
        for kwargs in (*refused, {"budget": "x"}):  # the last: a value the template cannot compute with
            for path in ("/v1/chat/completions", "/tokenize"):
                body = {**(chat if path != "/tokenize" else {"messages": messages}), "chat_template_kwargs": kwargs}
                r = await client.post(path, json=body)
                assert r.status_code == 400, (path, kwargs, r.text)
                if path != "/tokenize":
                    assert r.json()["error"]["param"] == "chat_template_kwargs", kwargs

    run(test, tokenizer=tokenizer)


def test_vllm_truncate_prompt_tokens_request_id_and_priority() -> None:
    """vLLM's `truncate_prompt_tokens` keeps the prompt's last k tokens, as the request asks (the echo, the usage and
    the engine see what is left; chat's template tokens count too); `request_id` names the answer; a `priority` but
    0 is a 400 (one queue here)."""
    ids = TOKENIZER("one two three four five six seven", add_special_tokens=False)["input_ids"]
    text = {"model": "fake-model", "prompt": ids, "max_tokens": 20, "echo": True}

    async def test(client: httpx.AsyncClient, fake: FakeEngine, _: Admission) -> None:
        r = await client.post("/v1/completions", json={**text, "truncate_prompt_tokens": 3, "request_id": "job-7"})
        body = r.json()
        assert fake.calls[-1][0] == ids[-3:] and body["usage"]["prompt_tokens"] == 3 and body["id"] == "cmpl-job-7"
        assert body["choices"][0]["text"] == TOKENIZER.decode(ids[-3:]) + ANSWER
        r = await client.post("/v1/completions", json={**text, "prompt": "one two three", "truncate_prompt_tokens": 1})
        assert r.json()["choices"][0]["text"] == " three" + ANSWER and fake.calls[-1][0] == ids[2:3]
        for keep in (-1, len(ids), 100):  # the whole prompt fits: nothing to cut
            r = await client.post("/v1/completions", json={**text, "truncate_prompt_tokens": keep})
            assert fake.calls[-1][0] == ids and r.json()["usage"]["prompt_tokens"] == len(ids)
        # -1: as much of the prompt as leaves the answer its max_tokens in the context (4,096 tokens here)
        long = ids * 700
        r = await client.post("/v1/completions", json={**text, "prompt": long, "truncate_prompt_tokens": -1})
        assert r.status_code == 200 and fake.calls[-1][0] == long[-(4096 - 20) :]
        r = await client.post("/v1/completions", json={**text, "prompt": long, "truncate_prompt_tokens": 4090})
        assert r.status_code == 400 and r.json()["error"]["param"] == "truncate_prompt_tokens"
        chat = {"model": "fake-model", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5}
        r = await client.post(
            "/v1/chat/completions", json={**chat, "truncate_prompt_tokens": 4, "request_id": "gsm8k/17 try#2"}
        )
        assert len(fake.calls[-1][0]) == 4 and r.json()["id"] == "chatcmpl-gsm8k/17 try#2"
        assert TOKENIZER.decode(fake.calls[-1][0]).endswith("<|im_start|>assistant\n")
        r = await client.post("/v1/chat/completions", json=chat, headers={"X-Request-ID": "trace-9"})
        assert r.json()["id"] == "chatcmpl-trace-9" and r.headers["x-request-id"] == "trace-9"
        r = await client.post("/v1/completions", json=text)  # no id given: the one the server made, in its header
        assert r.json()["id"] == "cmpl-" + r.headers["x-request-id"]
        for bad, param in (
            ({"truncate_prompt_tokens": 0}, "truncate_prompt_tokens"),
            ({"truncate_prompt_tokens": -2}, "truncate_prompt_tokens"),
            ({"priority": 1}, "priority"),
            ({"request_id": ""}, "request_id"),
        ):
            r = await client.post("/v1/chat/completions", json={**chat, **bad})
            assert r.status_code == 400 and r.json()["error"]["param"] == param, (bad, r.text)

    run(test)


def test_openai_modalities_text_is_accepted_and_audio_refused() -> None:
    chat = {"model": "fake-model", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 20}

    async def test(client: httpx.AsyncClient, fake: FakeEngine, _: Admission) -> None:
        r = await client.post("/v1/chat/completions", json={**chat, "modalities": ["text"]})
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == ANSWER
        for modalities in (["text", "audio"], ["audio"], []):
            r = await client.post("/v1/chat/completions", json={**chat, "modalities": modalities})
            assert r.status_code == 400 and r.json()["error"]["param"] == "modalities", modalities

    run(test)


def test_echo_in_the_legacy_shape_plain_streamed_and_empty() -> None:
    """`echo` on text completions (the engines' log-probabilities of the prompt are scripted here): the prompt's
    text leads the answer's, its tokens lead the log-probabilities with the first one's null, `text_offset` runs
    over both, and max_tokens 0 answers the prompt alone with no completion tokens."""
    ids = TOKENIZER("Hello there world", add_special_tokens=False)["input_ids"]
    body = {"model": "fake-model", "prompt": ids, "echo": True, "logprobs": 1, "max_tokens": 2}

    async def test(client: httpx.AsyncClient, fake: FakeEngine, _: Admission) -> None:
        r = (await client.post("/v1/completions", json=body)).json()
        [choice] = r["choices"]
        first_two = TOKENIZER.decode(TOKENIZER(ANSWER, add_special_tokens=False)["input_ids"][:2])
        assert choice["text"] == "Hello there world" + first_two
        lp = choice["logprobs"]
        assert lp["token_logprobs"][: len(ids)] == [None] + [-i / 16 for i in range(1, len(ids))]
        assert lp["top_logprobs"][0] is None and len(lp["top_logprobs"][1]) == 1 and len(lp["tokens"]) == len(ids) + 2
        assert lp["text_offset"][: len(ids) + 1] == [0, 5, 11, 17]
        assert fake.calls[-1][1].prompt_logprobs == 1
        empty = (await client.post("/v1/completions", json={**body, "max_tokens": 0})).json()
        assert empty["choices"][0]["text"] == "Hello there world" and empty["usage"]["completion_tokens"] == 0
        assert len(empty["choices"][0]["logprobs"]["tokens"]) == len(ids)
        async with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as s:
            events = [json.loads(line[6:]) for line in [x async for x in s.aiter_lines()] if line[6:7] == "{"]
        assert "".join(e["choices"][0]["text"] for e in events) == choice["text"]
        streamed = [t for e in events for t in (e["choices"][0]["logprobs"] or {}).get("token_logprobs", [])]
        assert streamed == lp["token_logprobs"]
        plain = (await client.post("/v1/completions", json={**body, "logprobs": None})).json()
        assert plain["choices"][0]["logprobs"] is None and fake.calls[-1][1].prompt_logprobs is None
        # a one-token prompt has no scored token, and is listed all the same, first, its log-probability null
        one = (await client.post("/v1/completions", json={**body, "prompt": ids[:1], "max_tokens": 3})).json()
        assert (
            one["choices"][0]["logprobs"]["tokens"][0] == "Hello"
            and one["choices"][0]["logprobs"]["token_logprobs"][0] is None
        )
        # a token-id prompt that ends inside a character: its echo shows a U+FFFD, and the answer's offsets count it
        byte_ids = [TOKENIZER.convert_tokens_to_ids(t) for t in ("ð", "Ł")]  # the bytes 0xF0 0x9F: half of an emoji
        echoed = (await client.post("/v1/completions", json={**body, "prompt": ids[:1] + byte_ids})).json()
        text, offsets = echoed["choices"][0]["text"], echoed["choices"][0]["logprobs"]["text_offset"]
        first = TOKENIZER.decode(TOKENIZER(ANSWER, add_special_tokens=False)["input_ids"][:1])
        assert text.startswith("Hello\ufffd") and text[offsets[3] :].startswith(first), (text, offsets)
        # nothing drawn is counted for an answer of max_tokens 0
        before = (await client.get("/metrics")).text
        await client.post("/v1/completions", json={**body, "max_tokens": 0})
        counted = [
            line for line in (await client.get("/metrics")).text.splitlines() if "generation_tokens_total " in line
        ]
        assert counted == [line for line in before.splitlines() if "generation_tokens_total " in line]
        refused = await client.post("/v1/completions", json={**body, "max_tokens": 0, "min_tokens": 1})
        assert refused.status_code == 400 and refused.json()["error"]["param"] == "min_tokens"

    run(test)


def test_several_prompts_in_one_text_completion_plain_and_streamed() -> None:
    """A list of prompts (texts, or token-id lists), as OpenAI's legacy route takes them: prompt k's n answers are
    choices k * n to k * n + n - 1, the usage counts every prompt, a stream interleaves them, each ending once."""
    prompts = ["one", "two three"]
    body = {"model": "fake-model", "prompt": prompts, "n": 2, "max_tokens": 3, "echo": True}

    async def test(client: httpx.AsyncClient, fake: FakeEngine, _: Admission) -> None:
        r = (await client.post("/v1/completions", json=body)).json()
        answer = TOKENIZER.decode(TOKENIZER(ANSWER, add_special_tokens=False)["input_ids"][:3])
        assert [(c["index"], c["text"]) for c in r["choices"]] == [
            (0, "one" + answer), (1, "one" + answer), (2, "two three" + answer), (3, "two three" + answer)
        ]  # fmt: skip
        assert r["usage"]["prompt_tokens"] == 1 + 2 and r["usage"]["completion_tokens"] == 4 * 3
        async with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as s:
            events = [json.loads(line[6:]) for line in [x async for x in s.aiter_lines()] if line[6:7] == "{"]
        texts = ["".join(e["choices"][0]["text"] for e in events if e["choices"][0]["index"] == i) for i in range(4)]
        assert texts == [c["text"] for c in r["choices"]]
        assert sorted(e["choices"][0]["index"] for e in events if e["choices"][0]["finish_reason"]) == [0, 1, 2, 3]
        too_long = await client.post("/v1/completions", json={**body, "prompt": ["one", "x " * 5000]})
        assert too_long.status_code == 400 and too_long.json()["error"]["code"] == "context_length_exceeded"
        # more sequences than admission could ever hold at once: a 400, never a 429 that no retry would pass
        too_many = await client.post("/v1/completions", json={**body, "prompt": ["a"] * 49})  # 98 > 32 + 64
        assert too_many.status_code == 400 and too_many.json()["error"]["param"] == "prompt", too_many.text

    run(test)


def test_tokenizer_info_and_tokenize_as_lm_evals_remote_tokenizer_asks() -> None:
    """lm-eval (0.4.13) uses the server's tokenizer when `GET /tokenizer_info` answers with an `eos_token` and
    `/tokenize` takes `{"prompt", "add_special_tokens": false}`: the ids /v1/completions reads."""

    async def test(client: httpx.AsyncClient, fake: FakeEngine, _: Admission) -> None:
        info = (await client.get("/tokenizer_info")).json()
        assert info["eos_token"] == TOKENIZER.eos_token and info["chat_template"] == TOKENIZER.chat_template
        assert info["tokenizer_class"] == type(TOKENIZER).__name__ and info["vocab_size"] == len(TOKENIZER)
        r = await client.post("/tokenize", json={"prompt": "test <|im_end|>", "add_special_tokens": False})
        assert r.json()["tokens"] == TOKENIZER("test <|im_end|>", add_special_tokens=False)["input_ids"]
        chat = {"messages": [{"role": "user", "content": "hi"}], "add_special_tokens": False}
        assert (await client.post("/tokenize", json=chat)).status_code == 200  # vLLM's default for a chat: neutral
        refused = await client.post("/tokenize", json={**chat, "add_special_tokens": True})
        assert refused.status_code == 400 and refused.json()["error"]["type"] == "invalid_request_error"

    run(test)

    async def locked(client: httpx.AsyncClient, fake: FakeEngine, _: Admission) -> None:
        r = await client.get("/tokenizer_info")
        assert r.status_code == 401 and "error" in r.json()  # behind the key, in OpenAI's shape as /tokenize

    run(locked, api_key="secret")


def test_a_model_that_failed_to_load_gets_503s_without_retry_after() -> None:
    """Loading passes, and its 503s say Retry-After (test_seed_api); a load that failed does not: the process
    exits for its supervisor, and no retry here can help."""

    def broken() -> TextGenerator:
        raise RuntimeError("no such weights")

    async def main() -> None:
        runtime = Runtime(broken, "fake-model")
        app = create_app(Settings(), runtime, Admission(Settings().admission_capacity()))
        runtime.start()
        await runtime.wait_ready()
        assert runtime.state == "failed"
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            for r in (await client.get("/health"), await client.post("/generate", json={"prompt": "hi"})):
                assert r.status_code == 503 and "retry-after" not in r.headers, r.headers

    asyncio.run(main())


def test_no_ray_replica_free_in_time_is_a_429_in_each_routes_shape() -> None:
    """The Ray front's engine raises NoReplicaFree when every replica stayed full for its 30 s (another front's
    traffic on them): a 429 with Retry-After, as its own admission gives, where it was a 500."""
    from qwen_api.cluster.client import NoReplicaFree

    async def test(client: httpx.AsyncClient, fake: FakeEngine, _: Admission) -> None:
        async def full(*_: object) -> Any:
            raise NoReplicaFree(30)
            yield  # an async generator, as the engine's

        fake.generate = full  # type: ignore[method-assign]
        chat = {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}]}
        r = await client.post("/v1/chat/completions", json=chat)
        assert (r.status_code, r.headers.get("retry-after"), r.json()["error"]["code"]) == (429, "1", "overloaded")
        r = await client.post("/v1/messages", json={**chat, "max_tokens": 8})
        assert (r.status_code, r.json()["error"]["type"]) == (429, "rate_limit_error")
        r = await client.post("/generate", json={"prompt": "hi"})
        assert r.status_code == 429 and "no engine replica took the request" in r.json()["detail"]

    run(test)


def test_a_body_not_sent_as_json_is_told_to_send_it_so() -> None:
    """`curl -d '{...}'` sends a form-encoded body, which FastAPI does not read as JSON: the error said "Input should
    be a valid dictionary", which does not say what to change. It names the Content-Type, in each route's shape."""

    async def test(client: httpx.AsyncClient, *_: object) -> None:
        chat = {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
        form = {"content-type": "application/x-www-form-urlencoded"}
        wanted = "the body must be JSON sent with 'Content-Type: application/json'"
        r = await client.post("/v1/chat/completions", content=json.dumps(chat), headers=form)
        assert r.status_code == 400 and r.json()["error"]["message"].startswith(wanted)
        assert "'application/x-www-form-urlencoded'" in r.json()["error"]["message"]
        r = await client.post("/v1/messages", content=json.dumps(chat))  # no Content-Type at all
        assert r.status_code == 400 and r.json()["type"] == "error"
        assert r.json()["error"]["message"] == f"{wanted}; it was sent with none"
        r = await client.post("/generate", content=json.dumps({"prompt": "hi"}), headers=form)
        assert r.status_code == 422 and r.json()["detail"][0]["msg"].startswith(wanted)
        r = await client.post("/v1/chat/completions", json=[chat])  # JSON, but no object: told as it was
        assert r.status_code == 400 and "valid dictionary" in r.json()["error"]["message"]

    run(test)


def test_an_empty_response_format_is_refused_as_any_without_a_type() -> None:
    """`response_format: {}` was taken as no format at all (free text) where any other object without a `type` is
    refused, as OpenAI refuses it and as the Responses route refused `text.format: {}`."""

    async def test(client: httpx.AsyncClient, *_: object) -> None:
        chat = {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}], "response_format": {}}
        r = await client.post("/v1/chat/completions", json=chat)
        assert r.status_code == 400 and "unknown response_format type None" in r.json()["error"]["message"]
        r = await client.post("/generate", json={"prompt": "hi", "response_format": {}})
        assert r.status_code == 422 and "unknown response_format type None" in r.text
        r = await client.post("/generate", json={"prompt": "hi", "response_format": None})
        assert r.status_code == 200  # null still means none

    run(test)


def test_an_empty_stop_string_is_a_400_as_in_vllm() -> None:
    """`stop: ""` (or one in a list) was dropped without a word on chat and text completions, where vLLM and our
    own /v1/messages (`stop_sequences`) refuse it."""

    async def test(client: httpx.AsyncClient, *_: object) -> None:
        chat = {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}]}
        for route, body in (
            ("/v1/chat/completions", chat),
            ("/v1/completions", {"model": "fake-model", "prompt": "hi"}),
        ):
            for stop in ("", ["x", ""]):
                r = await client.post(route, json={**body, "stop": stop})
                assert r.status_code == 400 and r.json()["error"]["param"] == "stop", (route, stop, r.text)
                assert "stop cannot contain an empty string" in r.json()["error"]["message"]
        r = await client.post("/v1/chat/completions", json={**chat, "stop": ["x"]})
        assert r.status_code == 200

    run(test)
