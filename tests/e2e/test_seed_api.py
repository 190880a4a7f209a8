"""Contract tests for the seed API against a real server (tiny real Qwen2 model, real HTTP on loopback)."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import httpx
import pytest

from qwen_api.engine.loading import resolve_model
from qwen_api.runtime import Runtime, default_loader
from qwen_api.settings import Settings

from conftest import ENGINES, InProcessServer, free_port, serve_engine, serve_in_process

SPEC_DEFAULTS = {"max_length": 512, "temperature": 0.7, "top_p": 0.9, "top_k": 50, "num_return_sequences": 1}


def post(server: InProcessServer, body: object, **kwargs: object) -> httpx.Response:
    return httpx.post(f"{server.base_url}/generate", json=body, timeout=120, **kwargs)  # type: ignore[arg-type]


def test_root_reports_the_served_model(api_server: InProcessServer) -> None:
    r = httpx.get(f"{api_server.base_url}/")
    assert r.status_code == 200
    assert r.json() == {
        "name": "Qwen2-7B-Instruct API",
        "version": "1.0.0",
        "status": "active",
        "model": api_server.runtime.model_name,
    }
    assert api_server.runtime.model_name in ("tiny-qwen20", "SmolLM2-135M-Instruct.Q4_1")


def test_health_is_healthy_once_loaded(api_server: InProcessServer) -> None:
    r = httpx.get(f"{api_server.base_url}/health")
    assert (r.status_code, r.json()) == (200, {"status": "healthy"})


def test_generate_with_only_a_prompt_echoes_every_default(api_server: InProcessServer) -> None:
    r = post(api_server, {"prompt": "用 Python 编写一个计算斐波那契数列的函数", "max_length": 8})
    assert r.status_code == 200
    body = r.json()
    assert set(body) == {"generated_texts", "parameters"}
    assert len(body["generated_texts"]) == 1 and isinstance(body["generated_texts"][0], str)
    expected = {**SPEC_DEFAULTS, "prompt": "用 Python 编写一个计算斐波那契数列的函数", "max_length": 8}
    assert body["parameters"] == expected


def test_answer_holds_only_new_tokens_and_max_length_counts_new_tokens(tiny_server: InProcessServer) -> None:
    generator = tiny_server.runtime.generator()
    prompt = "Please repeat this long sentence back to me, word for word, exactly as written here."
    prompt_ids = generator.chat_prompt_ids([{"role": "user", "content": prompt}])
    # The exact Qwen2 ChatML framing, with the default system prompt, ends with the assistant's opener.
    assert generator.tokenizer.decode(prompt_ids) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        f"<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"
    )
    r = post(tiny_server, {"prompt": prompt, "max_length": 6, "temperature": 0})
    text = r.json()["generated_texts"][0]
    assert prompt not in text and "<|im_start|>" not in text
    # 6 new tokens at most (random weights rarely pick <|im_end|>), never the prompt's 50-odd tokens.
    assert 1 <= len(generator.text_prompt_ids(text)) <= 6 + 2  # re-encoding may merge or split a little


def test_temperature_zero_is_greedy_and_repeatable(api_server: InProcessServer) -> None:
    body = {"prompt": "Count to ten.", "max_length": 12, "temperature": 0, "num_return_sequences": 2}
    first, second = post(api_server, body).json(), post(api_server, body).json()
    texts = first["generated_texts"] + second["generated_texts"]
    assert len(texts) == 4 and len(set(texts)) == 1


def test_num_return_sequences_gives_independent_samples(api_server: InProcessServer) -> None:
    body = {"prompt": "Say something.", "max_length": 12, "temperature": 1.0, "top_k": 0, "top_p": 1.0}
    r = post(api_server, {**body, "num_return_sequences": 3})
    assert r.status_code == 200
    texts = r.json()["generated_texts"]
    # Random weights spread probability over 152k tokens: three 12-token samples cannot all coincide.
    assert len(texts) == 3 and len(set(texts)) == 3
    assert r.json()["parameters"]["top_k"] == 0


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({}, "prompt"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": 3}, "prompt"),
        ({"prompt": "hi", "max_length": 0}, "max_length"),
        ({"prompt": "hi", "max_length": "many"}, "max_length"),
        ({"prompt": "hi", "max_length": 2049}, "max_length"),  # above this server's cap of 2048
        ({"prompt": "hi", "temperature": -0.1}, "temperature"),
        ({"prompt": "hi", "temperature": 2.5}, "temperature"),
        ({"prompt": "hi", "top_p": 0}, "top_p"),
        ({"prompt": "hi", "top_p": 1.01}, "top_p"),
        ({"prompt": "hi", "top_k": -1}, "top_k"),
        ({"prompt": "hi", "num_return_sequences": 0}, "num_return_sequences"),
        ({"prompt": "hi", "num_return_sequences": 5}, "num_return_sequences"),  # above this server's cap of 4
        ({"prompt": "hi", "stream_please": True}, "stream_please"),
    ],
)
def test_invalid_request_is_422_naming_the_field(api_server: InProcessServer, body: dict, field: str) -> None:
    r = post(api_server, body)
    assert r.status_code == 422, r.text
    detail = r.json()["detail"]
    assert isinstance(detail, list) and detail
    assert any(e["loc"][-1] == field and e["msg"] for e in detail), detail


@pytest.mark.parametrize("raw", [b"{not json", b'{"prompt": "hi", "temperature": NaN}', b'["prompt"]', b"{}" * 3])
def test_malformed_body_is_422(api_server: InProcessServer, raw: bytes) -> None:
    r = httpx.post(f"{api_server.base_url}/generate", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 422, r.text
    assert isinstance(r.json()["detail"], list)


def test_body_that_is_not_utf8_is_400_with_a_detail(api_server: InProcessServer) -> None:
    raw = b'{"prompt": "\xff\xfe"}'
    r = httpx.post(f"{api_server.base_url}/generate", content=raw, headers={"content-type": "application/json"})
    assert (r.status_code, r.json()) == (400, {"detail": "There was an error parsing the body"})


def test_prompt_beyond_the_context_is_422_naming_both_numbers(tiny_qwen2_dir: Path) -> None:
    with serve_in_process(tiny_qwen2_dir, kv_cache_tokens=1024) as server:
        r = httpx.post(f"{server.base_url}/generate", json={"prompt": "hello " * 1100, "max_length": 16}, timeout=60)
        assert r.status_code == 422
        [error] = r.json()["detail"]
        assert error["loc"] == ["body", "prompt"]
        prompt_tokens = error["input"]
        assert prompt_tokens > 1024
        assert f"{prompt_tokens} tokens" in error["msg"] and "16 new tokens" in error["msg"]
        assert "1024" in error["msg"]
        # The server is unharmed: a prompt that fits still works.
        ok = httpx.post(f"{server.base_url}/generate", json={"prompt": "hi", "max_length": 4}, timeout=60)
        assert ok.status_code == 200


@pytest.mark.parametrize("engine", ENGINES)
def test_concurrent_requests_all_succeed_and_share_engine_steps(engine: str, tiny_qwen2_dir: Path) -> None:
    with serve_engine(engine, tiny_qwen2_dir) as server:
        engine = server.runtime.generator().engine
        assert engine.stats().peak_batch_size == 0

        async def run() -> list[httpx.Response]:
            async with httpx.AsyncClient(base_url=server.base_url, timeout=120) as client:
                return await asyncio.gather(
                    *[client.post("/generate", json={"prompt": f"Request {i}", "max_length": 48}) for i in range(16)]
                )

        responses = asyncio.run(run())
        assert [r.status_code for r in responses] == [200] * 16
        assert all(len(r.json()["generated_texts"]) == 1 for r in responses)
        stats = engine.stats()
        # Proof from the engine's scheduler: some forward step carried several sequences at once.
        assert stats.peak_batch_size > 1, stats
        assert stats.running == 0


def test_503_while_the_model_loads_then_healthy(tiny_qwen2_dir: Path) -> None:
    settings = Settings(model=str(tiny_qwen2_dir), port=free_port())
    source = resolve_model(settings.model)
    real_loader = default_loader(settings, source)
    release = threading.Event()

    def slow_loader():  # the real loader, held back until the test has looked at the loading state
        assert release.wait(timeout=60)
        return real_loader()

    server = InProcessServer(settings, Runtime(slow_loader, source.name))
    server.thread.start()
    try:
        base = server.base_url
        for _ in range(100):
            try:
                r = httpx.get(f"{base}/health")
                break
            except httpx.ConnectError:
                threading.Event().wait(0.1)
        assert (r.status_code, r.json()) == (503, {"detail": "Model or tokenizer not loaded"})
        g = httpx.post(f"{base}/generate", json={"prompt": "hi"})
        assert (g.status_code, g.json()) == (503, {"detail": "Model or tokenizer not loaded"})
        assert r.headers["retry-after"] == g.headers["retry-after"] == "5"  # loading passes: try again soon
        assert httpx.get(f"{base}/").status_code == 200
        release.set()
        asyncio.run(asyncio.sleep(0))
        for _ in range(300):
            if httpx.get(f"{base}/health").status_code == 200:
                break
            threading.Event().wait(0.1)
        assert httpx.get(f"{base}/health").json() == {"status": "healthy"}
    finally:
        release.set()
        server.__exit__()


def test_engine_failure_is_500_generation_failed_then_503(tiny_qwen2_dir: Path) -> None:
    with serve_in_process(tiny_qwen2_dir) as server:
        engine = server.runtime.generator().engine

        def injected_fault(module: object, args: object) -> None:  # a real forward pass that fails
            raise RuntimeError("injected fault")

        engine.model.register_forward_pre_hook(injected_fault)
        r = post(server, {"prompt": "hi", "max_length": 4})
        assert r.status_code == 500
        assert r.json()["detail"].startswith("Generation failed: ")
        assert "injected fault" in r.json()["detail"]
        # This engine cannot step any more: health says so and new requests are refused as not loaded.
        h = httpx.get(f"{server.base_url}/health")
        assert (h.status_code, h.json()) == (503, {"detail": "Model or tokenizer not loaded"})
        assert post(server, {"prompt": "hi"}).status_code == 503
        for _ in range(50):  # the watchdog marks the engine dead within a period (and the server then exits)
            if server.runtime.state == "dead":
                break
            threading.Event().wait(0.1)
        assert server.runtime.retry_after is None  # no retry will help this process: its 503s say none
