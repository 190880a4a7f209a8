"""The engine contract: token ids in, an async stream of token ids out, per sequence.

An engine knows nothing of HTTP, chat templates or text. `generate` starts one sequence and yields
`TokenChunk`s as the engine produces them; closing the iterator early (a client went away, a stop string
matched) cancels the sequence and frees its batch slot. Engines raise the `EngineError` family only.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass
from typing import Any, Literal, Protocol, TypeVar

T = TypeVar("T")

FinishReason = Literal["stop", "length"]


@dataclass(frozen=True)
class SamplingParams:
    """How one sequence is sampled. temperature 0 means greedy; top_k 0 disables top-k.

    A seed makes the sequence's sampling draws its own: the same prompt, parameters and seed give the same
    tokens whatever else shares the batch (up to floating-point differences between batch shapes).
    """

    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    # A grammar the tokens must follow (structured outputs, tool calls): an object with `matcher()`, giving one
    # `TokenMatcher` per sequence. None: unconstrained. An engine that cannot apply it must refuse the sequence.
    constraint: TokenConstraint | None = None


class TokenMatcher(Protocol):
    """One sequence's grammar state: `allowed(width)` is a bool row over the logits (True where a token may come
    next), applied before temperature, top-k, top-p and the draw; `advance(token)` takes the sampled token."""

    def allowed(self, width: int) -> Any: ...

    def advance(self, token: int) -> bool: ...


class TokenConstraint(Protocol):
    def matcher(self) -> TokenMatcher: ...


@dataclass(frozen=True)
class TokenChunk:
    """Tokens produced since the previous chunk; the last chunk of a sequence carries its finish reason."""

    token_ids: list[int]
    finish_reason: FinishReason | None = None


@dataclass(frozen=True)
class EngineStats:
    """A snapshot of the engine's load, read by /health, metrics and tests."""

    running: int  # sequences submitted and not yet finished or cancelled
    waiting: int  # of those, sequences the scheduler has not started yet
    active: int  # sequences holding a batch slot and KV cache in the scheduler
    steps: int  # forward steps run so far
    peak_batch_size: int  # most sequences seen together in one forward step


class EngineError(Exception):
    """Generation failed."""


class EngineDead(EngineError):
    """The engine's worker has died; no request can be served until the process restarts."""


def check_prompt_ids(prompt_ids: list[int], vocab_size: int) -> None:
    """Refuse, for this one sequence, a prompt that would break an engine's batch step for everybody.

    The text layer never sends such a prompt; this is the engines' own guard, so that a bad sequence fails alone
    (an `EngineError` from its `generate`) and the worker that steps every sequence never sees it.
    """
    if not prompt_ids:
        raise EngineError("the prompt is empty: it must hold at least one token")
    if not all(0 <= t < vocab_size for t in prompt_ids):
        raise EngineError(f"the prompt holds a token id outside the vocabulary [0, {vocab_size})")


async def next_output(outputs: asyncio.Queue[T], death: Callable[[], str | None]) -> T:
    """The next item an engine's worker put on one sequence's queue; `EngineDead` if the worker dies first.

    `death()` returns why the worker is gone, or None while it runs; it is asked each second of waiting.
    The wait is `asyncio.timeout`, never `asyncio.wait_for`: on Python 3.11, `wait_for` swallows a
    cancellation that lands in the same loop tick as an item, so a request cancelled for its deadline or
    a departed client went on decoding to its last token (seen in CI: a 0.5 s deadline answered after 60 s).
    """
    while True:
        try:
            async with asyncio.timeout(1.0):
                return await outputs.get()
        except TimeoutError:
            if (why := death()) is not None:
                raise EngineDead(why) from None


class Engine(Protocol):
    """What the HTTP layer may ask of an engine."""

    max_context_tokens: int  # prompt + generated tokens one sequence may hold
    on_step: Callable[[int], None] | None  # told each forward step's batch size, on the engine's thread

    def generate(self, prompt_ids: list[int], params: SamplingParams) -> AsyncGenerator[TokenChunk, None]:
        """Start one sequence; chunks arrive as the engine steps."""
        ...

    def is_healthy(self) -> bool: ...

    def stats(self) -> EngineStats: ...

    def shutdown(self) -> None: ...
