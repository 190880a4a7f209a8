"""The text layer on a fake engine: context checks, n samples and their seeds, stop strings, faults."""

from __future__ import annotations

import asyncio

import pytest

from qwen_api.detokenize import Stops
from qwen_api.dev.fake_engine import FakeEngine
from qwen_api.dev.random_qwen2 import build_qwen2_tokenizer
from qwen_api.engine.base import EngineError, SamplingParams, TokenChunk, TokenLogprob
from qwen_api.engine.sampling import choice_seed, effective_top_k, is_greedy, seed32
from qwen_api.textgen import EmptyPrompt, PromptTooLong, TextGenerator

TOKENIZER = build_qwen2_tokenizer()


def generator(text: str = "Hello there, world!", **engine: object) -> tuple[TextGenerator, FakeEngine]:
    fake = FakeEngine(TOKENIZER(text, add_special_tokens=False)["input_ids"], **engine)  # type: ignore[arg-type]
    return TextGenerator(fake, TOKENIZER), fake


def test_the_context_check_refuses_empty_and_too_long_prompts() -> None:
    gen, _ = generator(max_context_tokens=100)
    with pytest.raises(EmptyPrompt):
        gen.check_fits([], 5)
    with pytest.raises(PromptTooLong, match=r"the prompt has 90 tokens .* 101 exceeds this model.s limit of 100"):
        gen.check_fits([1] * 90, 11)
    gen.check_fits([1] * 90, 10)


def test_n_samples_get_distinct_reproducible_seeds() -> None:
    gen, fake = generator()
    asyncio.run(gen.complete([1, 2], SamplingParams(max_new_tokens=3, seed=42), n=4))
    seeds = [params.seed for _, params in fake.calls]
    assert seeds[0] == 42 and len(set(seeds)) == 4
    assert seeds == [choice_seed(42, i) for i in range(4)]
    fake.calls.clear()
    asyncio.run(gen.complete([1, 2], SamplingParams(max_new_tokens=3), n=2))
    assert [params.seed for _, params in fake.calls] == [None, None]


def test_a_stop_string_cuts_the_text_and_closes_the_sequence() -> None:
    gen, fake = generator("one two <<END>> three")

    async def main() -> None:
        [done] = await gen.complete([1], SamplingParams(max_new_tokens=100), stop=["<<END>>"])
        assert (done.text, done.finish_reason, done.stop_string) == ("one two ", "stop", "<<END>>")
        assert fake.open == 0

    asyncio.run(main())


def test_streams_interleave_n_sequences_and_count_tokens() -> None:
    gen, _ = generator("a b c")

    async def main() -> None:
        deltas = [d async for d in gen.stream([1], SamplingParams(max_new_tokens=100), n=3)]
        finished = [d for d in deltas if d.finish_reason]
        assert sorted(d.index for d in finished) == [0, 1, 2]
        assert all(d.finish_reason == "stop" and d.completion_tokens == 3 for d in finished)
        for i in range(3):
            assert "".join(d.text for d in deltas if d.index == i) == "a b c"

    asyncio.run(main())


def test_length_is_reported_when_max_new_tokens_cuts() -> None:
    gen, _ = generator("a b c d e")
    [done] = asyncio.run(gen.complete([1], SamplingParams(max_new_tokens=2)))
    assert (done.text, done.finish_reason, done.completion_tokens) == ("a b", "length", 2)


def test_an_engine_fault_reaches_the_caller_and_closes_the_siblings() -> None:
    gen, fake = generator("a b c d e", fail_after=2, pace=0.001)

    async def main() -> None:
        with pytest.raises(EngineError, match="injected fault"):
            await gen.complete([1], SamplingParams(max_new_tokens=5), n=3)
        await asyncio.sleep(0.01)
        assert fake.open == 0

    asyncio.run(main())


def test_closing_a_stream_early_cancels_every_sequence() -> None:
    gen, fake = generator("a b c d e f g h", pace=0.01)

    async def main() -> None:
        stream = gen.stream([1], SamplingParams(max_new_tokens=100), n=2)
        async for _ in stream:
            break
        await stream.aclose()  # type: ignore[attr-defined]
        assert fake.open == 0

    asyncio.run(main())


def test_shared_sampling_rules() -> None:
    assert is_greedy(0.0) and is_greedy(9e-6) and not is_greedy(1e-5)
    assert effective_top_k(0, 100) == 0 and effective_top_k(-1, 100) == 0
    assert effective_top_k(100, 100) == 0 and effective_top_k(2**62, 100) == 0 and effective_top_k(5, 100) == 5
    assert choice_seed(None, 3) is None and choice_seed(7, 0) == 7
    assert choice_seed(7, 1) == choice_seed(7, 1) != choice_seed(7, 2) != choice_seed(8, 2)
    for seed in (-1, 0, 2**32 - 1, 2**64 - 1, -(2**63), 123456789):
        assert 0 <= seed32(seed) < 0xFFFFFFFF  # llama.cpp reads 0xFFFFFFFF as "random"
    assert len({seed32(s) for s in range(1000)}) == 1000


def test_relay_hands_a_consumer_that_fell_behind_the_waiting_chunks_as_one() -> None:
    from qwen_api.engine.base import relay

    def lp(token: int) -> tuple[TokenLogprob, ...]:
        return (TokenLogprob(token, -token / 10, ()),)

    async def main() -> None:
        queue: asyncio.Queue[TokenChunk | BaseException] = asyncio.Queue()
        for token in (1, 2, 3):
            queue.put_nowait(TokenChunk([token], logprobs=lp(token)))
        queue.put_nowait(TokenChunk([4], "length", lp(4)))
        queue.put_nowait(TokenChunk([5]))  # after the finish: never merged into this sequence
        chunks = [c async for c in relay(queue, lambda: None, lambda: None)]
        assert chunks == [TokenChunk([1, 2, 3, 4], "length", lp(1) + lp(2) + lp(3) + lp(4))]

        # a failure after some tokens: the tokens first, then the error; and the sequence is cancelled once
        for token in (7, 8):
            queue.put_nowait(TokenChunk([token]))
        queue.put_nowait(RuntimeError("worker fault"))
        cancelled: list[bool] = []
        got: list[TokenChunk] = []
        with pytest.raises(EngineError, match="worker fault"):
            async for chunk in relay(queue, lambda: None, lambda: cancelled.append(True)):
                got.append(chunk)
        assert got == [TokenChunk([5, 7, 8])] and cancelled == []

    asyncio.run(main())


class _ChunkedEngine(FakeEngine):
    """Yields its whole script as one chunk: what a client that fell behind receives from `relay`."""

    async def generate(self, prompt_ids, params):  # type: ignore[no-untyped-def,override]
        n = min(params.max_new_tokens, len(self.script))
        reason = "length" if params.max_new_tokens <= len(self.script) else "stop"
        logprobs = None
        if params.logprobs is not None:
            logprobs = tuple(TokenLogprob(t, -i / 8, ()) for i, t in enumerate(self.script[:n]))
        yield TokenChunk(self.script[:n], reason, logprobs)


def test_a_stop_string_inside_a_chunk_of_several_tokens_ends_the_count_at_its_token() -> None:
    """Tokens coalesced into one chunk give what they give one by one: text, finish, token count, log-probs."""
    text = "one two <<END>> three four five"
    script = TOKENIZER(text, add_special_tokens=False)["input_ids"]
    params = SamplingParams(max_new_tokens=100, logprobs=0)
    singly = TextGenerator(FakeEngine(script), TOKENIZER)
    chunked = TextGenerator(_ChunkedEngine(script), TOKENIZER)

    async def main() -> None:
        [one] = await singly.complete([1], params, stop=["<<END>>"])
        [together] = await chunked.complete([1], params, stop=["<<END>>"])
        assert (together.text, together.finish_reason, together.stop_string) == ("one two ", "stop", "<<END>>")
        assert together.completion_tokens == one.completion_tokens < len(script)
        assert together.logprobs is not None and len(together.logprobs) == together.completion_tokens
        [whole] = await chunked.complete([1], params)
        assert (whole.text, whole.completion_tokens) == (text, len(script))

    asyncio.run(main())


def test_min_tokens_keeps_stop_strings_and_stop_tokens_from_ending_the_first_tokens() -> None:
    """vLLM's min_tokens in the text layer: a stop string completed, or a stop token generated, among the first
    min_tokens tokens does not end the answer (the engines hold the stop tokens back; this is the text's half),
    tokens coming one by one or in one chunk."""
    text = "one <<END>> two <<END>> three"
    script = TOKENIZER(text, add_special_tokens=False)["input_ids"]
    first_end = len(TOKENIZER("one <<END>>", add_special_tokens=False)["input_ids"])
    stop_token = script[0]  # "one": a stop token (its text left out), which ends the text only once armed

    async def main() -> None:
        for engine in (FakeEngine(script), _ChunkedEngine(script)):
            gen = TextGenerator(engine, TOKENIZER)
            stops = Stops(("<<END>>",), token_ids=frozenset({stop_token}))
            [early] = await gen.complete([1], SamplingParams(max_new_tokens=100), stop=stops)
            assert (early.text, early.completion_tokens) == ("", 1)  # without min_tokens: the stop token ends it
            assert (early.stop_token, early.stop_string) == (stop_token, None)
            held = SamplingParams(max_new_tokens=100, min_tokens=first_end)
            [late] = await gen.complete([1], held, stop=stops)
            assert (late.text, late.finish_reason, late.stop_string) == ("one <<END>> two ", "stop", "<<END>>")
            assert late.completion_tokens < len(script)

    asyncio.run(main())


def test_the_stepped_fake_engine_streams_every_token_and_coalesces_for_a_slow_reader() -> None:
    """The delivery path of the engines with a worker thread (a step's tokens in one call, read through `relay`):
    a reader that keeps up gets a chunk a token; one that sleeps gets the same tokens in fewer chunks."""
    from qwen_api.dev.fake_engine import SteppedFakeEngine

    script = list(range(100, 140))
    engine = SteppedFakeEngine(script, pace=0.002)

    async def read(pause: float) -> list[TokenChunk]:
        chunks = []
        async for chunk in engine.generate([1], SamplingParams(max_new_tokens=30)):
            chunks.append(chunk)
            await asyncio.sleep(pause)
        return chunks

    async def main() -> None:
        fast, slow = await asyncio.gather(read(0), read(0.1))  # 30 tokens take 60 ms: slow reads twice or so
        for chunks in (fast, slow):
            assert [t for c in chunks for t in c.token_ids] == script[:30]
            assert [c.finish_reason for c in chunks][-1] == "length"
        assert len(slow) <= 3 < len(fast)

    try:
        asyncio.run(main())
    finally:
        engine.shutdown()


def test_the_stepped_fake_engine_steps_no_faster_than_its_host_work() -> None:
    """With `host` seconds of Python work a step (a GPU engine's host side, overlapped with a shorter `pace`), a
    step takes the longer of the two."""
    import time

    from qwen_api.dev.fake_engine import SteppedFakeEngine

    engine = SteppedFakeEngine(list(range(100, 120)), pace=0.001, host=0.01)

    async def main() -> float:
        start = time.perf_counter()
        tokens = [t async for c in engine.generate([1], SamplingParams(max_new_tokens=10)) for t in c.token_ids]
        assert tokens == list(range(100, 110))
        return time.perf_counter() - start

    try:
        assert asyncio.run(main()) >= 10 * 0.01
    finally:
        engine.shutdown()


def test_a_sequence_left_early_still_reports_the_tokens_it_generated() -> None:
    """The generation-token counter counted only sequences that reached their end: a stream its client left after
    three tokens added nothing (vLLM counts every token it generates)."""

    class Observer:
        def __init__(self) -> None:
            self.finished: list[int] = []
            self.left: list[int] = []

        def sequence_finished(self, completion_tokens: int, ttft: float, e2e: float) -> None:
            self.finished.append(completion_tokens)

        def sequence_left(self, completion_tokens: int) -> None:
            self.left.append(completion_tokens)

    async def main() -> None:
        fake = FakeEngine(list(range(100, 120)))
        observer = Observer()
        gen = TextGenerator(fake, TOKENIZER, observer=observer)
        deltas = gen.stream([1], SamplingParams(max_new_tokens=20))
        for _ in range(3):
            await anext(deltas)
        await deltas.aclose()
        assert (observer.finished, observer.left) == ([], [3])
        await gen.complete([1], SamplingParams(max_new_tokens=5))
        assert (observer.finished, observer.left) == ([5], [3])  # an answer that ended is told once, as ended

    asyncio.run(main())
