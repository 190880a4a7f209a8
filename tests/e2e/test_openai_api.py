"""The official `openai` package, unmodified, against live servers: chat, completions, streaming, n, stop, seed."""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest

from conftest import SCRIPT, InProcessServer, sdk

STOP = "<<STOP>>"
BEFORE_STOP = SCRIPT[: SCRIPT.index(STOP)]


def client(server: InProcessServer) -> openai.OpenAI:
    return sdk(openai.OpenAI, base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0, timeout=120)


def aclient(server: InProcessServer) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0, timeout=120)


def model_name(server: InProcessServer) -> str:
    return server.runtime.model_name


def chat_prompt_tokens(server: InProcessServer, content: str) -> int:
    return len(server.runtime.generator().chat_prompt_ids([{"role": "user", "content": content}]))


def script_tokens(server: InProcessServer, text: str = SCRIPT) -> int:
    return len(server.runtime.generator().text_prompt_ids(text))


def test_models_list(scripted_server: InProcessServer) -> None:
    models = client(scripted_server).models.list()
    assert [m.id for m in models.data] == [model_name(scripted_server)]
    assert models.data[0].object == "model"


def test_chat_completion_with_exact_usage(scripted_server: InProcessServer) -> None:
    r = client(scripted_server).chat.completions.create(
        model=model_name(scripted_server), messages=[{"role": "user", "content": "Hi"}], temperature=0
    )
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    [choice] = r.choices
    assert choice.message.role == "assistant" and choice.message.content == SCRIPT
    assert choice.finish_reason == "stop"
    assert r.usage is not None
    assert r.usage.prompt_tokens == chat_prompt_tokens(scripted_server, "Hi")
    assert r.usage.completion_tokens == script_tokens(scripted_server) + 1  # and <|im_end|>
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_chat_system_message_reaches_the_template(api_server: InProcessServer) -> None:
    generator = api_server.runtime.generator()
    ids = generator.chat_prompt_ids([{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi"}])
    assert generator.tokenizer.decode(ids).startswith("<|im_start|>system\nBe terse.<|im_end|>")
    r = client(api_server).chat.completions.create(
        model=model_name(api_server),
        messages=[{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi"}],
        max_tokens=2,
    )
    assert r.usage is not None and r.usage.prompt_tokens == len(ids)


def test_chat_stream_with_usage(scripted_server: InProcessServer) -> None:
    stream = client(scripted_server).chat.completions.create(
        model=model_name(scripted_server),
        messages=[{"role": "user", "content": "Hi"}],
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    content = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert len([x for x in content if x]) > 5 and all("\ufffd" not in x for x in content)
    assert "".join(content) == SCRIPT
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == script_tokens(scripted_server) + 1
    assert all(c.usage is None for c in chunks[:-1])


def test_stop_string_spanning_tokens_never_leaks(scripted_server: InProcessServer) -> None:
    assert script_tokens(scripted_server, STOP) > 1  # the premise: the stop string spans several tokens
    c = client(scripted_server)
    r = c.chat.completions.create(
        model=model_name(scripted_server), messages=[{"role": "user", "content": "Hi"}], temperature=0, stop=[STOP]
    )
    assert r.choices[0].message.content == BEFORE_STOP and r.choices[0].finish_reason == "stop"
    stream = c.chat.completions.create(
        model=model_name(scripted_server),
        messages=[{"role": "user", "content": "Hi"}],
        temperature=0,
        stop=STOP,
        stream=True,
    )
    pieces = [ch.choices[0].delta.content or "" for ch in stream if ch.choices]
    assert "".join(pieces) == BEFORE_STOP
    assert not any("<" in p for p in pieces)


def test_max_tokens_finishes_with_length(scripted_server: InProcessServer) -> None:
    r = client(scripted_server).chat.completions.create(
        model=model_name(scripted_server), messages=[{"role": "user", "content": "Hi"}], temperature=0, max_tokens=3
    )
    assert r.choices[0].finish_reason == "length"
    assert r.usage is not None and r.usage.completion_tokens == 3
    assert SCRIPT.startswith(r.choices[0].message.content or "-")


def test_n_choices(api_server: InProcessServer) -> None:
    r = client(api_server).chat.completions.create(
        model=model_name(api_server),
        messages=[{"role": "user", "content": "Invent a word and say what it means."}],
        n=3,
        max_tokens=8,
        temperature=1.3,  # the demo model answers "Hi" with two or three texts only: spread the distribution
    )
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert len({c.message.content for c in r.choices}) == 3
    assert all(c.finish_reason in ("stop", "length") for c in r.choices)
    assert r.usage is not None and 3 <= r.usage.completion_tokens <= 3 * 8  # exact counts: the scripted tests


def test_text_completion_has_no_chat_template(scripted_server: InProcessServer) -> None:
    # The scripted model continues any text ending in "\n" with the script: a raw prompt reaches it unchanged.
    prompt = "Raw text, no template\n"
    r = client(scripted_server).completions.create(
        model=model_name(scripted_server), prompt=prompt, max_tokens=100, temperature=0
    )
    assert r.object == "text_completion" and r.id.startswith("cmpl-")
    assert r.choices[0].text == SCRIPT and r.choices[0].finish_reason == "stop"
    assert r.usage is not None and r.usage.prompt_tokens == script_tokens(scripted_server, prompt)
    pieces = [
        c.choices[0].text
        for c in client(scripted_server).completions.create(
            model=model_name(scripted_server), prompt=prompt, max_tokens=100, temperature=0, stream=True, stop=["42"]
        )
    ]
    assert "".join(pieces) == SCRIPT[: SCRIPT.index("42")]


def test_async_client_streams_concurrently(scripted_server: InProcessServer) -> None:
    async def one(c: openai.AsyncOpenAI) -> str:
        stream = await c.chat.completions.create(
            model=model_name(scripted_server),
            messages=[{"role": "user", "content": "Hi"}],
            temperature=0,
            stream=True,
        )
        return "".join([ch.choices[0].delta.content or "" async for ch in stream if ch.choices])

    async def main() -> list[str]:
        async with aclient(scripted_server) as c:
            return await asyncio.gather(*[one(c) for _ in range(4)])

    assert asyncio.run(main()) == [SCRIPT] * 4


def test_seed_gives_the_same_text_beside_other_traffic(api_server: InProcessServer) -> None:
    async def sample(c: openai.AsyncOpenAI, seed: int | None) -> str:
        r = await c.chat.completions.create(
            model=model_name(api_server),
            messages=[{"role": "user", "content": "Tell me something."}],
            temperature=1.0,
            max_tokens=16,
            seed=seed,
            # Not the tiny model's generation-config top-k 20 and top-p 0.8: its random weights give a near-uniform
            # distribution, where the 20th and 21st tokens tie to the last bit and bf16 rounding that differs with
            # the batch's shape decides which one stays in.
            top_p=1.0,
            extra_body={"top_k": 0},
        )
        return r.choices[0].message.content or ""

    async def main() -> tuple[list[str], list[str]]:
        async with aclient(api_server) as c:
            alone = [await sample(c, 1234)]
            crowded = await asyncio.gather(sample(c, 1234), sample(c, None), sample(c, 1234), sample(c, 99))
            return alone, list(crowded)

    alone, crowded = asyncio.run(main())
    assert crowded[0] == alone[0] and crowded[2] == alone[0]
    assert crowded[3] != alone[0]  # another seed, another sample


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"frequency_penalty": -3.0}, "frequency_penalty"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"logit_bias": {"1": 101}}, "logit_bias"),
        ({"logit_bias": {"999999999": 1}}, "logit_bias"),
        ({"logit_bias": {"9" * 5000: 1}}, "logit_bias"),  # past int()'s 4,300 digits: was a 500
        ({"extra_body": {"min_p": 2}}, "min_p"),
        ({"extra_body": {"repetition_penalty": -1}}, "repetition_penalty"),
        ({"n": 99}, "n"),
        ({"max_tokens": 999_999}, "max_tokens"),
        ({"temperature": 3.0}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"stop": ["a"] * 20}, None),
        ({"extra_body": {"frobnicate": True}}, "frobnicate"),
    ],
)
def test_unsupported_or_invalid_parameters_are_400_naming_them(
    tiny_server: InProcessServer, kwargs: dict, param: str | None
) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client(tiny_server).chat.completions.create(
            model=model_name(tiny_server), messages=[{"role": "user", "content": "Hi"}], **kwargs
        )
    error = info.value.body
    assert isinstance(error, dict) and set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["message"]
    if param is not None:
        assert param in (error["param"] or "") or param in error["message"]


def test_unknown_model_is_404_in_openai_shape(api_server: InProcessServer) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        client(api_server).chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "Hi"}])
    assert isinstance(info.value.body, dict) and info.value.body["code"] == "model_not_found"


def test_prompt_beyond_context_is_400_context_length_exceeded(api_server: InProcessServer) -> None:
    r = httpx.post(
        f"{api_server.base_url}/v1/completions",
        json={"model": model_name(api_server), "prompt": "hello " * 40000, "max_tokens": 10},
        timeout=60,
    )
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["code"] == "context_length_exceeded" and error["param"] == "prompt"
    assert "10 new tokens" in error["message"]
