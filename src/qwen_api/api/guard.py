"""Serving policy around one request's generation: admission slots, a deadline, and the client going away.

`Guard.admit` takes the slots before any work (or raises `Overloaded` / `Draining` for a fast refusal).
`Guard.complete` runs a non-streaming generation and cancels it when the client disconnects (the engine then
frees its batch slots) or when the deadline passes. `Guard.stream` puts the deadline on a stream; a client
that leaves a stream is noticed by Starlette, which cancels the response and so the engine's sequences.
`Guard.cut_off` ends every request in flight at once with `CutOff` (a drain whose time ran out), so that each
still gets an answer in its route's shape, or its stream an error event, before the server exits.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Awaitable
from typing import Any, TypeVar

from fastapi import Request

from qwen_api.admission import Admission, Ticket
from qwen_api.metrics import Metrics

T = TypeVar("T")


class RequestTimeout(Exception):
    def __init__(self, seconds: float) -> None:
        super().__init__(f"timed out after {seconds:g} s; the request was cancelled")


class ClientDisconnected(Exception):
    """The client went away before its answer was ready; nobody will read the response."""


class CutOff(Exception):
    """The server is shutting down and its drain timeout ran out before this request's answer was done."""

    def __init__(self) -> None:
        super().__init__("Server is shutting down and its drain timeout ran out; the request was cancelled: retry")


async def _disconnected(request: Request) -> None:
    """Returns when the client disconnects (the body has been read, so the next message can only be that)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


class Guard:
    def __init__(self, admission: Admission, metrics: Metrics, timeout: float) -> None:
        self.admission, self.metrics, self.timeout = admission, metrics, timeout
        self._cut = asyncio.Event()
        self._streams: set[_Deadline] = set()

    def cut_off(self) -> None:
        """End every request in flight now, with `CutOff` (from the event loop)."""
        self._cut.set()
        for deadline in list(self._streams):
            deadline.expire()

    def admit(self, sequences: int, prompt_tokens: int) -> Ticket:
        ticket = self.admission.acquire(sequences)
        self.metrics.prompt_tokens.inc(prompt_tokens)
        return ticket

    async def complete(self, request: Request, ticket: Ticket, work: Awaitable[T]) -> T:
        """Await `work` unless the client leaves or time runs out first; either way the work is cancelled."""
        task = asyncio.ensure_future(work)
        watcher = asyncio.ensure_future(_disconnected(request))
        cut = asyncio.ensure_future(self._cut.wait())
        try:
            done, _ = await asyncio.wait(
                {task, watcher, cut}, timeout=self.timeout, return_when=asyncio.FIRST_COMPLETED
            )
            if task in done:
                return task.result()
            reason = "disconnect" if watcher in done else "shutdown" if cut in done else "timeout"
            self.metrics.cancellations.labels(reason).inc()
            if reason == "disconnect":
                raise ClientDisconnected()
            if reason == "shutdown":
                raise CutOff()
            raise RequestTimeout(self.timeout)
        finally:
            for t in (task, watcher, cut):
                t.cancel()
            try:  # a second cancellation may land in this await: the slots are released all the same
                await asyncio.gather(task, watcher, cut, return_exceptions=True)
            finally:
                ticket.release()

    async def stream(self, ticket: Ticket, events: AsyncGenerator[T, None]) -> AsyncGenerator[T, None]:
        """Relay `events` until the deadline; the ticket is released however the stream ends.

        The deadline acts only on the wait for the next item, as an `asyncio.timeout` around each wait would, but
        with one timer for the whole stream (`_Deadline`): a timer per item was a fifth of the server's CPU per
        streamed token."""
        deadline = _Deadline(asyncio.current_task())
        timer = asyncio.get_running_loop().call_later(self.timeout, deadline.expire)
        self._streams.add(deadline)
        if self._cut.is_set():
            deadline.expire()
        try:
            while True:
                if deadline.expired:  # it passed while the item before was being sent
                    raise self._timed_out()
                try:
                    deadline.waiting = True
                    item = await anext(events)
                except StopAsyncIteration:
                    return
                except BaseException as exc:
                    # As asyncio.timeout does: the deadline's cancellation is taken back whatever came out of the
                    # wait, and it is a timeout when it was the wait's only cancellation.
                    if deadline.cancelled_wait:
                        deadline.cancelled_wait = False
                        if deadline.task.uncancel() == 0 and isinstance(exc, asyncio.CancelledError):
                            raise self._timed_out() from None
                    raise
                finally:
                    deadline.waiting = False
                yield item
        except asyncio.CancelledError:
            self.metrics.cancellations.labels("disconnect").inc()
            raise
        finally:
            timer.cancel()
            self._streams.discard(deadline)
            ticket.release()  # first: a cancellation landing in the await below must not keep the slots
            await events.aclose()

    def _timed_out(self) -> RequestTimeout | CutOff:
        """What a stream's passed deadline means: its time ran out, or the server's (`cut_off`)."""
        if self._cut.is_set():
            self.metrics.cancellations.labels("shutdown").inc()
            return CutOff()
        self.metrics.cancellations.labels("timeout").inc()
        return RequestTimeout(self.timeout)


class _Deadline:
    """One stream's deadline. When it passes during a wait for the next item, it cancels the waiting task (never
    on Python 3.11's `asyncio.wait_for`, which can swallow the cancellation Starlette sends when the client leaves);
    `Guard.stream` takes that one cancellation back (`uncancel`) and raises `RequestTimeout`, unless the client's
    own cancellation landed too. When it passes while an item is being sent, the next wait raises at once."""

    def __init__(self, task: asyncio.Task[Any] | None) -> None:
        assert task is not None, "a stream is consumed by a task"
        self.task = task
        self.waiting = False  # the task is waiting for the stream's next item
        self.expired = False
        self.cancelled_wait = False

    def expire(self) -> None:
        self.expired = True
        if self.waiting:
            self.cancelled_wait = True
            self.task.cancel()
