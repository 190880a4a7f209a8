"""Log-probabilities, logit bias and penalties through the official `openai` SDK, on every engine's live server."""

from __future__ import annotations

import openai

from conftest import InProcessServer, sdk

QUESTION = [{"role": "user", "content": "Name three colours."}]


def client(server: InProcessServer) -> openai.OpenAI:
    return sdk(openai.OpenAI, base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0, timeout=120)


def name(server: InProcessServer) -> str:
    return server.runtime.model_name


def test_chat_logprobs_plain_and_streamed_agree_with_usage(api_server: InProcessServer) -> None:
    api = client(api_server)
    kwargs = {"model": name(api_server), "messages": QUESTION, "temperature": 0, "max_tokens": 8}
    plain = api.chat.completions.create(**kwargs, logprobs=True, top_logprobs=3)  # type: ignore[call-overload]
    [choice] = plain.choices
    assert choice.logprobs is not None and choice.logprobs.content is not None
    content = choice.logprobs.content
    assert plain.usage is not None and len(content) == plain.usage.completion_tokens
    for entry in content:
        assert len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[-1].logprob
        assert entry.logprob <= 0 and entry.bytes is not None
        assert entry.top_logprobs[0].token == entry.token  # greedy: the chosen token is the most likely
    if choice.finish_reason == "length":  # every token's text is in the content (no end-of-turn token)
        assert b"".join(bytes(e.bytes or []) for e in content).decode() == choice.message.content
    stream = api.chat.completions.create(**kwargs, logprobs=True, top_logprobs=3, stream=True)  # type: ignore[call-overload]
    streamed = [
        e for chunk in stream for c in chunk.choices if c.logprobs and c.logprobs.content for e in c.logprobs.content
    ]
    assert [e.token for e in streamed] == [e.token for e in content]
    assert [round(e.logprob, 3) for e in streamed] == [round(e.logprob, 3) for e in content]
    without = api.chat.completions.create(**kwargs)  # type: ignore[call-overload]
    assert without.choices[0].logprobs is None
    assert without.choices[0].message.content == choice.message.content  # asking for logprobs changes no token


def test_completions_logprobs_in_the_legacy_shape(api_server: InProcessServer) -> None:
    r = client(api_server).completions.create(
        model=name(api_server),
        prompt="The colour of the sky is",
        max_tokens=6,
        temperature=0,
        logprobs=2,
        stop=["\n\n"],
    )
    [choice] = r.choices
    logprobs = choice.logprobs
    assert logprobs is not None and logprobs.tokens is not None and logprobs.top_logprobs is not None
    assert r.usage is not None and len(logprobs.tokens) == r.usage.completion_tokens
    assert all(len(top) <= 2 for top in logprobs.top_logprobs)
    assert logprobs.text_offset is not None and logprobs.text_offset[0] == 0


def test_logit_bias_forces_a_token(api_server: InProcessServer) -> None:
    generator = api_server.runtime.generator()
    token = generator.content_ids(" banana")[0]
    r = client(api_server).chat.completions.create(
        model=name(api_server), messages=QUESTION, temperature=0, max_tokens=4, logit_bias={str(token): 100}
    )
    assert r.choices[0].message.content == generator.tokenizer.decode([token]) * 4


def test_a_seed_reproduces_with_every_control_on(api_server: InProcessServer) -> None:
    api = client(api_server)
    extra = {"top_k": 30, "min_p": 0.02, "repetition_penalty": 1.1}
    kwargs = {
        "model": name(api_server),
        "messages": QUESTION,
        "max_tokens": 12,
        "temperature": 0.9,
        "seed": 77,
        "presence_penalty": 0.4,
        "frequency_penalty": 0.4,
        "logprobs": True,
        "top_logprobs": 2,
        "extra_body": extra,
    }
    first = api.chat.completions.create(**kwargs)  # type: ignore[call-overload]
    again = api.chat.completions.create(**kwargs)  # type: ignore[call-overload]
    assert first.choices[0].message.content == again.choices[0].message.content
