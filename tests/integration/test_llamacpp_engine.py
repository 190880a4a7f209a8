"""What is particular to the llama.cpp engine: when `auto` picks it, and fidelity to llama.cpp's own decoding.

The shared API suite (fixtures `api_server`, `long_server` and the `engine` parameter) already runs every
engine-independent test on both engines; this file holds the rest.
"""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path
from typing import Any

import pytest

from qwen_api.engine.base import SamplingParams, common_prefix_len
from qwen_api.engine.llamacpp_engine import safe_model_params
from qwen_api.engine.loading import resolve_model
from qwen_api.runtime import choose_engine, default_loader
from qwen_api.settings import Settings

from conftest import VENV_BIN, free_port, wait_healthy


def test_auto_picks_llamacpp_for_gguf_on_cpu_and_transformers_otherwise(tiny_qwen2_dir: Path) -> None:
    demo, tiny = resolve_model("demo"), resolve_model(str(tiny_qwen2_dir))
    assert choose_engine("auto", demo, "cpu") == "llamacpp"
    assert choose_engine("auto", demo, "cuda") == "transformers"
    assert choose_engine("auto", tiny, "cpu") == "transformers"
    assert choose_engine("transformers", demo, "cpu") == "transformers"


def test_llamacpp_engine_refuses_what_it_cannot_serve(tiny_qwen2_dir: Path) -> None:
    settings = Settings(model=str(tiny_qwen2_dir), engine="llamacpp")
    with pytest.raises(ValueError, match="GGUF"):
        default_loader(settings, resolve_model(settings.model))()


def test_greedy_tokens_match_llama_cpp_python_itself() -> None:
    """Batched serving must not change what llama.cpp computes for one sequence."""
    import llama_cpp

    demo = resolve_model("demo")
    assert demo.gguf_file is not None
    generator = default_loader(Settings(model="demo", engine="llamacpp", max_batch_size=4), demo)()
    try:
        prompt = generator.chat_prompt_ids([{"role": "user", "content": "What is the capital of France?"}])
        # The same model parameters as our engine (no AMX: it dies with SIGILL on the team's VMs).
        original = llama_cpp.llama_cpp.llama_model_default_params
        llama_cpp.llama_cpp.llama_model_default_params = lambda: safe_model_params(original)
        try:
            reference = llama_cpp.Llama(str(demo.path / demo.gguf_file), n_ctx=512, verbose=False)
        finally:
            llama_cpp.llama_cpp.llama_model_default_params = original
        expected: list[int] = []
        for token in reference.generate(prompt, top_k=1, temp=0):
            expected.append(int(token))
            if len(expected) == 16 or token == reference.token_eos():
                break

        async def ours(n: int) -> list[list[int]]:
            async def one() -> list[int]:
                chunks = generator.engine.generate(prompt, SamplingParams(max_new_tokens=16, temperature=0))
                return [t async for chunk in chunks for t in chunk.token_ids]

            return await asyncio.gather(*[one() for _ in range(n)])

        assert asyncio.run(ours(1)) == [expected]
        # Each sequence has its own KV stream: copies decoded together in one batch stay token-identical.
        assert asyncio.run(ours(3)) == [expected] * 3
    finally:
        generator.engine.shutdown()


def test_demo_serves_with_llamacpp_by_default(tmp_path: Path) -> None:
    port, log = free_port(), tmp_path / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [str(VENV_BIN / "qwen-api"), "serve", "--model", "demo", "--host", "127.0.0.1", "--port", str(port)],
            stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
        try:
            wait_healthy(f"http://127.0.0.1:{port}", timeout=120, proc=proc)
        finally:
            proc.terminate()
            assert proc.wait(timeout=60) == 0
    assert "(llama.cpp engine)" in log.read_text()


def _slot_order_recorder(engine: Any) -> list[list[int]]:
    """Wrap the engine's llama_decode: record each batch's sequence ids, in batch order."""
    seen: list[list[int]] = []
    decode = engine._ctx.decode

    def recorded(batch: Any) -> None:
        raw = batch.batch
        seen.append([raw.seq_id[i][0] for i in range(raw.n_tokens)])
        decode(batch)

    engine._ctx.decode = recorded
    return seen


def _tokens(engine: Any, prompt: list[int], max_new_tokens: int) -> Any:
    async def run() -> list[int]:
        stream = engine.generate(prompt, SamplingParams(max_new_tokens=max_new_tokens, temperature=0))
        return [t async for chunk in stream for t in chunk.token_ids]

    return run()


def test_running_sequences_stay_in_the_lowest_slots_and_a_move_keeps_their_tokens() -> None:
    """llama.cpp decodes a batch over KV streams in one pass only when its sequence ids run consecutively in batch
    order. When a sequence in a low slot ends, the highest one moves into its slot (a stream copy): every decode's
    ids stay 0..n-1 in order, and the moved sequence's tokens are those it gives alone."""
    settings = Settings(model="demo", engine="llamacpp", max_batch_size=4, prefix_cache=False)
    generator = default_loader(settings, resolve_model("demo"))()
    engine = generator.engine
    try:
        short, first, second = (
            generator.chat_prompt_ids([{"role": "user", "content": text}])
            for text in ("Count from one to fifty.", "Write a long story about a fox.", "Describe Paris in detail.")
        )
        seen = _slot_order_recorder(engine)

        async def together() -> tuple[list[int], list[int]]:
            stream = engine.generate(short, SamplingParams(max_new_tokens=6, temperature=0))
            await anext(stream)  # the short sequence holds slot 0 before the long ones arrive
            rest = asyncio.gather(_tokens(engine, first, 40), _tokens(engine, second, 40))
            async for _ in stream:
                pass
            one, two = await rest
            return one, two

        one, two = asyncio.run(together())
        assert engine.moved_sequences >= 1  # the short one ended in slot 0, below the two long ones
        for ids in seen:
            assert ids == sorted(ids) and sorted(set(ids)) == list(range(len(set(ids)))), ids
        alone = [asyncio.run(_tokens(engine, prompt, 40)) for prompt in (first, second)]
        assert [one, two] == alone and len(one) == len(two) == 40
    finally:
        engine.shutdown()


def test_a_free_slots_cached_prefix_is_copied_into_the_lowest_slot() -> None:
    """A new prompt takes the lowest free slot; when another free slot's cells share a long prefix with it, they are
    copied over and not read again. The answer is the one the same cache gives in place."""
    history = " ".join(f"Fact {n}: the number {n} follows {n - 1}." for n in range(1, 40))
    settings = Settings(model="demo", engine="llamacpp", max_batch_size=4)

    def prompts(generator: Any) -> tuple[list[int], list[int], list[int]]:
        other = generator.chat_prompt_ids([{"role": "user", "content": "Write a long story about a fox."}])
        cached = generator.chat_prompt_ids([{"role": "user", "content": history + " What follows 39?"}])
        follow = generator.chat_prompt_ids([{"role": "user", "content": history + " What follows 12?"}])
        return other, cached, follow

    copied = default_loader(settings, resolve_model("demo"))()
    try:
        other, cached, follow = prompts(copied)

        async def two_slots() -> None:
            # `other` holds slot 0 and outlives `cached` in slot 1, so `cached`'s cells stay in slot 1.
            stream = copied.engine.generate(other, SamplingParams(max_new_tokens=40, temperature=0))
            await anext(stream)
            await _tokens(copied.engine, cached, 4)
            async for _ in stream:
                pass

        asyncio.run(two_slots())
        seen, before = _slot_order_recorder(copied.engine), copied.engine.reused_tokens
        via_copy = asyncio.run(_tokens(copied.engine, follow, 12))
        assert {i for ids in seen for i in ids} == {0}  # it ran in slot 0, on slot 1's cells
        assert copied.engine.reused_tokens - before >= common_prefix_len(cached, follow) > 100
        # The cells slot 0 held before (`other`'s) went to another free slot instead of being lost.
        assert any(cells.tokens[: len(other)] == other for cells in copied.engine._free.values())
    finally:
        copied.engine.shutdown()
    in_place = default_loader(settings, resolve_model("demo"))()
    try:
        _, cached, follow = prompts(in_place)
        asyncio.run(_tokens(in_place.engine, cached, 4))  # slot 0 holds `cached`, the same cells as above
        assert asyncio.run(_tokens(in_place.engine, follow, 12)) == via_copy
    finally:
        in_place.engine.shutdown()
