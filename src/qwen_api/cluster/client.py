"""The engine contract over Ray Serve: `RemoteEngine` streams a sequence from whichever replica the router picks.

It is an `Engine` like any other (token ids in, an async stream of `TokenChunk`s out, closing it cancels), so
the text layer and the HTTP layer run unchanged on top of it. A replica names itself in the first item of each
stream; before any token has come, a failed replica (dead, unreachable) is not the client's problem, and the
sequence is sent again, to another replica. After the first token, the failure ends the stream with an
`EngineError` at once (a 500, or an SSE error event). A request no replica takes within `assign_timeout`
fails too, so nothing waits forever. The `ReplicaBoard` keeps what the front knows of each replica: sequences
it served, failed and holds now, and how many replicas Ray Serve reports running.

Once the replica has named itself, a reader task pulls the stream into a queue, and `generate` hands a consumer
that fell behind everything queued as one chunk (`engine.base.coalesce`, as the in-process engines' `relay` does):
a slow client, or a busy front, pays the HTTP and text layers' per-event cost once for many tokens. A failure the
reader met comes after the tokens before it. The reader ends with `generate`: it stops at the finish reason, and
leaving early (closed, cancelled, failed) cancels it and waits for it, as well as cancelling the replica's call.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field
from typing import Any

from qwen_api.admission import Overloaded
from qwen_api.engine.base import (
    ConstraintFailed,
    EngineDead,
    EngineError,
    EngineStats,
    SamplingParams,
    TokenChunk,
    coalesce,
)

log = logging.getLogger(__name__)


class NoReplicaFree(Overloaded):
    """No replica took the sequence in time: every one was full (another front's traffic, or a dead replica's
    replacement still loading). A 429 with Retry-After, as when this front is full, not a failure."""

    def __init__(self, seconds: float) -> None:
        Exception.__init__(
            self, f"Server overloaded: no engine replica took the request within {seconds:g} s; retry shortly"
        )


RETRIES = 1  # a sequence with no token yet is sent once more, to a live replica (not more: it may be what kills them)


@dataclass
class ReplicaCounts:
    served: int = 0  # sequences this replica finished
    failed: int = 0  # sequences lost because it died or failed
    running: int = 0  # sequences it holds now
    waiting: int = 0  # of those, sequences that have no token yet


@dataclass
class ReplicaBoard:
    """Per-replica counts (written on the front's event loop) and the deployment's state (from the monitor)."""

    replicas: dict[str, ReplicaCounts] = field(default_factory=dict)
    ready: int = 0  # replicas Ray Serve reports running
    target: int = 0  # replicas it runs or is starting
    reachable: bool = True  # the cluster answers
    lock: threading.Lock = field(default_factory=threading.Lock)

    def of(self, replica: str) -> ReplicaCounts:
        with self.lock:
            return self.replicas.setdefault(replica, ReplicaCounts())

    def snapshot(self) -> dict[str, ReplicaCounts]:
        with self.lock:
            return {name: ReplicaCounts(**vars(c)) for name, c in self.replicas.items()}


class RemoteEngine:
    """An `Engine` whose sequences run on Ray Serve replicas of `replica.EngineReplica`."""

    def __init__(
        self,
        handle: Any,
        max_context_tokens: int,
        board: ReplicaBoard,
        on_shutdown: Callable[[], None] | None = None,
        assign_timeout: float = 30.0,
        end_token_ids: frozenset[int] = frozenset(),
    ) -> None:
        self._handle = handle
        self._stream = handle.generate.options(stream=True)
        self.max_context_tokens = max_context_tokens
        self.end_token_ids = end_token_ids  # the replicas' engines'
        self.on_step: Callable[[int], None] | None = None  # steps happen on the replicas, not here
        self.board = board
        self._on_shutdown = on_shutdown
        self._assign_timeout = assign_timeout
        self._running = self._waiting = 0

    async def generate(self, prompt_ids: list[int], params: SamplingParams) -> AsyncGenerator[TokenChunk, None]:
        from ray.exceptions import RayError

        if not self.is_healthy():
            raise EngineDead("no engine replica is running")
        self._running += 1
        try:
            for attempt in range(RETRIES + 1):
                replica, produced, finished, lost = None, False, False, False
                reader: asyncio.Task[None] | None = None
                stream = self._stream.remote(list(prompt_ids), params)
                self._waiting += 1
                try:
                    async with asyncio.timeout(self._assign_timeout):
                        replica = await anext(stream)
                    counts = self.board.of(replica)
                    counts.running += 1
                    counts.waiting += 1
                    outputs: asyncio.Queue[TokenChunk | BaseException] = asyncio.Queue()
                    reader = _read(stream, replica, outputs)
                    while not finished:
                        item = await outputs.get()
                        failure = item if isinstance(item, BaseException) else None
                        if isinstance(item, TokenChunk):
                            chunk, failure = coalesce(item, outputs)
                            if not produced:
                                produced = True
                                counts.waiting -= 1
                                self._waiting -= 1
                            finished = chunk.finish_reason is not None
                            if finished:
                                counts.served += 1
                            yield chunk
                        if failure is not None:
                            raise failure  # mapped below, as if the stream had raised it here
                    return
                except TimeoutError:
                    raise NoReplicaFree(self._assign_timeout) from None
                except RayError as exc:
                    cause = getattr(exc, "cause", None)
                    if isinstance(cause, ConstraintFailed):  # the request's grammar failed: a 400, as in one process
                        raise ConstraintFailed(str(cause)) from exc
                    # the engine failed the sequence (another try won't help), unless it died: a replica failure
                    if isinstance(cause, EngineError) and not isinstance(cause, EngineDead):
                        raise EngineError(str(cause)) from exc
                    if not produced and attempt < RETRIES:
                        log.warning("replica %s failed before a token (%s); sent again", replica, _first_line(exc))
                        continue
                    lost = True
                    raise EngineError(f"the engine replica {replica or '?'} failed: {_first_line(exc)}") from exc
                finally:
                    if not produced:
                        self._waiting -= 1
                    if replica is not None:
                        counts = self.board.of(replica)
                        counts.running -= 1
                        counts.waiting -= not produced
                        counts.failed += lost  # sent again and answered elsewhere: not lost
                    if not finished:
                        stream.cancel()  # the replica's call is cancelled, and with it the sequence
                    if reader is not None:
                        await _stop(reader)
        finally:
            self._running -= 1

    def is_healthy(self) -> bool:
        return self.board.reachable and self.board.ready > 0

    def stats(self) -> EngineStats:
        running, waiting = self._running, max(0, self._waiting)
        return EngineStats(running=running, waiting=waiting, active=running - waiting, steps=0, peak_batch_size=0)

    def shutdown(self) -> None:
        if self._on_shutdown is not None:
            self._on_shutdown()


def _read(stream: Any, replica: str, outputs: asyncio.Queue[TokenChunk | BaseException]) -> asyncio.Task[None]:
    """A task putting the stream's chunks on `outputs` up to the one with a finish reason, then how it ended:
    the stream's exception, or an `EngineError` when it ended (or the task was cancelled) before a finish reason.

    The ending is put by a done callback, not by the task's own code, so that however the task ends (even a
    cancellation that did not come from `generate`), the consumer waiting on `outputs` is woken and nothing waits
    forever; it also retrieves the task's exception, so none is logged as never retrieved."""

    async def read() -> None:
        async for chunk in stream:
            outputs.put_nowait(chunk)
            if chunk.finish_reason is not None:
                return  # the sequence is over; `generate` returns without waiting for the stream's own end

    def ended(task: asyncio.Task[None]) -> None:
        if task.cancelled():
            outputs.put_nowait(EngineError(f"the stream from replica {replica} was cancelled"))
        else:
            why = EngineError(f"replica {replica} ended a sequence without a finish reason")
            outputs.put_nowait(task.exception() or why)  # after a finish reason, nobody reads it

    task = asyncio.create_task(read(), name=f"stream from replica {replica}")
    task.add_done_callback(ended)
    return task


async def _stop(reader: asyncio.Task[None]) -> None:
    """Cancel `reader` if it still runs, and wait until it has ended: it must not outlive `generate`.

    `asyncio.wait`, not `await reader`: the reader's own cancellation must not be raised here, while a
    cancellation of the caller still is."""
    if not reader.done():
        reader.cancel()
        await asyncio.wait({reader})


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
