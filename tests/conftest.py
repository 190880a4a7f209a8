"""Shared fixtures: real models built or shipped offline, and real servers on free loopback ports.

- `tiny_qwen2_dir`: a random-weight Qwen2ForCausalLM (2 layers) with Qwen2-7B-Instruct's real tokenizer and
  chat template, so the exact Qwen2 path runs without the 15 GB weights.
- `tiny_server`: that model served in-process by uvicorn, so tests can also read the engine's own stats.
- `demo_server`: `qwen-api serve --model demo` as a subprocess: the real CLI on the real SmolLM2 model.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
import uvicorn

from qwen_api.admission import Admission
from qwen_api.api.app import create_app, observe_with
from qwen_api.engine.loading import resolve_model
from qwen_api.runtime import Runtime, default_loader
from qwen_api.server import Server, bounded_http
from qwen_api.settings import Settings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
if not torch.cuda.is_available():
    # Where no GPU exists, the Triton kernels run through Triton's interpreter (the `triton_interpret` tests).
    # Set before anything imports triton: it decides at import and at each kernel's decoration.
    os.environ.setdefault("TRITON_INTERPRET", "1")
REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """GPU tests run only where CUDA exists, and the Triton-interpreter tests only where it does not (there the
    GPU tests run the compiled kernels); the others are deselected, and the summary says how many."""
    if torch.cuda.is_available():
        marker, why = "triton_interpret", "a CUDA device runs the compiled kernels here (`pytest -m gpu`)"
    else:
        marker, why = "gpu", "no CUDA device here (run `pytest -m gpu` on one)"
    dropped = [item for item in items if item.get_closest_marker(marker)]
    if dropped:
        items[:] = [item for item in items if not item.get_closest_marker(marker)]
        config.hook.pytest_deselected(items=dropped)
        config._qwen_api_deselected = f"{len(dropped)} {marker} test(s) deselected: {why}"  # type: ignore[attr-defined]


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, config: pytest.Config) -> None:
    if line := getattr(config, "_qwen_api_deselected", ""):
        terminalreporter.write_line(line)


_SDK_CLIENTS: dict[str, Any] = {}


def sdk(cls: Any, **kwargs: Any) -> Any:
    """One synchronous SDK client (openai.OpenAI, anthropic.Anthropic) per class and arguments for the session, closed
    when it ends: a client per call would leave its sockets to the garbage collector, a ResourceWarning (an error)."""
    key = f"{cls.__module__}.{cls.__qualname__}{sorted(kwargs.items())!r}"
    if key not in _SDK_CLIENTS:
        _SDK_CLIENTS[key] = cls(**kwargs)
    return _SDK_CLIENTS[key]


@pytest.fixture(scope="session", autouse=True)
def _close_sdk_clients() -> Iterator[None]:
    yield
    for client in _SDK_CLIENTS.values():
        client.close()
    _SDK_CLIENTS.clear()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_healthy(base_url: str, timeout: float = 180.0, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before becoming healthy")
        try:
            if httpx.get(f"{base_url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{base_url} did not become healthy in {timeout} s")


@dataclass
class LiveServer:
    base_url: str
    runtime: Runtime | None = None


@pytest.fixture(scope="session")
def tiny_qwen2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from qwen_api.dev.random_qwen2 import write_random_qwen2

    return write_random_qwen2(tmp_path_factory.mktemp("tiny-qwen2"), shape="tiny")


def sse_events(response: httpx.Response, done: bool = False) -> list[tuple[str | None, dict[str, Any]]]:
    """(event name, data) of every SSE event with JSON data. OpenAI's chat and completions streams end with a
    `data: [DONE]` line (`done`); the other dialects must send none, which this asserts."""
    events: list[tuple[str | None, dict[str, Any]]] = []
    name = None
    for line in response.iter_lines():
        if line == "data: [DONE]":
            assert done, "a [DONE] line in a stream that has none"
        elif line.startswith("event: "):
            name = line.removeprefix("event: ")
        elif line.startswith("data: "):
            events.append((name, json.loads(line.removeprefix("data: "))))
            name = None
    return events


class InProcessServer:
    """qwen-api's server (uvicorn plus drain and fatal exit) serving create_app(...) on a thread."""

    def __init__(self, settings: Settings, runtime: Runtime) -> None:
        self.settings, self.runtime = settings, runtime
        self.admission = Admission(settings.admission_capacity())
        app = create_app(settings, runtime, self.admission)
        http = bounded_http(settings.max_connections, settings.header_timeout)
        config = uvicorn.Config(app, host="127.0.0.1", port=settings.port, log_level="warning", http=http)
        self.server = Server(config, runtime, self.admission, settings.drain_timeout)
        runtime.connect(on_ready=observe_with(app.state.metrics), on_fatal=self.server.request_exit)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.base_url = f"http://127.0.0.1:{settings.port}"

    def __enter__(self) -> InProcessServer:
        self.thread.start()
        wait_healthy(self.base_url, timeout=120)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


ENGINES = ["transformers", "llamacpp", "native"]


def engine_model(engine: str, tiny_qwen2_dir: Path) -> Path:
    """The model each engine's shared tests run on: the tiny Qwen2 (transformers, native), the demo GGUF (llama.cpp)."""
    if engine == "llamacpp":
        demo = resolve_model("demo")
        assert demo.gguf_file is not None
        return demo.path / demo.gguf_file
    return tiny_qwen2_dir


def serve_engine(engine: str, tiny_qwen2_dir: Path, **overrides: object) -> InProcessServer:
    return serve_in_process(engine_model(engine, tiny_qwen2_dir), engine=engine, **overrides)


def serve_in_process(model_dir: Path, **overrides: object) -> InProcessServer:
    settings = Settings(model=str(model_dir), port=free_port(), **overrides)  # type: ignore[arg-type]
    source = resolve_model(settings.model)
    return InProcessServer(settings, Runtime(default_loader(settings, source), source.name))


# The functions the tool tests of every dialect offer, by name: their argument schemas (each dialect's tests wrap
# them in its own tool shape) and the weather one's description.
TOOL_SCHEMAS: dict[str, dict[str, Any]] = {
    "get_weather": {
        "type": "object",
        "properties": {
            "city": {"type": "string", "maxLength": 20},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
        },
        "required": ["city", "unit"],
        "additionalProperties": False,
    },
    "get_time": {
        "type": "object",
        "properties": {"zone": {"type": "string", "maxLength": 12}},
        "required": ["zone"],
        "additionalProperties": False,
    },
}
WEATHER_DESCRIPTION = "The weather in a city."


# What the scripted model answers to any chat prompt: CJK, emoji split across byte tokens, a multi-token stop.
SCRIPT = "你好，世界！🦜🧬 The answer is 42. <<STOP>> then more words"


@pytest.fixture(scope="session")
def scripted_qwen2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from qwen_api.dev.random_qwen2 import write_scripted_qwen2

    return write_scripted_qwen2(tmp_path_factory.mktemp("scripted-qwen2"), SCRIPT)


@pytest.fixture(scope="session")
def scripted_server(scripted_qwen2_dir: Path) -> Iterator[InProcessServer]:
    with serve_in_process(scripted_qwen2_dir) as server:
        yield server


@pytest.fixture(scope="session")
def tiny_server(tiny_qwen2_dir: Path) -> Iterator[InProcessServer]:
    """The tiny Qwen2 on the transformers engine: for tests of Qwen2 specifics (template, tokenizer)."""
    with serve_in_process(tiny_qwen2_dir, max_num_return_sequences=4, max_new_tokens_limit=2048) as server:
        yield server


@pytest.fixture(scope="session", params=ENGINES)
def api_server(request: pytest.FixtureRequest, tiny_qwen2_dir: Path) -> Iterator[InProcessServer]:
    """One server per engine: the tests that take it are the engine-independent API suite."""
    if request.param == "transformers":
        yield request.getfixturevalue("tiny_server")
        return
    with serve_engine(request.param, tiny_qwen2_dir, max_num_return_sequences=4, max_new_tokens_limit=2048) as server:
        yield server


@pytest.fixture(scope="session")
def demo_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    port = free_port()
    log = open(tmp_path_factory.mktemp("demo") / "server.log", "wb")  # noqa: SIM115 (closed at teardown)
    env = {**os.environ, "QWEN_API_PORT": str(port), "QWEN_API_HOST": "127.0.0.1"}
    proc = subprocess.Popen(
        # The transformers engine: its fp32 kernels answer the greedy France question with "Paris"; llama.cpp's
        # Q4_1 x Q8 kernels take the near-tie first token the other way (test_llamacpp_engine checks fidelity).
        [str(VENV_BIN / "qwen-api"), "serve", "--model", "demo", "--engine", "transformers", "--log-level", "warning"],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    base_url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(base_url, timeout=240, proc=proc)
        yield LiveServer(base_url)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)
        log.close()
