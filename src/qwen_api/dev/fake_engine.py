"""A fake engine that honours the engine contract, for fast tests of the layers above it (text, guards, HTTP).

It decodes nothing: each sequence yields a scripted list of token ids, one chunk per token, at a chosen pace,
then finishes with "stop" (the script ran out) or "length" (`max_new_tokens` reached first). Asked for
log-probabilities, token i gets -(i + 1) / 8, and its alternatives are the next script tokens, each less likely.
Faults are injected on demand: fail a sequence after k tokens, or kill the whole engine. It counts what a test
needs to see: open sequences, steps, peak batch, and what each sequence was asked. Never used to serve; real
engines are tested on real models.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Callable
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
)


@dataclass
class FakeEngine:
    """Scripted tokens at a controllable pace, with injectable faults."""

    script: list[int]
    pace: float = 0.0  # seconds before each token
    max_context_tokens: int = 4096
    vocab_size: int = 1 << 20
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
                last = i == min(params.max_new_tokens, len(self.script)) - 1
                reason: FinishReason | None = None
                if last:
                    reason = "length" if params.max_new_tokens <= len(self.script) else "stop"
                yield TokenChunk([self.script[i]], reason, self._logprobs(i, params.logprobs))
        finally:
            self.open -= 1

    def _logprobs(self, i: int, top: int | None) -> tuple[TokenLogprob, ...] | None:
        if top is None:
            return None
        lp = -(i + 1) / 8
        alternatives = tuple((self.script[(i + k) % len(self.script)], lp - k) for k in range(top))
        return (TokenLogprob(self.script[i], lp, alternatives),)

    def kill(self, why: str = "injected death") -> None:
        self._dead = why

    def is_healthy(self) -> bool:
        return self._dead is None

    def stats(self) -> EngineStats:
        return EngineStats(running=self.open, waiting=0, active=self.open, steps=self.steps, peak_batch_size=self.peak)

    def shutdown(self) -> None:
        self._dead = self._dead or "shut down"
