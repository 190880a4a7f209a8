"""Serving policy around one request's generation: admission slots, a deadline, and the client going away.

`Guard.admit` takes the slots before any work (or raises `Overloaded` / `Draining` for a fast refusal).
`Guard.complete` runs a non-streaming generation and cancels it when the client disconnects (the engine then
frees its batch slots) or when the deadline passes. `Guard.stream` puts the deadline on a stream; a client
that leaves a stream is noticed by Starlette, which cancels the response and so the engine's sequences.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Awaitable
from typing import TypeVar

from fastapi import Request

from qwen_api.admission import Admission, Ticket
from qwen_api.metrics import Metrics

T = TypeVar("T")


class RequestTimeout(Exception):
    def __init__(self, seconds: float) -> None:
        super().__init__(f"timed out after {seconds:g} s; the request was cancelled")


class ClientDisconnected(Exception):
    """The client went away before its answer was ready; nobody will read the response."""


async def _disconnected(request: Request) -> None:
    """Returns when the client disconnects (the body has been read, so the next message can only be that)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


class Guard:
    def __init__(self, admission: Admission, metrics: Metrics, timeout: float) -> None:
        self.admission, self.metrics, self.timeout = admission, metrics, timeout

    def admit(self, sequences: int, prompt_tokens: int) -> Ticket:
        ticket = self.admission.acquire(sequences)
        self.metrics.prompt_tokens.inc(prompt_tokens)
        return ticket

    async def complete(self, request: Request, ticket: Ticket, work: Awaitable[T]) -> T:
        """Await `work` unless the client leaves or time runs out first; either way the work is cancelled."""
        task = asyncio.ensure_future(work)
        watcher = asyncio.ensure_future(_disconnected(request))
        try:
            done, _ = await asyncio.wait({task, watcher}, timeout=self.timeout, return_when=asyncio.FIRST_COMPLETED)
            if task in done:
                return task.result()
            reason = "disconnect" if watcher in done else "timeout"
            self.metrics.cancellations.labels(reason).inc()
            if reason == "disconnect":
                raise ClientDisconnected()
            raise RequestTimeout(self.timeout)
        finally:
            for t in (task, watcher):
                t.cancel()
            try:  # a second cancellation may land in this await: the slots are released all the same
                await asyncio.gather(task, watcher, return_exceptions=True)
            finally:
                ticket.release()

    async def stream(self, ticket: Ticket, events: AsyncGenerator[T, None]) -> AsyncGenerator[T, None]:
        """Relay `events` until the deadline; the ticket is released however the stream ends."""
        # One `asyncio.timeout` over each wait, never `asyncio.wait_for`: on Python 3.11 wait_for can swallow
        # the cancellation Starlette sends when the client leaves (see `engine.base.next_output`).
        deadline = asyncio.get_running_loop().time() + self.timeout
        try:
            while True:
                try:
                    async with asyncio.timeout_at(deadline):
                        item = await anext(events)
                except StopAsyncIteration:
                    return
                except TimeoutError:
                    self.metrics.cancellations.labels("timeout").inc()
                    raise RequestTimeout(self.timeout) from None
                yield item
        except asyncio.CancelledError:
            self.metrics.cancellations.labels("disconnect").inc()
            raise
        finally:
            ticket.release()  # first: a cancellation landing in the await below must not keep the slots
            await events.aclose()
