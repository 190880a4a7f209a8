"""A fake engine that honours the engine contract, for fast tests of the layers above it (text, guards, HTTP).

It decodes nothing: each sequence yields a scripted list of token ids, one chunk per token, at a chosen pace,
then finishes with "stop" (the script ran out) or "length" (`max_new_tokens` reached first). Asked for
log-probabilities, token i gets -(i + 1) / 8, and its alternatives are the next script tokens, each less likely.
Faults are injected on demand: fail a sequence after k tokens, or kill the whole engine. It counts what a test
needs to see: open sequences, steps, peak batch, and what each sequence was asked. Never used to serve; real
engines are tested on real models.

`SteppedFakeEngine` delivers the same scripts the way the engines with a worker thread do (llama.cpp, native):
one thread steps every open sequence together and hands each event loop a step's tokens in one call, and each
sequence reads its queue through `relay`. `bench/stream_overhead.py` measures the layers above an engine on it.
With `host` seconds a step, it also models an overlapped GPU engine's worker: Python work holding the GIL
(scheduling, launching, reading tokens) while the device computes the step, then a wait for the device's `pace`
(the GIL released, as a CUDA synchronize releases it).
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from collections.abc import AsyncGenerator, Callable
from contextlib import aclosing
from dataclasses import dataclass, field

from qwen_api.engine.base import (
    EngineDead,
    EngineError,
    EngineStats,
    FinishReason,
    SamplingParams,
    TokenChunk,
    TokenLogprob,
    check_prompt_ids,
    hand_over,
    relay,
)


@dataclass
class FakeEngine:
    """Scripted tokens at a controllable pace, with injectable faults."""

    script: list[int]
    pace: float = 0.0  # seconds before each token
    max_context_tokens: int = 4096
    vocab_size: int = 1 << 20
    end_token_ids: frozenset[int] = frozenset()
    fail_after: int | None = None  # tokens a sequence yields before it fails with EngineError
    on_step: Callable[[int], None] | None = None
    open: int = 0
    steps: int = 0
    peak: int = 0
    calls: list[tuple[list[int], SamplingParams]] = field(default_factory=list)
    _dead: str | None = None

    async def generate(self, prompt_ids: list[int], params: SamplingParams) -> AsyncGenerator[TokenChunk, None]:
        if self._dead is not None:
            raise EngineDead(self._dead)
        check_prompt_ids(prompt_ids, self.vocab_size)
        self.calls.append((list(prompt_ids), params))
        self.open += 1
        self.peak = max(self.peak, self.open)
        try:
            for i in range(min(params.max_new_tokens, len(self.script))):
                await asyncio.sleep(self.pace)
                if self._dead is not None:
                    raise EngineDead(self._dead)
                if self.fail_after is not None and i >= self.fail_after:
                    raise EngineError("injected fault")
                self.steps += 1
                if self.on_step is not None:
                    self.on_step(self.open)
                chunk = scripted_chunk(self.script, i, params)
                if i == 0 and params.prompt_logprobs is not None:
                    chunk = dataclasses.replace(chunk, prompt_logprobs=scripted_prompt(prompt_ids, params))
                yield chunk
        finally:
            self.open -= 1

    def kill(self, why: str = "injected death") -> None:
        self._dead = why

    def is_healthy(self) -> bool:
        return self._dead is None

    def stats(self) -> EngineStats:
        return EngineStats(running=self.open, waiting=0, active=self.open, steps=self.steps, peak_batch_size=self.peak)

    def shutdown(self) -> None:
        self._dead = self._dead or "shut down"


def scripted_prompt(prompt_ids: list[int], params: SamplingParams) -> tuple[TokenLogprob, ...]:
    """The scripted log-probabilities of a prompt's tokens but the first: -position / 16, and k alternatives."""
    k = params.prompt_logprobs or 0
    return tuple(
        TokenLogprob(t, -i / 16, tuple((prompt_ids[(i + j) % len(prompt_ids)], -i / 16 - j) for j in range(k)))
        for i, t in enumerate(prompt_ids[1:], start=1)
    )


def scripted_chunk(script: list[int], i: int, params: SamplingParams) -> TokenChunk:
    """Token i of a script as a sequence gets it: with its finish reason when it is the last one."""
    reason: FinishReason | None = None
    if i == min(params.max_new_tokens, len(script)) - 1:
        reason = "length" if params.max_new_tokens <= len(script) else "stop"
    logprobs = None
    if params.logprobs is not None:
        lp = -(i + 1) / 8
        alternatives = tuple((script[(i + k) % len(script)], lp - k) for k in range(params.logprobs))
        logprobs = (TokenLogprob(script[i], lp, alternatives),)
    return TokenChunk([script[i]], reason, logprobs)


@dataclass
class _Stepped:
    params: SamplingParams
    loop: asyncio.AbstractEventLoop
    out: asyncio.Queue[TokenChunk | BaseException]
    done: int = 0  # tokens delivered
    cancelled: bool = False


def _hold_gil(seconds: float) -> None:
    """Pure Python work for `seconds` (interruptible only at the interpreter's switch interval, as real work is)."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


class SteppedFakeEngine:
    """Scripted tokens from a worker thread that steps every open sequence together every `pace` seconds (or
    every `host` seconds of Python work, when that is longer)."""

    def __init__(self, script: list[int], pace: float = 0.0, max_context_tokens: int = 4096, host: float = 0.0) -> None:
        self.script, self.pace, self.max_context_tokens, self.host = script, pace, max_context_tokens, host
        self.on_step: Callable[[int], None] | None = None
        self.end_token_ids: frozenset[int] = frozenset()
        self.steps = 0
        self._open: list[_Stepped] = []
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="stepped-fake-engine", daemon=True)
        self._thread.start()

    async def generate(self, prompt_ids: list[int], params: SamplingParams) -> AsyncGenerator[TokenChunk, None]:
        if not self.is_healthy():
            raise EngineDead("the fake engine is shut down")
        check_prompt_ids(prompt_ids, 1 << 20)
        seq = _Stepped(params, asyncio.get_running_loop(), asyncio.Queue())

        def cancel() -> None:
            seq.cancelled = True

        with self._lock:
            self._open.append(seq)
        self._wake.set()
        async with aclosing(relay(seq.out, lambda: None if self.is_healthy() else "shut down", cancel)) as chunks:
            async for chunk in chunks:
                yield chunk

    def _run(self) -> None:
        ready = time.perf_counter()  # when the step "on the device" is done
        while not self._stop.is_set():
            with self._lock:
                self._open = [s for s in self._open if not s.cancelled]
                batch = list(self._open)
            if not batch:
                self._wake.wait(0.1)
                self._wake.clear()
                ready = time.perf_counter()
                continue
            ready += self.pace
            _hold_gil(self.host)  # the host's work on this step, while the device computes it
            time.sleep(max(0.0, ready - time.perf_counter()))
            ready = max(ready, time.perf_counter())
            self.steps += 1
            if self.on_step is not None:
                self.on_step(len(batch))
            deliveries: list[tuple[_Stepped, TokenChunk]] = []
            for seq in batch:
                chunk = scripted_chunk(self.script, seq.done, seq.params)
                seq.done += 1
                if chunk.finish_reason is not None:
                    seq.cancelled = True  # finished: leaves the batch at the next step
                deliveries.append((seq, chunk))
            hand_over(deliveries, lambda d: d[0].loop, _deliver)

    def is_healthy(self) -> bool:
        return not self._stop.is_set()

    def stats(self) -> EngineStats:
        active = len(self._open)
        return EngineStats(running=active, waiting=0, active=active, steps=self.steps, peak_batch_size=active)

    def shutdown(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=5)


def _deliver(items: list[tuple[_Stepped, TokenChunk]]) -> None:
    for seq, chunk in items:
        seq.out.put_nowait(chunk)
