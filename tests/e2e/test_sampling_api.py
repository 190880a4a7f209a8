"""Log-probabilities, logit bias and penalties through the official `openai` SDK, on every engine's live server."""

from __future__ import annotations

import concurrent.futures
import json

import openai
import pytest

from qwen_api.engine.bad_words import bad_word_tokens
from qwen_api.engine.transformers_engine import TransformersEngine

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


def test_responses_logprobs_as_chat_gives_them_plain_and_streamed(api_server: InProcessServer) -> None:
    """The Responses API's `include: ["message.output_text.logprobs"]` with `top_logprobs`: the output text carries
    the entries chat completions gives for the same greedy answer, and a stream's text deltas carry them in turn;
    `top_logprobs` without that include, or another include, is a 400."""
    api, model = client(api_server), name(api_server)
    include = ["message.output_text.logprobs"]
    args = {"model": model, "input": QUESTION[0]["content"], "temperature": 0, "max_output_tokens": 6}
    r = api.responses.create(**args, include=include, top_logprobs=2)  # type: ignore[arg-type]
    part = r.output[0].content[0]
    assert part.type == "output_text" and part.logprobs is not None and r.usage is not None
    assert len(part.logprobs) == r.usage.output_tokens and r.top_logprobs == 2
    chat = api.chat.completions.create(
        model=model, messages=QUESTION, temperature=0, max_tokens=6, logprobs=True, top_logprobs=2
    )
    expected = chat.choices[0].logprobs.content
    assert [(e.token, e.bytes) for e in part.logprobs] == [(e.token, e.bytes) for e in expected]
    assert [e.logprob for e in part.logprobs] == pytest.approx([e.logprob for e in expected], abs=1e-4)
    assert all(len(e.top_logprobs) == 2 for e in part.logprobs)
    events = list(api.responses.create(**args, include=include, top_logprobs=2, stream=True))  # type: ignore[arg-type]
    deltas = [e for ev in events if ev.type == "response.output_text.delta" for e in ev.logprobs]
    done = next(ev for ev in events if ev.type == "response.output_text.done")
    assert [e.token for e in done.logprobs] == [e.token for e in part.logprobs]
    assert [e.token for e in deltas] == [e.token for e in part.logprobs][: len(deltas)] and deltas
    # an answer that ends on its own: the end of turn's entry, which has no text, comes in a delta of its own
    boolean = {"format": {"type": "json_schema", "name": "b", "schema": {"type": "boolean"}, "strict": True}}
    ended = list(api.responses.create(**args, include=include, text=boolean, stream=True))  # type: ignore[arg-type]
    streamed = [e.token for ev in ended if ev.type == "response.output_text.delta" for e in ev.logprobs]
    final = next(ev for ev in ended if ev.type == "response.completed").response
    assert streamed == [e.token for e in final.output[0].content[0].logprobs]
    assert final.usage is not None and len(streamed) == final.usage.output_tokens
    assert api.responses.create(**args).output[0].content[0].logprobs == []
    for bad, param in (
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"include": ["reasoning.encrypted_content"]}, "include"),
    ):
        with pytest.raises(openai.BadRequestError) as info:
            api.responses.create(**args, **bad)  # type: ignore[arg-type]
        assert info.value.body["param"] == param


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


def test_text_offsets_count_whole_characters_streamed_or_not(api_server: InProcessServer) -> None:
    """Tokens that each hold part of a character (forced here: the three bytes of "一" for nine tokens) move
    `text_offset` only once the character is whole: never past the text's end nor back, and the stream's offsets
    are the plain answer's (they once counted U+FFFD per token, then jumped back by the chunk's real text)."""
    generator = api_server.runtime.generator()
    by_bytes = {generator.token_bytes(t): t for t in range(generator.vocab_size)}
    parts = [by_bytes[bytes([b])] for b in "一".encode()]  # a byte-level vocabulary has a token for each byte
    args = {"model": name(api_server), "prompt": "x", "max_tokens": 9, "temperature": 1.0, "seed": 0, "logprobs": 1}
    args["logit_bias"] = {str(t): 100 for t in parts}
    plain = client(api_server).completions.create(**args).choices[0]
    streamed = list(client(api_server).completions.create(**args, stream=True))
    offsets = [o for c in streamed for o in (c.choices[0].logprobs.text_offset if c.choices[0].logprobs else [])]
    assert plain.logprobs is not None and offsets == plain.logprobs.text_offset and len(offsets) == 9
    assert offsets == sorted(offsets) and offsets[-1] <= len(plain.text)
    assert "".join(c.choices[0].text for c in streamed) == plain.text


def test_a_token_given_twice_in_logit_bias_is_a_400(api_server: InProcessServer) -> None:
    """ "5" and "05" are one token: their biases would add up past the ±100 that one may have."""
    with pytest.raises(openai.BadRequestError) as info:
        client(api_server).chat.completions.create(
            model=name(api_server), messages=QUESTION, max_tokens=2, logit_bias={"5": 100, "05": 100}
        )
    assert info.value.body["param"] == "logit_bias" and "more than once" in info.value.body["message"]


def test_logit_bias_forces_a_token(api_server: InProcessServer) -> None:
    generator = api_server.runtime.generator()
    token = generator.content_ids(" banana")[0]
    r = client(api_server).chat.completions.create(
        model=name(api_server), messages=QUESTION, temperature=0, max_tokens=4, logit_bias={str(token): 100}
    )
    assert r.choices[0].message.content == generator.tokenizer.decode([token]) * 4


def test_vllm_stop_token_ids_and_include_stop_str_in_output(api_server: InProcessServer) -> None:
    """vLLM's stop controls, as its clients send them in extra_body: a stop token ends the answer without its own
    text, and `include_stop_str_in_output` keeps the stop string or stop token that ended it (vLLM's detokenizer
    leaves the stop-terminating token out unless asked); the choice's `stop_reason` names the stop string or the
    stop token's id; streamed as plain, the count ending at the token that stopped it."""
    generator = api_server.runtime.generator()
    token = generator.content_ids(" banana")[0]
    word = generator.tokenizer.decode([token])
    api = client(api_server)
    forced = {"model": name(api_server), "messages": QUESTION, "temperature": 0, "max_tokens": 6}
    forced["logit_bias"] = {str(token): 100}
    stop = "ana" + word[:2]  # "ana b": across the first two tokens
    cut = (word * 2).index(stop)
    cases = [
        ({"stop_token_ids": [token]}, "", 1, token),
        ({"stop_token_ids": [token], "include_stop_str_in_output": True}, word, 1, token),
        ({"stop": [stop]}, (word * 2)[:cut], 2, stop),
        ({"stop": [stop], "include_stop_str_in_output": True}, (word * 2)[: cut + len(stop)], 2, stop),
        ({}, word * 6, 6, None),
    ]
    for extra, text, tokens, reason in cases:
        plain = api.chat.completions.create(**forced, extra_body=extra)
        finish = "stop" if reason is not None else "length"
        assert (plain.choices[0].message.content, plain.choices[0].finish_reason) == (text, finish), extra
        assert plain.choices[0].model_extra["stop_reason"] == reason, extra
        assert plain.usage is not None and plain.usage.completion_tokens == tokens
        chunks = list(api.chat.completions.create(**forced, extra_body=extra, stream=True))
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
        [last] = [c.choices[0] for c in chunks if c.choices and c.choices[0].finish_reason]
        assert last.model_extra["stop_reason"] == reason, extra
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}]
    for extra, reason in (({"stop": [stop]}, stop), ({"extra_body": {"stop_token_ids": [token]}}, token)):
        # with tools (auto) the stream ends through the calls' splitter: it carried no stop_reason
        plain = api.chat.completions.create(**forced, tools=tools, **extra)
        streamed = list(api.chat.completions.create(**forced, tools=tools, stream=True, **extra))
        [last] = [c.choices[0] for c in streamed if c.choices and c.choices[0].finish_reason]
        assert plain.choices[0].model_extra["stop_reason"] == last.model_extra["stop_reason"] == reason
    legacy = api.completions.create(
        model=name(api_server), prompt="Fruit:", max_tokens=6, logit_bias={str(token): 100}, stop=[stop]
    )
    assert (legacy.choices[0].text, legacy.choices[0].model_extra["stop_reason"]) == ((word * 2)[:cut], stop)
    with pytest.raises(openai.BadRequestError) as info:
        api.chat.completions.create(**forced, extra_body={"stop_token_ids": [10**9]})
    assert info.value.body["param"] == "stop_token_ids"


def test_vllm_skip_special_tokens_false_writes_special_tokens(api_server: InProcessServer) -> None:
    """vLLM's `skip_special_tokens: false`: a special token drawn mid-answer is written as its text (left out by
    default), and the end token that ends the answer stays out unless `include_stop_str_in_output` (as in vLLM);
    with `ignore_eos` the end tokens do not end it, so they are text too. `spaces_between_special_tokens` is
    accepted either way."""
    generator = api_server.runtime.generator()
    tokenizer = generator.tokenizer
    special = tokenizer.convert_tokens_to_ids("<|im_start|>")  # marked special; not in all_special_ids
    end = min(generator.engine.end_token_ids)
    end_text = tokenizer.convert_ids_to_tokens(end)
    api = client(api_server)
    args = {"model": name(api_server), "messages": QUESTION, "max_tokens": 3, "temperature": 0}
    drawn = {**args, "logit_bias": {str(special): 100}}
    assert api.chat.completions.create(**drawn).choices[0].message.content == ""
    written = api.chat.completions.create(**drawn, extra_body={"skip_special_tokens": False})
    assert written.choices[0].message.content == "<|im_start|>" * 3
    streamed = api.chat.completions.create(
        **drawn, stream=True, extra_body={"skip_special_tokens": False, "spaces_between_special_tokens": False}
    )
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == "<|im_start|>" * 3
    ending = {**args, "logit_bias": {str(end): 100}}
    ended = api.chat.completions.create(**ending, extra_body={"skip_special_tokens": False})
    assert (ended.choices[0].message.content, ended.choices[0].finish_reason) == ("", "stop")
    assert ended.choices[0].model_extra["stop_reason"] is None  # an end token, not a stop token
    kept = api.chat.completions.create(
        **ending, extra_body={"skip_special_tokens": False, "include_stop_str_in_output": True}
    )
    assert (kept.choices[0].message.content, kept.choices[0].finish_reason) == (end_text, "stop")
    ignored = api.chat.completions.create(**ending, extra_body={"skip_special_tokens": False, "ignore_eos": True})
    assert (ignored.choices[0].message.content, ignored.choices[0].finish_reason) == (end_text * 3, "length")
    text = api.completions.create(
        model=name(api_server),
        prompt="Fruit:",
        max_tokens=2,
        logit_bias={str(special): 100},
        extra_body={"skip_special_tokens": False},
    )
    assert text.choices[0].text == "<|im_start|>" * 2


def test_vllm_ignore_eos_runs_to_max_tokens(api_server: InProcessServer) -> None:
    """vLLM's `ignore_eos` (its benchmarks send it): an end token forced first ends the answer at once, but with
    `ignore_eos` the answer runs to `max_tokens`; the end tokens stay no text."""
    generator = api_server.runtime.generator()
    end = min(generator.engine.end_token_ids)
    api = client(api_server)
    args = {"model": name(api_server), "messages": QUESTION, "max_tokens": 5, "logit_bias": {str(end): 100}}
    ended = api.chat.completions.create(**args)
    assert (ended.choices[0].finish_reason, ended.usage.completion_tokens) == ("stop", 1)
    kept = api.chat.completions.create(**args, extra_body={"ignore_eos": True})
    assert (kept.choices[0].finish_reason, kept.usage.completion_tokens) == ("length", 5)
    assert kept.choices[0].message.content == ""
    chunks = list(api.chat.completions.create(**args, extra_body={"ignore_eos": True}, stream=True))
    assert chunks[-1].choices[0].finish_reason == "length"


def test_vllm_min_tokens_holds_end_and_stop_tokens_back(api_server: InProcessServer) -> None:
    """vLLM's `min_tokens`: an end token (or a stop token) forced at every step cannot come before the answer has
    min_tokens tokens, then ends it, streamed as plain; a grammar that is complete still ends the answer; more
    than the answer may have is a 400."""
    generator = api_server.runtime.generator()
    end = min(generator.engine.end_token_ids)
    api = client(api_server)
    args = {"model": name(api_server), "messages": QUESTION, "max_tokens": 8, "logit_bias": {str(end): 100}}
    held = api.chat.completions.create(**args, extra_body={"min_tokens": 4})
    assert (held.choices[0].finish_reason, held.usage.completion_tokens) == ("stop", 5)
    chunks = list(
        api.chat.completions.create(
            **args, extra_body={"min_tokens": 4}, stream=True, stream_options={"include_usage": True}
        )
    )
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 5
    token = generator.content_ids(" banana")[0]
    word = generator.tokenizer.decode([token])
    args["logit_bias"] = {str(token): 100}
    stopped = api.chat.completions.create(**args, extra_body={"min_tokens": 3, "stop_token_ids": [token]})
    assert (stopped.choices[0].finish_reason, stopped.usage.completion_tokens) == ("stop", 4)
    content = stopped.choices[0].message.content
    assert content and word not in content  # three tokens before it; the stop token's own text left out, as in vLLM
    boolean = {"type": "json_schema", "json_schema": {"name": "b", "schema": {"type": "boolean"}}}
    shaped = api.chat.completions.create(
        model=name(api_server), messages=QUESTION, max_tokens=30, response_format=boolean, extra_body={"min_tokens": 20}
    )
    assert shaped.choices[0].finish_reason == "stop" and shaped.usage.completion_tokens < 20
    assert json.loads(shaped.choices[0].message.content) in (True, False)
    with pytest.raises(openai.BadRequestError) as info:
        api.chat.completions.create(**args, extra_body={"min_tokens": 9})
    assert info.value.body["param"] == "min_tokens"


def test_echo_scores_the_prompt_as_generation_would(api_server: InProcessServer) -> None:
    """lm-eval's loglikelihood requests (echo, logprobs, max_tokens 0 or 1, a token-id prompt): each prompt token's
    log-probability under the tokens before it, as the model gives that token when it is generated (forced by a
    bias: log-probabilities are taken before it); the first token's null; streamed as plain."""
    api, generator, model = client(api_server), api_server.runtime.generator(), name(api_server)
    ids = generator.text_prompt_ids("The capital of France is Paris, and of Italy")
    scored = api.completions.create(model=model, prompt=ids, max_tokens=0, echo=True, logprobs=2, temperature=0)
    [choice] = scored.choices
    lp = choice.logprobs
    assert lp is not None and lp.token_logprobs is not None and lp.top_logprobs is not None and lp.tokens is not None
    assert choice.text == generator.decode_all(ids) and len(lp.tokens) == len(ids) and lp.text_offset[0] == 0
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None and len(lp.top_logprobs[1]) <= 2
    assert scored.usage is not None and (scored.usage.prompt_tokens, scored.usage.completion_tokens) == (len(ids), 0)
    for i in (1, len(ids) // 2, len(ids) - 1):
        forced = api.completions.create(
            model=model, prompt=ids[:i], max_tokens=1, logprobs=0, temperature=0, logit_bias={str(ids[i]): 100}
        )
        assert forced.choices[0].logprobs.token_logprobs[0] == pytest.approx(lp.token_logprobs[i], abs=2e-3), i
    # lm-eval's own request: a list of one token-id prompt, max_tokens 1, logprobs 1
    request = {"model": model, "prompt": [ids], "max_tokens": 1, "logprobs": 1, "echo": True, "temperature": 0}
    one = api.completions.create(**request, seed=1234).choices[0].logprobs
    assert len(one.tokens) == len(ids) + 1 and one.token_logprobs[0] is None
    assert one.token_logprobs[1 : len(ids)] == pytest.approx(lp.token_logprobs[1:], abs=2e-3)
    pairs = zip(one.token_logprobs[1:], one.top_logprobs[1:], strict=True)
    assert all(t <= max(top.values()) + 1e-6 for t, top in pairs)  # lm-eval reads greediness so
    chunks = list(api.completions.create(**{**request, "prompt": ids, "max_tokens": 3}, stream=True))
    assert "".join(c.choices[0].text for c in chunks).startswith(choice.text)
    streamed = [t for c in chunks if c.choices[0].logprobs for t in c.choices[0].logprobs.token_logprobs]
    assert streamed[0] is None and streamed[1 : len(ids)] == pytest.approx(lp.token_logprobs[1:], abs=2e-3)
    # a batch of prompts (lm-eval's batch_size): prompt k's answers are choices k * n ... k * n + n - 1
    batch = api.completions.create(model=model, prompt=[ids[:5], ids], max_tokens=0, echo=True, logprobs=2, n=2)
    assert [c.index for c in batch.choices] == [0, 1, 2, 3] and batch.usage.prompt_tokens == 5 + len(ids)
    assert [c.text for c in batch.choices] == [generator.decode_all(ids[:5])] * 2 + [choice.text] * 2
    assert batch.choices[3].logprobs.token_logprobs[1:] == pytest.approx(lp.token_logprobs[1:], abs=2e-3)
    plain = api.completions.create(model=model, prompt="Hello", max_tokens=3, echo=True, temperature=0)
    assert plain.choices[0].text.startswith("Hello") and plain.choices[0].logprobs is None
    for bad, param in (({"max_tokens": 0, "echo": False}, "max_tokens"), ({"prompt": [10**9]}, "prompt")):
        with pytest.raises(openai.BadRequestError) as info:
            api.completions.create(**{"model": model, "prompt": ids, "echo": True, **bad})
        assert info.value.body["param"] == param
    # a prompt that fills the context: max_tokens 0 still needs room for the token drawn while it is read, and the
    # error says so (it said "up to 1 new tokens were requested" to a client that asked for none)
    full = [ids[1]] * generator.engine.max_context_tokens
    with pytest.raises(openai.BadRequestError) as info:
        api.completions.create(model=model, prompt=full, max_tokens=0, echo=True, logprobs=1)
    assert info.value.code == "context_length_exceeded" and "no new token was requested" in info.value.message


def test_responses_take_vllm_top_k_logit_bias_and_request_id(api_server: InProcessServer) -> None:
    """The Responses route's extensions, as vLLM's: `top_k` 1 at temperature 1 is the greedy answer; `logit_bias`
    forces a token (its log-probability is still the model's own, so only its bytes are checked); `request_id` is
    the response's id; a bias outside the vocabulary is a 400 naming it."""
    api, generator, model = client(api_server), api_server.runtime.generator(), name(api_server)
    args = {"model": model, "input": QUESTION[0]["content"], "max_output_tokens": 6}
    greedy = api.responses.create(**args, temperature=0).output_text
    assert api.responses.create(**args, temperature=1.0, extra_body={"top_k": 1}).output_text == greedy
    token = generator.content_ids(" banana")[0]
    extra = {"logit_bias": {str(token): 100}, "request_id": "resp-job-1"}
    forced = api.responses.create(**args, temperature=0, include=["message.output_text.logprobs"], extra_body=extra)
    assert forced.id == "resp-job-1"
    assert forced.output[0].content[0].logprobs[0].bytes == list(generator.token_bytes(token))
    with pytest.raises(openai.BadRequestError) as info:
        api.responses.create(**args, extra_body={"logit_bias": {"99999999": 1}})
    assert info.value.body["param"] == "logit_bias"


def test_vllm_token_fields_and_prompt_logprobs(api_server: InProcessServer) -> None:
    """vLLM's fields for clients that work in tokens, through the SDK's extra_body: `return_token_ids` gives the
    prompt's ids and each choice's, streamed (in pieces that add up to the plain answer's, each chunk's
    `continuous_usage_stats` counting them) or not;
    `return_tokens_as_token_ids` names log-probability entries "token_id:N"; `prompt_logprobs` gives each prompt
    token's log-probability, rank and alternatives, as an echoed prompt scores it; on chat as on text completions."""
    api, generator, model = client(api_server), api_server.runtime.generator(), name(api_server)
    ids = generator.text_prompt_ids("The capital of France is Paris, and of Italy")
    extra = {"return_token_ids": True, "return_tokens_as_token_ids": True, "prompt_logprobs": 3}
    args = {"model": model, "prompt": ids, "max_tokens": 4, "temperature": 0, "logprobs": 1, "echo": True}
    [choice] = api.completions.create(**args, extra_body=extra).choices
    data = choice.model_dump()
    assert data["prompt_token_ids"] == ids and len(data["token_ids"]) <= 4
    lp = choice.logprobs
    assert lp.tokens == [f"token_id:{t}" for t in [*ids, *data["token_ids"]]]
    assert all(top is None or len(top) <= 1 for top in lp.top_logprobs)  # the echo keeps logprobs' width
    scored = data["prompt_logprobs"]
    assert len(scored) == len(ids) and scored[0] is None
    for i in range(1, len(ids)):
        listed = scored[i]
        own = listed[str(ids[i])]
        assert own["logprob"] == pytest.approx(lp.token_logprobs[i], abs=1e-5) and own["rank"] >= 1
        assert own["decoded_token"] == generator.token_bytes(ids[i]).decode(errors="replace")  # text, as vLLM's
        tops = sorted((e for t, e in listed.items() if t != str(ids[i]) or e["rank"] <= 3), key=lambda e: e["rank"])
        assert [e["rank"] for e in tops] == [1, 2, 3]  # the three best, the token among them where it is
        assert [e["logprob"] for e in tops] == sorted((e["logprob"] for e in tops), reverse=True)
        assert len(listed) == (3 if own["rank"] <= 3 else 4)
    if choice.finish_reason == "length":  # the answer's tokens are its text
        assert generator.decode_all(data["token_ids"]) == choice.text[len(generator.decode_all(ids)) :]
    chunks = [
        c.model_dump()
        for c in api.completions.create(**args, extra_body=extra | {"prompt_logprobs": None}, stream=True)
    ]
    assert [c["choices"][0].get("prompt_token_ids") for c in chunks] == [ids] + [None] * (len(chunks) - 1)
    assert [t for c in chunks for t in c["choices"][0].get("token_ids") or []] == data["token_ids"]

    chat_args = {"model": model, "messages": QUESTION, "max_tokens": 5, "temperature": 0}
    chat = api.chat.completions.create(**chat_args, extra_body={"return_token_ids": True, "prompt_logprobs": 0})
    top = chat.model_dump()
    prompt = top["prompt_token_ids"]
    assert chat.usage is not None and len(prompt) == chat.usage.prompt_tokens
    assert len(top["choices"][0]["token_ids"]) == chat.usage.completion_tokens
    assert [None if e is None else list(e) for e in top["prompt_logprobs"]] == [None] + [[str(t)] for t in prompt[1:]]
    # streamed, with vLLM's continuous usage: each chunk counts the tokens its choice has so far
    options = {"include_usage": True, "continuous_usage_stats": True}
    stream = api.chat.completions.create(
        **chat_args, extra_body={"return_token_ids": True}, stream=True, stream_options=options
    )
    streamed = [c.model_dump() for c in stream]
    assert streamed[0]["prompt_token_ids"] == prompt and all("prompt_token_ids" not in c for c in streamed[1:])
    so_far = 0
    for c in streamed[:-1]:
        so_far += len(c["choices"][0].get("token_ids") or [])
        assert (c["usage"]["prompt_tokens"], c["usage"]["completion_tokens"]) == (len(prompt), so_far)
    assert so_far == chat.usage.completion_tokens and streamed[-1]["choices"] == []
    assert streamed[-1]["usage"]["completion_tokens"] == so_far
    assert [t for c in streamed for ch in c["choices"] for t in ch.get("token_ids") or []] == top["choices"][0][
        "token_ids"
    ]
    for bad, param in (
        ({"prompt_logprobs": 1, "stream": True}, "prompt_logprobs"),
        ({"prompt_logprobs": 21}, "prompt_logprobs"),
    ):
        with pytest.raises(openai.BadRequestError) as info:
            api.chat.completions.create(**chat_args, stream=bad.pop("stream", False), extra_body=bad)
        assert info.value.body["param"] == param


def test_vllm_allowed_token_ids_are_all_that_is_drawn(api_server: InProcessServer) -> None:
    """vLLM's `allowed_token_ids`: sampled or greedy, beside a request without them in the same batch, every token
    of the answer is one of them (read back with `return_token_ids`); their log-probabilities stay the model's; an
    id outside the vocabulary, or beside a grammar, is a 400 naming the field."""
    api, generator, model = client(api_server), api_server.runtime.generator(), name(api_server)
    colours = [generator.content_ids(w)[0] for w in (" red", " green", " blue")]
    args = {"model": model, "messages": QUESTION, "max_tokens": 8}
    baseline = api.chat.completions.create(**args, temperature=0)
    extra = {"allowed_token_ids": colours, "return_token_ids": True}
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        sampled = [
            pool.submit(api.chat.completions.create, **args, temperature=1.0, seed=s, extra_body=extra)
            for s in range(3)
        ]
        greedy = pool.submit(api.chat.completions.create, **args, temperature=0, extra_body=extra, logprobs=True)
        plain = pool.submit(api.chat.completions.create, **args, temperature=0)
        answers = [f.result() for f in [*sampled, greedy]]
        assert plain.result().choices[0].message.content == baseline.choices[0].message.content
    for answer in answers:
        ids = answer.choices[0].model_dump()["token_ids"]
        assert len(ids) == 8 and set(ids) <= set(colours), ids  # no end token allowed: it runs to max_tokens
    entries = greedy.result().choices[0].logprobs.content
    assert all(e.logprob <= 0 for e in entries) and any(e.logprob < -1e-3 for e in entries)  # the model's, unmasked
    schema = {"type": "json_schema", "json_schema": {"name": "b", "schema": {"type": "boolean"}}}
    for bad in (
        {"allowed_token_ids": [10**7]},
        {"allowed_token_ids": colours, "response_format": schema},
        {"allowed_token_ids": []},
    ):
        with pytest.raises(openai.BadRequestError) as info:
            api.chat.completions.create(**args, extra_body=bad)
        assert info.value.body["param"] == "allowed_token_ids", bad


def test_vllm_bad_words_never_appear_in_the_answer(api_server: InProcessServer) -> None:
    """vLLM's `bad_words`: words taken from the greedy answer (one of one token, one of two), banned, appear
    nowhere in the new answer's tokens, greedy or sampled; beside a grammar it is a 400 naming the field."""
    api, generator, model = client(api_server), api_server.runtime.generator(), name(api_server)
    args = {"model": model, "messages": QUESTION, "max_tokens": 12, "temperature": 0}
    base = api.chat.completions.create(**args, extra_body={"return_token_ids": True}).choices[0].model_dump()
    ids = base["token_ids"]

    def found(answer: list[int], banned: tuple[tuple[int, ...], ...]) -> list[tuple[int, ...]]:
        return [b for b in banned if any(tuple(answer[i : i + len(b)]) == b for i in range(len(answer)))]

    words = []
    for width in (1, 2):  # a word whose tokens, re-read, are the answer's own
        for i in range(len(ids) - width):
            word = generator.tokenizer.decode(ids[i : i + width])
            if word.strip() and found(ids, bad_word_tokens([word], generator.content_ids)):
                words.append(word)
                break
    assert len(words) == 2, f"no word of the answer re-reads as its tokens: {ids}"
    banned = bad_word_tokens(words, generator.content_ids)
    for extra in ({}, {"temperature": 1.0, "seed": 7}):
        body = {"return_token_ids": True, "bad_words": words}
        answer = api.chat.completions.create(**{**args, **extra}, extra_body=body).choices[0].model_dump()
        assert not found(answer["token_ids"], banned), (words, answer["token_ids"])
    schema = {"type": "json_schema", "json_schema": {"name": "b", "schema": {"type": "boolean"}}}
    for extra in ({"response_format": schema}, {"extra_body": {"bad_words": words, "allowed_token_ids": ids[:1]}}):
        with pytest.raises(openai.BadRequestError) as info:  # beside a grammar or allowed ids: nothing may be left
            api.chat.completions.create(**{"extra_body": {"bad_words": words}, **args, **extra})  # type: ignore[call-overload]
        assert info.value.body["param"] == "bad_words"


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


def test_vllm_cache_salt_keeps_tenants_prefixes_apart(api_server: InProcessServer) -> None:
    """vLLM's `cache_salt`: a salted request reuses no cached prompt of the unsalted or of another salt, so no
    tenant can time another's prompts; with the same salt the native and llama.cpp engines share as unsalted
    requests do, while the transformers engine, whose prefix sharing takes no salt, keeps salted requests out of it
    altogether. An empty salt is a 400 (as vLLM's)."""
    engine = api_server.runtime.generator().engine
    api = client(api_server)
    system = {"role": "system", "content": " ".join(f"rule {i}: answer briefly and kindly." for i in range(40))}

    def reused(question: str, salt: str | None = None) -> int:
        before = engine.stats().prefix_hit_tokens or 0
        extra = {"cache_salt": salt} if salt is not None else {}
        messages = [system, {"role": "user", "content": question}]
        # two tokens: transformers registers a prompt's blocks for sharing only if it is still running after them
        api.chat.completions.create(model=name(api_server), messages=messages, max_tokens=2, extra_body=extra)
        return (engine.stats().prefix_hit_tokens or 0) - before

    reused("First question?")
    assert reused("Second question?") > 100  # unsalted requests share the system prompt
    assert reused("Third question?", salt="tenant-a") == 0  # not the unsalted's
    same_salt = reused("Fourth question?", salt="tenant-a")
    assert same_salt == 0 if isinstance(engine, TransformersEngine) else same_salt > 100
    assert reused("Fifth question?", salt="tenant-b") == 0  # not another salt's
    with pytest.raises(openai.BadRequestError) as info:
        api.chat.completions.create(
            model=name(api_server), messages=QUESTION, max_tokens=1, extra_body={"cache_salt": ""}
        )
    assert info.value.body["param"] == "cache_salt"
    r = api.responses.create(model=name(api_server), input="Hi", max_output_tokens=2, extra_body={"cache_salt": "t"})
    assert r.status == "incomplete"
