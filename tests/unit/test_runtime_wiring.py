"""The runtime's collaborators are named where it is built: constructor hooks, or `connect` once, before start."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from qwen_api.api.app import create_app, observe_with
from qwen_api.dev.fake_engine import FakeEngine
from qwen_api.dev.random_qwen2 import build_qwen2_tokenizer
from qwen_api.runtime import Runtime
from qwen_api.settings import Settings
from qwen_api.textgen import TextGenerator

TOKENIZER = build_qwen2_tokenizer()


def loaded(runtime: Runtime) -> None:
    async def main() -> None:
        runtime.start()
        await runtime.wait_ready()
        await runtime.close()

    asyncio.run(main())


def test_constructor_hooks_see_the_generator_before_it_is_served_and_a_failed_load() -> None:
    generator = TextGenerator(FakeEngine([1]), TOKENIZER)
    seen: list[tuple[TextGenerator, str]] = []
    runtime = Runtime(lambda: generator, "m", on_ready=lambda g: seen.append((g, runtime.state)))
    loaded(runtime)
    assert seen == [(generator, "loading")]  # before the runtime reports "ready"

    def broken() -> TextGenerator:
        raise OSError("no weights")

    fatal: list[int] = []
    failing = Runtime(broken, "m", on_fatal=lambda: fatal.append(failing.exit_code))
    loaded(failing)
    assert fatal == [1] and failing.state == "failed"


def test_connect_names_each_hook_once_and_only_before_start() -> None:
    runtime = Runtime(lambda: TextGenerator(FakeEngine([1]), TOKENIZER), "m", on_fatal=lambda: None)
    with pytest.raises(RuntimeError, match="on_fatal is already connected"):
        runtime.connect(on_fatal=lambda: None)
    runtime.connect(on_ready=lambda g: None)
    with pytest.raises(RuntimeError, match="on_ready is already connected"):
        runtime.connect(on_ready=lambda g: None)
    fresh = Runtime(lambda: TextGenerator(FakeEngine([1]), TOKENIZER), "m")
    loaded(fresh)
    with pytest.raises(RuntimeError, match="after start"):
        fresh.connect(on_fatal=lambda: None)


def test_create_app_attaches_nothing_and_observe_with_wires_the_metrics() -> None:
    settings = Settings()
    plain_generator = TextGenerator(FakeEngine([1]), TOKENIZER)
    plain = Runtime(lambda: plain_generator, "m")
    create_app(settings, plain)
    loaded(plain)
    assert plain_generator.observer is None and plain_generator.engine.on_step is None

    observed_generator = TextGenerator(FakeEngine([1]), TOKENIZER)
    observed = Runtime(lambda: observed_generator, "m")
    app = create_app(settings, observed)
    observed.connect(on_ready=observe_with(app.state.metrics))
    loaded(observed)
    metrics = app.state.metrics
    assert observed_generator.observer is metrics
    assert observed_generator.engine.on_step == metrics.batch_size.observe


def test_an_engine_on_a_gpu_gets_the_gil_back_within_half_a_millisecond(monkeypatch: pytest.MonkeyPatch) -> None:
    """CPython's default 5 ms switch interval would hold a GPU engine's worker (back from a CUDA synchronize) behind
    a busy event loop for up to a whole decode step (`bench/stream_overhead.py --host-ms` measures it): loading an
    engine on CUDA shortens it for the process; on the CPU it stays as it was."""
    import sys

    import qwen_api.runtime as runtime_module
    from qwen_api.engine.base import WORKER_SWITCH_INTERVAL_S
    from qwen_api.engine.loading import ModelSource

    loaded_on: list[str] = []

    def fake_native(settings: Settings, source: ModelSource, device: str) -> TextGenerator:
        loaded_on.append(device)
        return TextGenerator(FakeEngine([1]), TOKENIZER)

    monkeypatch.setattr(runtime_module, "choose_engine", lambda *args: "native")
    monkeypatch.setattr(runtime_module, "_load_native", fake_native)
    source = ModelSource(name="m", path=Path("/nowhere"), gguf_file=None)
    before = sys.getswitchinterval()
    try:
        for device, expected in (("cpu", 0.005), ("cuda:0", WORKER_SWITCH_INTERVAL_S)):
            sys.setswitchinterval(0.005)
            monkeypatch.setattr(runtime_module, "pick_device", lambda requested, device=device: device)
            runtime_module.default_loader(Settings(), source)()
            assert sys.getswitchinterval() == pytest.approx(expected), device
        assert loaded_on == ["cpu", "cuda:0"]
        assert WORKER_SWITCH_INTERVAL_S <= 0.001
    finally:
        sys.setswitchinterval(before)


def test_vllm_running_requests_are_those_in_the_batch_not_the_queue() -> None:
    """vLLM's `num_requests_running` counts its batch; ours counted every unfinished sequence, queued ones too, so
    a gateway or autoscaler reading both gauges saw the queue twice (8 running and 4 waiting for 4 in the batch)."""
    from qwen_api.engine.base import EngineStats
    from qwen_api.metrics import Metrics

    stats = EngineStats(running=8, waiting=4, active=4, steps=10, peak_batch_size=4)
    text = Metrics(lambda: stats, lambda: 8, lambda: "m").render().decode()
    assert 'vllm:num_requests_running{model_name="m"} 4.0' in text
    assert 'vllm:num_requests_waiting{model_name="m"} 4.0' in text
    assert "qwen_api_running_sequences 8.0" in text  # ours keeps its documented meaning: every unfinished sequence


def test_shutdown_waits_for_a_worker_mid_step_however_long(caplog: pytest.LogCaptureFixture) -> None:
    """An engine's shutdown joined its worker for 10 s and went on: the llama.cpp worker, mid-step on a loaded
    machine, then decoded on a model the interpreter's teardown freed (SIGSEGV). It now waits for the step to end,
    saying so as it waits."""
    import threading
    import time

    from qwen_api.engine.base import join_worker

    release = threading.Event()
    worker = threading.Thread(target=release.wait, args=(5,))
    worker.start()
    threading.Timer(0.35, release.set).start()
    started = time.monotonic()
    join_worker(worker, "test engine shutdown", report_every=0.1)
    assert not worker.is_alive() and time.monotonic() - started >= 0.3
    waits = [r.getMessage() for r in caplog.records if "still waiting for its worker" in r.getMessage()]
    assert len(waits) >= 2 and waits[0].startswith("test engine shutdown")
