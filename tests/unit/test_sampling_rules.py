"""The shared sampling rules (engine/sampling.py) against independent implementations, and how every dialect turns
a request into engine parameters: the model's defaults, the new controls, their 4xx errors and response shapes.

The arithmetic is compared with transformers' own logits processors and a NumPy log-softmax; the HTTP layer runs
in-process over the fake engine, which scripts its log-probabilities.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import numpy as np
import pytest
import torch

from qwen_api.admission import Admission
from qwen_api.api.app import create_app, observe_with
from qwen_api.dev.fake_engine import FakeEngine
from qwen_api.dev.random_qwen2 import build_qwen2_tokenizer
from qwen_api.engine.base import SamplingParams
from qwen_api.engine.sampling import LogitControls, min_p_filter, token_logprobs
from qwen_api.runtime import Runtime
from qwen_api.settings import Settings
from qwen_api.textgen import TextGenerator

TOKENIZER = build_qwen2_tokenizer()
ANSWER = "Paris is the capital of France."
QWEN2_DEFAULTS = {"temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.05}


# ----------------------------------------------------------------------------------------------- arithmetic
def test_repetition_penalty_matches_transformers() -> None:
    from transformers import RepetitionPenaltyLogitsProcessor

    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(64, generator=generator) * 3
    prompt, generated = [1, 5, 5, 9], [9, 12, 40]
    controls = LogitControls(SamplingParams(max_new_tokens=1, repetition_penalty=1.3), prompt)
    for token in generated:
        controls.accept(token)
    ours = logits.clone()
    controls.apply(ours)
    theirs = RepetitionPenaltyLogitsProcessor(1.3)(torch.tensor([prompt + generated]), logits.clone()[None])[0]
    torch.testing.assert_close(ours, theirs)


def test_frequency_presence_and_bias_follow_openais_formula() -> None:
    logits = np.linspace(-2.0, 2.0, 32)
    generated = [3, 3, 3, 7, 30]
    bias = ((7, 5.0), (0, -100.0))
    params = SamplingParams(max_new_tokens=1, frequency_penalty=0.5, presence_penalty=0.25, logit_bias=bias)
    controls = LogitControls(params, prompt_ids=[3, 4])  # prompt tokens do not count for these two penalties
    for token in generated:
        controls.accept(token)
    row = torch.tensor(logits, dtype=torch.float32)
    controls.apply(row)
    expected = logits.copy()
    for token, value in bias:
        expected[token] += value
    for token in set(generated):
        count = generated.count(token)
        expected[token] -= count * 0.5 + 0.25
    np.testing.assert_allclose(row.numpy(), expected, rtol=1e-6)
    assert not LogitControls.needed(SamplingParams(max_new_tokens=1))


def test_a_bias_past_the_models_row_is_dropped_not_indexed() -> None:
    """The API checks ids against the tokenizer; a model's logits row may be narrower, and an engine's worker must
    never index past it (that would stop the engine for every sequence)."""
    params = SamplingParams(max_new_tokens=1, logit_bias=((3, 1.0), (40, 5.0)), repetition_penalty=2.0)
    controls = LogitControls(params, prompt_ids=[2, 50])
    row = torch.ones(32)
    controls.apply(row)
    expected = torch.ones(32)
    expected[3] += 1.0
    expected[2] /= 2.0
    torch.testing.assert_close(row, expected)


def test_native_batch_controls_equal_the_per_row_rules() -> None:
    """The native engine applies allowed ids, bias and penalties to a whole step at once (engine/native/controls.py):
    over several steps, with rows joining, leaving and coming back, every row equals `LogitControls` on that row."""
    from qwen_api.engine.native.controls import BatchControls
    from qwen_api.engine.native.scheduler import Sequence

    vocab = 48
    kinds = [
        SamplingParams(max_new_tokens=9, repetition_penalty=1.3),
        SamplingParams(max_new_tokens=9, frequency_penalty=0.7, presence_penalty=-0.4),
        SamplingParams(
            max_new_tokens=9, logit_bias=((3, 5.0), (60, 1.0)), repetition_penalty=0.8, allowed_ids=(3, 4, 20, 60)
        ),  # allowed_token_ids: 60 is past the row, dropped; the others -inf, whatever the penalties do
        SamplingParams(max_new_tokens=9, logit_bias=((7, -100.0),), frequency_penalty=-1.5, presence_penalty=2.0),
    ]
    generator = torch.Generator().manual_seed(3)
    seqs = [Sequence(torch.randint(0, vocab, (6,), generator=generator).tolist(), 6, k) for k in kinds]
    reference = [LogitControls(s.params, s.tokens) for s in seqs]
    batch = BatchControls(slots=3, vocab=vocab, device=torch.device("cpu"), capacity=16)
    for step in range(8):
        # three of four in the batch at a time; the one left out returns later and must pick up its counts
        live = [i for i in range(4) if i != step % 4]
        batch.retain([seqs[i] for i in live])
        logits = torch.randn(len(live) + 1, vocab, generator=generator) * 4  # row 0: a sequence with no controls
        expected = logits.clone()
        for row, i in enumerate(live, start=1):
            reference[i].apply(expected[row])
        applied = batch.apply(logits, list(range(1, len(live) + 1)), [seqs[i] for i in live])
        torch.testing.assert_close(logits, expected, rtol=0, atol=0)
        if 2 in live:  # the row with allowed ids: nothing else is finite
            row = live.index(2) + 1
            assert torch.isfinite(logits[row]).nonzero().flatten().tolist() == [3, 4, 20]
        tokens = torch.randint(0, vocab, (len(live),), generator=generator)
        tokens[0] = seqs[live[0]].tokens[-1]  # a repeat, so counts above 1 occur
        batch.accept(applied, tokens)
        for i, token in zip(live, tokens.tolist(), strict=True):
            reference[i].accept(token)
            seqs[i].tokens.append(token)


def test_min_tokens_holds_back_end_and_stop_tokens_unless_nothing_else_is_left() -> None:
    """vLLM's min_tokens (engine/sampler.hold_back, every engine's last act before the draw): under it, a row's end
    tokens and its stop tokens are -inf; past it, nothing is held; a row a grammar has left only its end keeps it."""
    from qwen_api.engine.sampler import Row, hold_back

    ends = {5, 9}
    under = SamplingParams(max_new_tokens=9, min_tokens=3, held_ids=(2, 500))  # 500: past the row, dropped
    rows = [Row(under, 0), Row(under, 2), Row(under, 3), Row(SamplingParams(max_new_tokens=9), 0), Row(under, 1)]
    logits = torch.randn(5, 12)
    logits[4] = float("-inf")  # a grammar that allows only the end token 9
    logits[4, 9] = 1.5
    expected = logits.clone()
    expected[0, [2, 5, 9]] = expected[1, [2, 5, 9]] = float("-inf")
    hold_back(logits, rows, ends)
    torch.testing.assert_close(logits, expected, rtol=0, atol=0)  # rows 2 and 3 untouched, row 4 too
    hold_back(logits, [], ends)  # an empty step


def test_min_p_matches_transformers() -> None:
    from transformers import MinPLogitsWarper

    generator = torch.Generator().manual_seed(1)
    scores = torch.randn(3, 100, generator=generator) * 2
    ours = min_p_filter(scores.clone(), torch.tensor([0.1, 0.1, 0.1]))
    theirs = MinPLogitsWarper(0.1)(torch.zeros(3, 1, dtype=torch.long), scores.clone())
    assert torch.equal(torch.isinf(ours), torch.isinf(theirs))
    assert torch.equal(min_p_filter(scores, torch.zeros(3)), scores)  # 0 turns it off


def test_token_logprobs_are_a_log_softmax() -> None:
    logits = torch.tensor([[1.0, 2.0, 3.0, 0.5], [0.0, 0.0, 0.0, 10.0]])
    entries = token_logprobs(logits, [0, 3], [2, 0])
    reference = logits.double().numpy()
    reference = reference - np.log(np.exp(reference).sum(-1, keepdims=True))
    assert entries[0].logprob == pytest.approx(reference[0, 0])
    assert [t for t, _ in entries[0].top] == [2, 1]
    assert [lp for _, lp in entries[0].top] == pytest.approx(reference[0, [2, 1]].tolist())
    assert entries[1].top == () and entries[1].logprob == pytest.approx(reference[1, 3], abs=1e-6)  # float32
    assert [e.rank for e in entries] == [3, 1]  # token 0 is third of row 0; token 3 first of row 1
    # ranks count the decodable ids at least as likely (vLLM's count): ties share the lower place, and an id past
    # the decodable ones (a padding row) still counts itself
    ranked = token_logprobs(torch.tensor([[1.0, 1.0, 0.0, 5.0]]).repeat(3, 1), [0, 1, 3], [1, 1, 1], decodable=3)
    assert [e.rank for e in ranked] == [2, 2, 1] and [e.top[0][0] for e in ranked] == [0, 0, 0]


# ----------------------------------------------------------------------------------------------- HTTP on a fake
def serve(
    test: Callable[[httpx.AsyncClient, FakeEngine], Awaitable[None]], defaults: dict[str, float] | None = None
) -> None:
    fake = FakeEngine(TOKENIZER(ANSWER, add_special_tokens=False)["input_ids"])

    async def main() -> None:
        runtime = Runtime(lambda: TextGenerator(fake, TOKENIZER, sampling_defaults=defaults), "fake-model")
        settings = Settings()
        app = create_app(settings, runtime, Admission(settings.admission_capacity()))
        runtime.connect(on_ready=observe_with(app.state.metrics))
        runtime.start()
        await runtime.wait_ready()
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            await test(client, fake)
        await runtime.close()

    asyncio.run(main())


CHAT = {"model": "fake-model", "messages": [{"role": "user", "content": "Capital of France?"}]}


def _sampled(params: SamplingParams) -> tuple[float, float, int, float]:
    return params.temperature, params.top_p, params.top_k, params.repetition_penalty


def test_v1_fields_left_out_take_the_models_defaults_and_generate_keeps_the_specs() -> None:
    async def test(client: httpx.AsyncClient, fake: FakeEngine) -> None:
        assert (await client.post("/v1/chat/completions", json=CHAT)).status_code == 200
        assert _sampled(fake.calls[-1][1]) == (0.7, 0.8, 20, 1.05)
        sent = {**CHAT, "temperature": 0.2, "top_p": None, "repetition_penalty": 1.0}  # null means "not given"
        assert (await client.post("/v1/chat/completions", json=sent)).status_code == 200
        assert _sampled(fake.calls[-1][1]) == (0.2, 0.8, 20, 1.0)
        text = {"model": "fake-model", "prompt": "Capital of France?"}
        assert (await client.post("/v1/completions", json=text)).status_code == 200
        assert _sampled(fake.calls[-1][1]) == (0.7, 0.8, 20, 1.05)
        r = await client.post("/v1/responses", json={"model": "fake-model", "input": "Hi"})
        assert _sampled(fake.calls[-1][1]) == (0.7, 0.8, 20, 1.05)
        assert (r.json()["temperature"], r.json()["top_p"]) == (0.7, 0.8)  # the effective values are echoed
        anthropic = {"model": "fake-model", "max_tokens": 8, "messages": [{"role": "user", "content": "Hi"}]}
        assert (await client.post("/v1/messages", json={**anthropic, "top_k": 5})).status_code == 200
        assert _sampled(fake.calls[-1][1]) == (0.7, 0.8, 5, 1.05)
        assert (await client.post("/generate", json={"prompt": "Hi"})).status_code == 200
        assert _sampled(fake.calls[-1][1]) == (0.7, 0.9, 50, 1.0)  # the specification's defaults, always

    serve(test, QWEN2_DEFAULTS)


def test_without_model_defaults_openais_apply() -> None:
    async def test(client: httpx.AsyncClient, fake: FakeEngine) -> None:
        assert (await client.post("/v1/chat/completions", json=CHAT)).status_code == 200
        params = fake.calls[-1][1]
        assert _sampled(params) == (1.0, 1.0, 0, 1.0)
        assert (params.min_p, params.presence_penalty, params.frequency_penalty, params.logprobs) == (0, 0, 0, None)

    serve(test)


def test_new_controls_reach_the_engine() -> None:
    async def test(client: httpx.AsyncClient, fake: FakeEngine) -> None:
        body = {
            **CHAT,
            "presence_penalty": 0.5,
            "frequency_penalty": -1.5,
            "repetition_penalty": 1.2,
            "min_p": 0.05,
            "logit_bias": {"15": 3.5, "200": -100},
            "logprobs": True,
            "top_logprobs": 4,
        }
        assert (await client.post("/v1/chat/completions", json=body)).status_code == 200
        params = fake.calls[-1][1]
        assert (params.presence_penalty, params.frequency_penalty, params.repetition_penalty) == (0.5, -1.5, 1.2)
        assert (params.min_p, params.logit_bias, params.logprobs) == (0.05, ((15, 3.5), (200, -100.0)), 4)
        assert (await client.post("/v1/chat/completions", json={**CHAT, "logprobs": True})).status_code == 200
        assert fake.calls[-1][1].logprobs == 0
        completion = {"model": "fake-model", "prompt": "Hi", "logprobs": 2}
        assert (await client.post("/v1/completions", json=completion)).status_code == 200
        assert fake.calls[-1][1].logprobs == 2

    serve(test)


@pytest.mark.parametrize(
    ("route", "fields", "param"),
    [
        ("chat", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ("chat", {"top_logprobs": 2}, "top_logprobs"),
        ("chat", {"logprobs": 1}, "logprobs"),
        ("text", {"logprobs": 6}, "logprobs"),
        ("text", {"logprobs": -1}, "logprobs"),
        ("chat", {"presence_penalty": 2.5}, "presence_penalty"),
        ("chat", {"frequency_penalty": -2.01}, "frequency_penalty"),
        ("chat", {"repetition_penalty": 0}, "repetition_penalty"),
        ("chat", {"min_p": 1.5}, "min_p"),
        ("text", {"logit_bias": {"12": 101}}, "logit_bias"),
        ("chat", {"logit_bias": {"twelve": 1}}, "logit_bias"),
        ("chat", {"logit_bias": {"-3": 1}}, "logit_bias"),
        ("chat", {"logit_bias": {str(10**9): 1}}, "logit_bias"),
    ],
)
def test_out_of_range_controls_are_openai_shaped_400s(route: str, fields: dict[str, Any], param: str) -> None:
    async def test(client: httpx.AsyncClient, fake: FakeEngine) -> None:
        if route == "chat":
            r = await client.post("/v1/chat/completions", json={**CHAT, **fields})
        else:
            r = await client.post("/v1/completions", json={"model": "fake-model", "prompt": "Hi", **fields})
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["type"] == "invalid_request_error"
        assert error["param"] == param, error
        assert not fake.calls

    serve(test)


def test_logprobs_in_chat_shape_plain_and_streamed() -> None:
    async def test(client: httpx.AsyncClient, fake: FakeEngine) -> None:
        body = {**CHAT, "logprobs": True, "top_logprobs": 2}
        plain = (await client.post("/v1/chat/completions", json=body)).json()
        content = plain["choices"][0]["logprobs"]["content"]
        assert len(content) == plain["usage"]["completion_tokens"] == len(fake.script)
        assert "".join(e["token"] for e in content) == ANSWER
        assert b"".join(bytes(e["bytes"]) for e in content) == ANSWER.encode()
        assert [e["logprob"] for e in content] == [-(i + 1) / 8 for i in range(len(content))]
        assert [len(e["top_logprobs"]) for e in content] == [2] * len(content)
        assert content[0]["top_logprobs"][0] == {k: content[0][k] for k in ("token", "logprob", "bytes")}
        streamed: list[dict[str, Any]] = []
        async with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
            async for line in r.aiter_lines():
                if line.startswith("data: {"):
                    import json

                    choice = json.loads(line[6:])["choices"][0]
                    streamed += (choice["logprobs"] or {}).get("content") or []
        assert streamed == content

    serve(test)


def test_logprobs_in_the_legacy_completions_shape() -> None:
    async def test(client: httpx.AsyncClient, fake: FakeEngine) -> None:
        body = {"model": "fake-model", "prompt": "Capital of France?", "logprobs": 1, "max_tokens": 4}
        choice = (await client.post("/v1/completions", json=body)).json()["choices"][0]
        logprobs = choice["logprobs"]
        assert "".join(logprobs["tokens"]) == choice["text"]
        assert logprobs["token_logprobs"] == [-0.125, -0.25, -0.375, -0.5]
        assert logprobs["text_offset"] == [sum(len(t) for t in logprobs["tokens"][:i]) for i in range(4)]
        assert [list(top.values()) for top in logprobs["top_logprobs"]] == [[-0.125], [-0.25], [-0.375], [-0.5]]
        plain = (await client.post("/v1/completions", json={**body, "logprobs": None})).json()["choices"][0]
        assert plain["logprobs"] is None

    serve(test)


def test_a_stop_string_keeps_logprobs_and_usage_exact() -> None:
    async def test(client: httpx.AsyncClient, fake: FakeEngine) -> None:
        body = {**CHAT, "logprobs": True, "stop": ["capital"]}
        plain = (await client.post("/v1/chat/completions", json=body)).json()
        assert plain["choices"][0]["message"]["content"] == "Paris is the "
        content = plain["choices"][0]["logprobs"]["content"]
        assert len(content) == plain["usage"]["completion_tokens"]  # every token generated, the stop's too
        assert "".join(e["token"] for e in content).startswith("Paris is the capital")

    serve(test)


def test_bad_words_as_vllm_builds_and_applies_them() -> None:
    """vLLM's bad_words: each word's tokens without a leading space, and with one where that starts with another
    token and has as many; a one-token word is banned everywhere, a longer one only where the answer's last tokens
    are its tokens but the last."""
    from qwen_api.engine.bad_words import BadWords, bad_word_tokens

    vocab = {"foo bar": [1, 2], " foo bar": [3, 2], "x": [9], " x": [9], "baz": [4, 5], " baz": [6], "": []}
    banned = bad_word_tokens([" foo bar", "x", "baz", "  "], lambda text: vocab[text])
    assert banned == ((1, 2), (3, 2), (9,), (4, 5))  # " baz" is one token where "baz" is two: not a variant
    matcher = BadWords(banned).matcher()
    assert matcher.banned() == [9] and matcher.allowed(12).tolist() == [i != 9 for i in range(12)]
    for token in (7, 1):
        matcher.advance(token)
    assert sorted(matcher.banned()) == [2, 9]  # after 1: "foo bar" would be complete
    matcher.advance(2)
    assert matcher.banned() == [9] and matcher.failure() is None
