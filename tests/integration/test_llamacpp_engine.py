"""What is particular to the llama.cpp engine: when `auto` picks it, and fidelity to llama.cpp's own decoding.

The shared API suite (fixtures `api_server`, `long_server` and the `engine` parameter) already runs every
engine-independent test on both engines; this file holds the rest.
"""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

import pytest

from qwen_api.engine.base import SamplingParams
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
