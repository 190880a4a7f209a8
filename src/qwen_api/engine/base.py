"""The engine contract: token ids in, an async stream of token ids out, per sequence.

An engine knows nothing of HTTP, chat templates or text. `generate` starts one sequence and yields
`TokenChunk`s as the engine produces them; closing the iterator early (a client went away, a stop string
matched) cancels the sequence and frees its batch slot. Engines raise the `EngineError` family only.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
from collections.abc import AsyncGenerator, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol, TypeVar

T = TypeVar("T")
log = logging.getLogger(__name__)

FinishReason = Literal["stop", "length"]

# Every engine's defaults, and the settings' (settings.py reads these): most sequences in one step, and the KV cache
# in tokens on a CPU when the operator sets none (on a GPU, engines size it from free memory).
DEFAULT_MAX_BATCH_SIZE = 32
CPU_KV_CACHE_TOKENS = 32768


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
    min_p: float = 0.0  # after top-p: drop tokens less likely than min_p times the most likely one; 0 disables it
    # Applied to the raw logits before temperature (engine/sampling.py::LogitControls): OpenAI's presence and
    # frequency penalties over generated tokens, the multiplicative repetition penalty over prompt and generated
    # tokens (1 disables it), and a bias per token id.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    # vLLM's allowed_token_ids: only these ids may be drawn (every other logit is -inf, before the bias); () for all
    allowed_ids: tuple[int, ...] = ()
    # Log-probabilities to return with each token: None for none, k >= 0 for the sampled token's and the k most
    # likely alternatives'. They are the model's own distribution: the raw logits' log-softmax, before the grammar,
    # bias, penalties, temperature and filters.
    logprobs: int | None = None
    # A grammar the tokens must follow (structured outputs, tool calls): an object with `matcher()`, giving one
    # `TokenMatcher` per sequence. None: unconstrained. An engine that cannot apply it must refuse the sequence.
    constraint: TokenConstraint | None = None
    # vLLM's ignore_eos: the end tokens do not end the sequence (it runs to max_new_tokens); they stay no text.
    ignore_eos: bool = False
    # vLLM's min_tokens: until the sequence has generated this many tokens, its end tokens and `held_ids` (the
    # request's stop tokens) are not drawn (`engine/sampling.held_back`), unless nothing else is allowed (a grammar
    # that is complete). 0: off.
    min_tokens: int = 0
    held_ids: tuple[int, ...] = ()
    # The prompt's log-probabilities (echo with logprobs, lm-eval's loglikelihood): None for none, k >= 0 for each
    # prompt token's but the first, under the tokens before it, with its k most likely alternatives; the model's own
    # distribution, as `logprobs`. They come on the sequence's first chunk (`TokenChunk.prompt_logprobs`), and the
    # engine computes every prompt position for them (no prefix-cache hits).
    prompt_logprobs: int | None = None
    # vLLM's cache_salt: the sequence shares cached prompt blocks only with sequences of the same salt (a tenant's
    # secret), so another tenant cannot tell from its timing whether a prompt was cached; None shares with the
    # unsalted. An engine whose cache outlives a request keys it by the salt too.
    cache_salt: str | None = None


class TokenMatcher(Protocol):
    """One sequence's grammar state: `allowed(width)` is a bool row over the logits (True where a token may come
    next), applied before temperature, top-k, top-p and the draw; `advance(token)` takes the sampled token;
    `failure()` says why the grammar engine gave up on it (it then allows only the end token), or None."""

    def allowed(self, width: int) -> Any: ...

    def advance(self, token: int) -> bool: ...

    def failure(self) -> str | None: ...


class TokenConstraint(Protocol):
    def matcher(self) -> TokenMatcher: ...

    def bound(self) -> bool:
        """Whether `matcher()` can work in this process (one that came from another process needs this
        process's grammar tokenizer for its vocabulary first: structured/grammar.py)."""
        ...


@dataclass(frozen=True)
class TokenLogprob:
    """The log-probability of one generated token, and of the most likely tokens at its position (best first).
    `rank`: the token's place among the decodable ids, 1 for the most likely (as vLLM counts it: the ids at least as
    likely as it, itself included)."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()
    rank: int | None = None


@dataclass(frozen=True)
class TokenChunk:
    """Tokens produced since the previous chunk; the last chunk of a sequence carries its finish reason.

    `logprobs`, when the sequence asked for them, has one entry per token id, in order.
    """

    token_ids: list[int]
    finish_reason: FinishReason | None = None
    logprobs: tuple[TokenLogprob, ...] | None = None
    prompt_logprobs: tuple[TokenLogprob, ...] | None = None  # on the first chunk, when asked for (`SamplingParams`)


@dataclass(frozen=True)
class EngineStats:
    """A snapshot of the engine's load, read by /health, metrics and tests."""

    running: int  # sequences submitted and not yet finished or cancelled
    waiting: int  # of those, sequences the scheduler has not started yet
    active: int  # sequences holding a batch slot and KV cache in the scheduler
    steps: int  # forward steps run so far
    peak_batch_size: int  # most sequences seen together in one forward step
    # The KV cache, where the engine keeps its own (None: it does not say). Counters are totals since start.
    kv_usage: float | None = None  # share of the cache held by unfinished sequences, 0..1
    prefix_queried_tokens: int | None = None  # prompt tokens looked up in the prefix cache
    prefix_hit_tokens: int | None = None  # of those, found there: not computed again
    preemptions: int | None = None  # sequences put back in the queue to free KV for others


class EngineError(Exception):
    """Generation failed."""


class EngineDead(EngineError):
    """The engine's worker has died; no request can be served until the process restarts."""


class ConstraintFailed(EngineError):
    """The grammar engine gave up on a sequence's grammar while matching it (it compiled, then exceeded the
    engine's limits): the output ended early and does not follow the grammar. The request's fault, not the
    engine's: only that sequence fails."""


def checked_chunk(chunk: TokenChunk, matcher: TokenMatcher | None) -> TokenChunk | ConstraintFailed:
    """What an engine delivers for a sequence's chunk: `ConstraintFailed` instead of an end that a failed grammar
    forced (it allows only the end token once it has failed), else the chunk."""
    if chunk.finish_reason == "stop" and matcher is not None and (why := matcher.failure()) is not None:
        return ConstraintFailed(f"the output could not be held to its schema: {why}")
    return chunk


def common_prefix_len(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens `a` and `b` share: what a cached prompt saves a new one, or how far two
    generations agree."""
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


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
    if not outputs.empty():  # the common case while tokens flow: no timer to arm and cancel
        return outputs.get_nowait()
    while True:
        try:
            async with asyncio.timeout(1.0):
                return await outputs.get()
        except TimeoutError:
            if (why := death()) is not None:
                raise EngineDead(why) from None


async def relay(
    outputs: asyncio.Queue[TokenChunk | BaseException], death: Callable[[], str | None], cancel: Callable[[], None]
) -> AsyncGenerator[TokenChunk, None]:
    """One sequence's chunks from the queue its engine's worker fills, until the chunk with a finish reason.

    Chunks that are already waiting when the consumer comes for the next one are handed over as one (`coalesce`):
    a client that fell behind the engine gets the tokens it missed in one event instead of paying the HTTP and
    text layers' per-event cost for each, which is what lets the event loop keep up with a fast engine.

    An exception the worker put on the queue fails this sequence (`EngineError`), after the tokens before it; a
    dead worker fails it with `EngineDead`. Left early (closed, cancelled, failed in the caller), it calls
    `cancel()` so the worker drops the sequence and frees its slot. The engines with their own worker thread
    (llama.cpp, native) share it; drive it with `contextlib.aclosing` so that leaving early cancels now, not when
    the garbage collector gets to it.
    """
    finished = False
    try:
        while not finished:
            item = await next_output(outputs, death)
            failure = item if isinstance(item, BaseException) else None
            if isinstance(item, TokenChunk):
                chunk, failure = coalesce(item, outputs)
                finished = chunk.finish_reason is not None
                yield chunk
            if failure is not None:
                finished = True
                if isinstance(failure, EngineError):  # the engine's own verdict on this sequence, kept as it is
                    raise failure
                raise EngineError(str(failure)) from failure
    finally:
        if not finished:
            cancel()


def coalesce(
    first: TokenChunk, outputs: asyncio.Queue[TokenChunk | BaseException]
) -> tuple[TokenChunk, BaseException | None]:
    """`first` and the chunks already queued behind it, up to a finish reason, as one chunk; and the worker's
    exception when one came next (it is raised after the tokens before it are delivered)."""
    if first.finish_reason is not None or outputs.empty():
        return first, None
    ids, reason, prompt = list(first.token_ids), None, first.prompt_logprobs
    logprobs = list(first.logprobs) if first.logprobs is not None else None
    failure: BaseException | None = None
    while reason is None and not outputs.empty():
        item = outputs.get_nowait()
        if isinstance(item, BaseException):
            failure = item
            break
        ids += item.token_ids
        reason = item.finish_reason
        # every chunk of a sequence that asked for log-probabilities carries them; a chunk without makes the
        # whole merged chunk "without", which the text layer refuses as it would have refused that chunk
        logprobs = None if logprobs is None or item.logprobs is None else logprobs + list(item.logprobs)
    return TokenChunk(ids, reason, tuple(logprobs) if logprobs is not None else None, prompt), failure


def hand_over(
    deliveries: list[T],
    loop_of: Callable[[T], asyncio.AbstractEventLoop],
    put: Callable[[list[T]], None],
) -> None:
    """From an engine's worker thread: `put` each event loop's share of a step's deliveries, on that loop, in one
    `call_soon_threadsafe` (one wake-up of each loop per step, not one per token). A loop that has closed (its
    caller left) is skipped: nobody is waiting there, and the worker must not die of it."""
    by_loop: dict[asyncio.AbstractEventLoop, list[T]] = {}
    for item in deliveries:
        by_loop.setdefault(loop_of(item), []).append(item)
    for loop, items in by_loop.items():
        try:
            loop.call_soon_threadsafe(put, items)
        except RuntimeError:
            log.debug("dropped %d outputs for a closed event loop", len(items))


# How often CPython hands the GIL to another thread that waits for it, in a process that serves an engine on a GPU.
WORKER_SWITCH_INTERVAL_S = 0.0005


def favour_worker_threads() -> None:
    """Make a waiting thread get the GIL within half a millisecond instead of CPython's default 5 ms.

    For a process whose engine runs on a GPU (`runtime.default_loader`, in the server and in each Ray replica):
    its worker thread shares the interpreter with the event loop that streams its tokens. The worker releases the
    GIL while it waits for the device, and wants it back at once to launch the next step; if the event loop is
    busy then (64 streams' tokens from the step before), CPython makes it let go only after the switch interval.
    At 5 ms that is about a whole GPU decode step, with the GPU idle (bench/stream_overhead.py --host-ms measures
    it). On the CPU, where a step takes tens of milliseconds, it made no difference beyond noise: the CPU keeps
    CPython's default."""
    sys.setswitchinterval(WORKER_SWITCH_INTERVAL_S)


def join_worker(thread: threading.Thread, what: str, report_every: float = 10.0) -> None:
    """Wait for an engine's worker thread, told to stop, to end its step and leave. No time limit: a worker
    abandoned mid-step kept using the model while the interpreter's teardown freed it (the llama.cpp engine's
    process died of SIGSEGV, 2 runs in 8, when a loaded 2-core machine's step outlasted a 10 s join). A step always
    ends; each `report_every` seconds the wait is logged."""
    waited = 0.0
    while True:
        thread.join(timeout=report_every)
        if not thread.is_alive():
            return
        waited += report_every
        log.warning("%s: still waiting for its worker to end its step (%.0f s)", what, waited)


class Engine(Protocol):
    """What the HTTP layer may ask of an engine."""

    max_context_tokens: int  # prompt + generated tokens one sequence may hold
    end_token_ids: frozenset[int]  # the tokens that end a sequence: delivered and counted, never text
    on_step: Callable[[int], None] | None  # told each forward step's batch size, on the engine's thread

    def generate(self, prompt_ids: list[int], params: SamplingParams) -> AsyncGenerator[TokenChunk, None]:
        """Start one sequence; chunks arrive as the engine steps."""
        ...

    def is_healthy(self) -> bool: ...

    def stats(self) -> EngineStats: ...

    def shutdown(self) -> None: ...
