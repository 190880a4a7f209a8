"""`--engine-process`: the engine in a child process behind the same contract, on the tiny Qwen2 (native engine).

The server's answers must not change (greedy texts equal the in-process engine's, streamed or not, structured
outputs hold), a cancelled stream frees its slot in the child, a child that dies fails its requests and ends the
server (exit code 1, as an in-process worker's death does), and a model the child cannot load stops the server.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import psutil
import pytest

from qwen_api.engine.base import SamplingParams
from qwen_api.engine.process import ProcessEngine

from conftest import InProcessServer, serve_in_process, serve_subprocess, wait_healthy

PROMPTS = ["Hello there", "Write a haiku about rain.", "What is 2 + 2?", "Name three colours."]


@pytest.fixture(scope="module")
def servers(tiny_qwen2_dir: Path) -> Iterator[tuple[InProcessServer, InProcessServer]]:
    with (
        serve_in_process(tiny_qwen2_dir, engine="native", engine_process=True) as child,
        serve_in_process(tiny_qwen2_dir, engine="native") as here,
    ):
        yield child, here


def served_model(base_url: str) -> str:
    return str(httpx.get(f"{base_url}/v1/models", timeout=10).json()["data"][0]["id"])


def chat(base_url: str, prompt: str, **extra: object) -> dict[str, object]:
    body = {
        "model": served_model(base_url),
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": 24,
        "temperature": 0,
    }
    r = httpx.post(f"{base_url}/v1/chat/completions", json={**body, **extra}, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def test_the_engine_runs_in_a_child_process(servers: tuple[InProcessServer, InProcessServer]) -> None:
    child, _ = servers
    engine = child.runtime.generator().engine
    assert isinstance(engine, ProcessEngine)
    assert engine._process.pid != psutil.Process().pid and engine._process.is_alive()
    assert psutil.Process(engine._process.pid).ppid() == psutil.Process().pid


def test_greedy_answers_equal_the_in_process_engine(servers: tuple[InProcessServer, InProcessServer]) -> None:
    child, here = servers
    for prompt in PROMPTS:
        a, b = chat(child.base_url, prompt), chat(here.base_url, prompt)
        assert a["choices"] == b["choices"]
        assert a["usage"] == b["usage"]


def test_eight_concurrent_streams_through_the_sdk_equal_their_answers_alone(
    servers: tuple[InProcessServer, InProcessServer],
) -> None:
    child, here = servers
    alone = {p: chat(here.base_url, p)["choices"][0]["message"]["content"] for p in PROMPTS}  # type: ignore[index]

    async def stream(client: openai.AsyncOpenAI, prompt: str) -> str:
        parts = []
        events = await client.chat.completions.create(
            model=served_model(child.base_url),
            messages=[{"role": "user", "content": prompt}],
            max_tokens=24,
            temperature=0,
            stream=True,
        )
        async for event in events:
            if event.choices and event.choices[0].delta.content:
                parts.append(event.choices[0].delta.content)
        return "".join(parts)

    async def run() -> list[str]:
        async with openai.AsyncOpenAI(base_url=f"{child.base_url}/v1", api_key="x", max_retries=0) as client:
            return await asyncio.gather(*(stream(client, PROMPTS[i % 4]) for i in range(8)))

    texts = asyncio.run(run())
    assert texts == [alone[PROMPTS[i % 4]] for i in range(8)]
    stats = child.runtime.generator().engine.stats()
    assert stats.peak_batch_size > 1 and stats.steps > 0  # reported by the child: they shared its steps
    metrics = httpx.get(f"{child.base_url}/metrics", timeout=10).text
    count = next(line for line in metrics.splitlines() if line.startswith("qwen_api_batch_size_count"))
    assert float(count.split()[-1]) > 0  # the child's steps reach the server's metrics


def test_a_json_schema_is_enforced_in_the_child(servers: tuple[InProcessServer, InProcessServer]) -> None:
    child, _ = servers
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 8}, "age": {"type": "integer"}},
        "required": ["name", "age"],
        "additionalProperties": False,
    }
    answer = chat(
        child.base_url,
        "Give me a person.",
        max_tokens=64,
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": schema}},
    )
    value = json.loads(answer["choices"][0]["message"]["content"])  # type: ignore[index]
    assert set(value) == {"name", "age"} and isinstance(value["age"], int)


def test_a_cancelled_sequence_leaves_the_child_and_a_bad_one_fails_alone(
    servers: tuple[InProcessServer, InProcessServer],
) -> None:
    engine = servers[0].runtime.generator().engine
    assert isinstance(engine, ProcessEngine)

    async def run() -> str:
        long = engine.generate([1, 2, 3], SamplingParams(max_new_tokens=1000, temperature=0))
        await long.__anext__()
        assert engine.stats().running == 1
        await long.aclose()
        deadline = time.monotonic() + 10
        while engine.stats().active and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        try:
            async for _ in engine.generate([], SamplingParams(max_new_tokens=2)):
                pass
        except Exception as exc:  # the message is what is checked
            return f"{type(exc).__name__}: {exc}"
        return "no error"

    assert asyncio.run(run()) == "EngineError: the prompt is empty: it must hold at least one token"
    stats = engine.stats()
    assert (stats.running, stats.active) == (0, 0)
    assert engine.is_healthy()


def test_a_killed_engine_process_fails_its_stream_and_ends_the_server(tiny_qwen2_dir: Path, tmp_path: Path) -> None:
    proc, url = serve_subprocess(tiny_qwen2_dir, "--engine", "native", "--engine-process", log=tmp_path / "log")
    try:
        wait_healthy(url, timeout=120, proc=proc)
        # The engine's process, not multiprocessing's resource tracker (the server's other child)
        children = [c for c in psutil.Process(proc.pid).children() if "resource_tracker" not in " ".join(c.cmdline())]
        assert len(children) == 1
        body = {"model": served_model(url), "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2000,
                "stream": True}  # fmt: skip
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=60) as r:
            lines = r.iter_lines()
            assert next(line for line in lines if line.startswith("data: {"))
            children[0].terminate()  # SIGTERM: the server, not the signal, decides when the child stops
            time.sleep(1)
            assert children[0].is_running() and next(line for line in lines if line.startswith("data: {"))
            children[0].kill()
            rest = list(lines)
        events = [line for line in rest if line.startswith("data: ")]
        # The stream's rule (api/sse.py): a failure mid-stream is one error event naming it, then [DONE].
        assert events[-1] == "data: [DONE]" and '"error"' in events[-2], events[-3:]
        assert "engine process" in events[-2]
        assert proc.wait(timeout=60) == 1
        assert "the engine process exited" in (tmp_path / "log").read_text()
    finally:
        proc.kill()


def test_a_model_the_engine_process_cannot_load_exits_non_zero(tmp_path: Path) -> None:
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text('{"model_type": "qwen2"}')  # not a loadable model
    proc, _ = serve_subprocess(tmp_path / "model", "--engine-process", log=tmp_path / "log")
    assert proc.wait(timeout=120) == 1
    assert "the engine process failed to load the model" in (tmp_path / "log").read_text()
