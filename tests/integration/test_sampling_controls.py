"""Every sampling control on every engine: log-probabilities, logit bias, penalties, min-p, seeds beside traffic.

Each engine runs behind a real TextGenerator on a real model (the tiny random Qwen2 for transformers and native,
the demo GGUF for llama.cpp). Log-probabilities are checked against a log-softmax computed independently, here,
from the logits of a separate forward pass (transformers' own model, or llama-cpp-python's `Llama`).
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from qwen_api.engine.base import SamplingParams, TokenLogprob
from qwen_api.engine.llamacpp_engine import safe_model_params
from qwen_api.engine.loading import resolve_model
from qwen_api.runtime import default_loader
from qwen_api.settings import Settings
from qwen_api.textgen import TextGenerator

from conftest import ENGINES, engine_model

GREEDY = SamplingParams(max_new_tokens=12, temperature=0.0)


@pytest.fixture(scope="module", params=ENGINES)
def generator(request: pytest.FixtureRequest, tiny_qwen2_dir: Path) -> Iterator[TextGenerator]:
    model = engine_model(request.param, tiny_qwen2_dir)
    settings = Settings(model=str(model), engine=request.param, max_batch_size=8, dtype="float32")
    generator = default_loader(settings, resolve_model(settings.model))()
    yield generator
    generator.engine.shutdown()


def prompt_of(generator: TextGenerator, text: str = "Count from one to twenty, please.") -> list[int]:
    return generator.chat_prompt_ids([{"role": "user", "content": text}])


async def _run(
    generator: TextGenerator, prompt: list[int], params: SamplingParams
) -> tuple[list[int], list[TokenLogprob]]:
    tokens: list[int] = []
    logprobs: list[TokenLogprob] = []
    async for chunk in generator.engine.generate(prompt, params):
        tokens += chunk.token_ids
        logprobs += chunk.logprobs or ()
    return tokens, logprobs


def run(generator: TextGenerator, prompt: list[int], params: SamplingParams) -> tuple[list[int], list[TokenLogprob]]:
    return asyncio.run(_run(generator, prompt, params))


def run_together(
    generator: TextGenerator, jobs: list[tuple[list[int], SamplingParams]]
) -> list[tuple[list[int], list[TokenLogprob]]]:
    async def main() -> list[tuple[list[int], list[TokenLogprob]]]:
        return list(await asyncio.gather(*(_run(generator, p, s) for p, s in jobs)))

    return asyncio.run(main())


def reference_log_softmax(generator: TextGenerator, prompt: list[int], generated: list[int]) -> np.ndarray:
    """[len(generated), V] float64: the log-softmax of the logits that predicted each generated token, from a
    forward pass that shares no code with the engine."""
    ids = prompt + generated[:-1]
    engine = type(generator.engine).__name__
    if engine == "LlamaCppEngine":
        import llama_cpp

        demo = resolve_model("demo")
        assert demo.gguf_file is not None
        original = llama_cpp.llama_cpp.llama_model_default_params
        llama_cpp.llama_cpp.llama_model_default_params = lambda: safe_model_params(original)
        try:
            llm = llama_cpp.Llama(str(demo.path / demo.gguf_file), n_ctx=1024, logits_all=True, verbose=False)
        finally:
            llama_cpp.llama_cpp.llama_model_default_params = original
        # The engine's shapes: the prompt in one batch, then one token at a time.
        llm.eval(prompt)
        for token in generated[:-1]:
            llm.eval([token])
        logits = np.asarray(llm.scores[len(prompt) - 1 : len(ids)], dtype=np.float64)
        llm.close()
    else:
        import torch
        from transformers import AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_pretrained(generator.tokenizer.name_or_path, dtype=torch.float32).eval()
        with torch.no_grad():
            out = hf(torch.tensor([ids])).logits[0]
        logits = out[len(prompt) - 1 :].double().numpy()
    # over every row of the model's output, as transformers and vLLM give it (a checkpoint's padding rows included)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def test_logprobs_are_an_exact_log_softmax_of_the_model(generator: TextGenerator) -> None:
    prompt = prompt_of(generator)
    tokens, logprobs = run(generator, prompt, dataclasses.replace(GREEDY, logprobs=5))
    assert [e.token for e in logprobs] == tokens
    reference = reference_log_softmax(generator, prompt, tokens)
    for position, entry in enumerate(logprobs):
        row = reference[position]
        assert entry.logprob == pytest.approx(row[entry.token], abs=1e-4)
        assert len(entry.top) == 5
        best = np.argsort(-row[: generator.vocab_size], kind="stable")[:5]  # the alternatives: decodable ids
        assert [lp for _, lp in entry.top] == pytest.approx(row[best].tolist(), abs=1e-4)
        assert [lp for _, lp in entry.top] == sorted((lp for _, lp in entry.top), reverse=True)
        assert entry.top[0][0] == entry.token  # greedy: the sampled token is the most likely one
    # Raw logits: a temperature, penalties and a bias change what is drawn, never the reported distribution.
    shaped = dataclasses.replace(GREEDY, logprobs=0, repetition_penalty=1.3, logit_bias=((tokens[1], -5.0),))
    shaped_tokens, shaped_logprobs = run(generator, prompt, shaped)
    assert shaped_logprobs[0].logprob == pytest.approx(logprobs[0].logprob, abs=1e-5)
    assert shaped_logprobs[0].top == ()
    assert len(shaped_logprobs) == len(shaped_tokens)


def test_a_large_logit_bias_forces_a_token_and_a_negative_one_bans_it(generator: TextGenerator) -> None:
    prompt = prompt_of(generator)
    forced = generator.content_ids(" banana")[0]
    tokens, _ = run(generator, prompt, dataclasses.replace(GREEDY, max_new_tokens=5, logit_bias=((forced, 100.0),)))
    assert tokens == [forced] * 5
    greedy, _ = run(generator, prompt, dataclasses.replace(GREEDY, max_new_tokens=1))
    banned, _ = run(generator, prompt, dataclasses.replace(GREEDY, max_new_tokens=1, logit_bias=((greedy[0], -100.0),)))
    assert banned != greedy


def test_the_embeddings_padding_rows_are_never_drawn(generator: TextGenerator) -> None:
    """The tiny Qwen2, like Qwen2-7B, has 152,064 embedding rows for 151,646 token ids: the rest is padding the
    tokenizer decodes as nothing. Even biased far above every other token, such an id is never drawn, greedy or
    sampled, nor listed among the log-probabilities. (llama.cpp's GGUF vocabulary names every row.)"""
    engine, prompt, decodable = generator.engine, prompt_of(generator), generator.vocab_size
    name = type(engine).__name__
    if name == "LlamaCppEngine":
        assert engine._n_vocab == decodable
        return
    rows = engine.config.vocab_size if name == "NativeEngine" else engine.model.config.vocab_size
    assert rows == 152_064 and decodable == 151_646
    padding = 151_700
    bias = ((padding, 100.0), (padding + 1, 90.0))
    jobs = [
        (prompt, dataclasses.replace(GREEDY, max_new_tokens=6, logit_bias=bias, logprobs=5)),
        (prompt, SamplingParams(max_new_tokens=6, temperature=1.5, top_k=0, logit_bias=bias, seed=3)),
        (prompt, SamplingParams(max_new_tokens=6, temperature=1.0, top_k=5, logit_bias=bias)),
    ]
    results = run_together(generator, jobs)
    for tokens, _ in results:
        assert len(tokens) == 6 and all(0 <= t < decodable for t in tokens), tokens
    assert all(t < decodable for entry in results[0][1] for t, _ in entry.top)
    assert results[0][0] == run(generator, prompt, dataclasses.replace(GREEDY, max_new_tokens=6))[0]


def test_a_token_that_ends_the_sequence_is_never_text(generator: TextGenerator) -> None:
    """llama.cpp ends the demo's sequences on ids its tokenizer does not call special (`<reponame>`, id 4): its
    text came back as the answer. Forced by a bias, each engine's end tokens end the answer with no text."""
    engine, prompt = generator.engine, prompt_of(generator)
    plain = set(engine.end_token_ids) - set(generator.tokenizer.all_special_ids)
    assert (4 in plain) == (type(engine).__name__ == "LlamaCppEngine"), plain
    for end in sorted(plain)[:2] or sorted(engine.end_token_ids)[:1]:
        params = dataclasses.replace(GREEDY, max_new_tokens=4, logit_bias=((end, 100.0),))
        [result] = asyncio.run(generator.complete(prompt, params))
        assert (result.text, result.finish_reason, result.completion_tokens) == ("", "stop", 1), end


def _repeats(tokens: list[int]) -> int:
    return len(tokens) - len(set(tokens))


def test_a_frequency_penalty_reduces_repeats(generator: TextGenerator) -> None:
    """On the demo model, a prompt it answers with repeats; the random-weight fixture repeats nothing on its own, so
    there a bias makes it repeat one token. All penalties share one implementation (engine/sampling.py), whose
    arithmetic tests/unit checks against transformers' own processors."""
    base = dataclasses.replace(GREEDY, max_new_tokens=40)
    if type(generator.engine).__name__ == "LlamaCppEngine":  # the demo model
        prompt = prompt_of(generator, "Write the word 'yes' 30 times.")
    else:
        prompt = prompt_of(generator)
        base = dataclasses.replace(base, logit_bias=((generator.content_ids(" banana")[0], 12.0),))
    plain, _ = run(generator, prompt, base)
    assert _repeats(plain) >= 20, plain  # the premise: it repeats without a penalty
    penalised, _ = run(generator, prompt, dataclasses.replace(base, frequency_penalty=2.0))
    assert _repeats(penalised) < _repeats(plain) / 2, penalised


def test_min_p_of_one_keeps_only_the_most_likely_token(generator: TextGenerator) -> None:
    prompt = prompt_of(generator)
    greedy, _ = run(generator, prompt, GREEDY)
    hot = dataclasses.replace(GREEDY, temperature=1.5, min_p=1.0)
    assert [run(generator, prompt, hot)[0] for _ in range(2)] == [greedy, greedy]
    # and a small min-p still samples (two unseeded draws at temperature 1.5 almost surely differ somewhere)
    loose = dataclasses.replace(GREEDY, max_new_tokens=24, temperature=1.5, min_p=0.01)
    assert len({tuple(run(generator, prompt, loose)[0]) for _ in range(3)}) > 1


def test_a_seed_reproduces_beside_other_traffic_with_every_control_on(generator: TextGenerator) -> None:
    prompt = prompt_of(generator)
    everything = SamplingParams(
        max_new_tokens=16,
        temperature=0.9,
        top_p=0.95,
        top_k=40,
        min_p=0.02,
        presence_penalty=0.5,
        frequency_penalty=0.5,
        repetition_penalty=1.1,
        logit_bias=((generator.content_ids(" the")[0], 2.0),),
        seed=1234,
        logprobs=2,
    )
    alone_tokens, alone_logprobs = run(generator, prompt, everything)
    others = [
        (prompt_of(generator, f"Tell me about the number {i}."), dataclasses.replace(everything, seed=None, top_k=i))
        for i in range(1, 4)
    ]
    together = run_together(generator, [*others, (prompt, everything)])
    tokens, logprobs = together[-1]
    assert tokens == alone_tokens
    assert [e.logprob for e in logprobs] == pytest.approx([e.logprob for e in alone_logprobs], abs=1e-4)


def test_the_transformers_engine_scores_a_long_prompt_a_slice_at_a_time(tiny_qwen2_dir: Path) -> None:
    """`prompt_logprobs` on the transformers engine computed the whole prompt's logits at once (0.3 MB a token for
    Qwen2's vocabulary: 24,000 tokens got the server killed for memory): the head now reads the last hidden states
    a slice of rows at a time, and the log-probabilities are those of the full forward pass."""
    import torch

    from qwen_api.engine.transformers_engine import _SCORE_ROWS, TransformersEngine

    settings = Settings(model=str(tiny_qwen2_dir), engine="transformers", max_batch_size=2, dtype="float32")
    engine = default_loader(settings, resolve_model(settings.model))().engine
    assert isinstance(engine, TransformersEngine)
    head = engine.model.get_output_embeddings()
    rows: list[int] = []
    hook = head.register_forward_hook(lambda _m, args, _out: rows.append(args[0].shape[-2]))
    prompt = [int(t) for t in np.random.default_rng(3).integers(100, 5000, 700)]
    try:
        scored = engine._score_prompt(prompt, 2)
    finally:
        hook.remove()
        engine.shutdown()
    assert rows and max(rows) <= _SCORE_ROWS < len(prompt)
    with torch.inference_mode():
        full = torch.log_softmax(engine.model(input_ids=torch.tensor([prompt])).logits[0].float(), dim=-1)
    expected = [float(full[i, prompt[i + 1]]) for i in range(len(prompt) - 1)]
    assert [e.token for e in scored] == prompt[1:]
    assert np.allclose([e.logprob for e in scored], expected, atol=1e-4)


def test_the_transformers_engine_scores_one_prompt_at_a_time_and_drops_cancelled_ones(tiny_qwen2_dir: Path) -> None:
    """Scorings ran on the event loop's thread pool, several at once (each holding a whole prompt's activations),
    and a request cancelled while its scoring waited still had it run: memory grew with clients that gave up."""
    import threading

    from qwen_api.engine.transformers_engine import TransformersEngine

    settings = Settings(model=str(tiny_qwen2_dir), engine="transformers", max_batch_size=2, dtype="float32")
    engine = default_loader(settings, resolve_model(settings.model))().engine
    assert isinstance(engine, TransformersEngine)
    real, gate, lock = engine._score_prompt, threading.Event(), threading.Lock()
    started: list[int] = []
    running = [0, 0]  # now, most at once

    def held(ids: list[int], k: int) -> tuple[TokenLogprob, ...]:
        with lock:
            started.append(len(ids))
            running[0] += 1
            running[1] = max(running)
        gate.wait(30)
        try:
            return real(ids, k)
        finally:
            with lock:
                running[0] -= 1

    engine._score_prompt = held  # type: ignore[method-assign]
    params = SamplingParams(max_new_tokens=1, temperature=0.0, prompt_logprobs=1)

    async def answer(prompt: list[int]) -> int:
        chunks = [c async for c in engine.generate(prompt, params)]
        return len(chunks[0].prompt_logprobs or ())

    async def main() -> None:
        tasks = [asyncio.create_task(answer([100 + i] * 40)) for i in range(4)]
        await asyncio.sleep(0.5)  # the first scoring runs, held; the others wait for the scorer's thread
        tasks[0].cancel()  # its client leaves: its scoring runs on, and the next must still wait for it
        tasks[2].cancel()  # its client leaves before its scoring began: it never runs
        await asyncio.sleep(0.5)
        assert running == [1, 1]
        gate.set()
        assert await tasks[1] == await tasks[3] == 39
        await asyncio.gather(tasks[0], tasks[2], return_exceptions=True)

    try:
        asyncio.run(main())
    finally:
        engine.shutdown()
    assert started == [40, 40, 40] and running[1] == 1


def test_the_transformers_engine_scores_a_prompt_beside_generating_sequences_as_alone(tiny_qwen2_dir: Path) -> None:
    """The scorer's forward pass ran on its own thread at the same time as the batch's steps, and then came out
    wrong (56 of 60 prompts scored beside 4 generating sequences; echo with logprobs, lm-eval's loglikelihood, under
    load): the two now take turns."""
    from qwen_api.engine.transformers_engine import TransformersEngine

    settings = Settings(model=str(tiny_qwen2_dir), engine="transformers", max_batch_size=4, dtype="float32")
    engine = default_loader(settings, resolve_model(settings.model))().engine
    assert isinstance(engine, TransformersEngine)
    prompt = list(range(100, 111))
    alone = [e.logprob for e in engine._score_prompt(prompt, 0)]
    busy = SamplingParams(max_new_tokens=24, temperature=0.0, ignore_eos=True)

    async def drain(ids: list[int]) -> None:
        async for _ in engine.generate(ids, busy):
            pass

    async def main() -> list[list[float]]:
        loop, scored = asyncio.get_running_loop(), []
        for _ in range(4):
            traffic = [asyncio.create_task(drain(list(range(200 + i, 230 + i)))) for i in range(4)]
            for _ in range(3):
                entries = await loop.run_in_executor(None, engine._score_prompt, prompt, 0)
                scored.append([e.logprob for e in entries])
            await asyncio.gather(*traffic)
        return scored

    try:
        scored = asyncio.run(main())
    finally:
        engine.shutdown()
    assert engine.stats().steps > 0
    assert all(np.allclose(s, alone, atol=1e-5) for s in scored), [max(abs(np.subtract(s, alone))) for s in scored]


def test_the_transformers_engine_counts_a_waiting_prompts_lookups_once(tiny_qwen2_dir: Path) -> None:
    """transformers' scheduler searches the prefix cache for a waiting request at each pass until there is room
    for it: each search was counted, and under memory pressure the queried tokens read ~48 times too many."""
    from qwen_api.engine.transformers_engine import TransformersEngine

    settings = Settings(model=str(tiny_qwen2_dir), engine="transformers", max_batch_size=2, dtype="float32")
    engine = default_loader(settings, resolve_model(settings.model))().engine
    assert isinstance(engine, TransformersEngine)
    try:
        cache = engine._manager.batch_processor.cache
        for _ in range(3):  # as the scheduler does while the request waits
            cache.search_prefix_match("seq-waiting", list(range(100, 400)))
        cache.free_blocks("seq-waiting")
        assert engine.stats().prefix_queried_tokens == 300
    finally:
        engine.shutdown()
