"""`Guard.stream`'s deadline (api/guard.py): one timer per stream, acting only on the wait for the next item.

What must hold is what an `asyncio.timeout` around each wait gave: the deadline during a wait ends the stream with
`RequestTimeout` (counted as a timeout); a client leaving ends it with the cancellation (counted as a disconnect),
also when both land together; a deadline that passes while an item is being sent ends the stream at the next
wait; and however the stream ends, the admission slots come back and the source is closed.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from contextlib import aclosing

import pytest

from qwen_api.admission import Admission
from qwen_api.api.guard import Guard, RequestTimeout
from qwen_api.metrics import Metrics


class Source:
    """An event source: `ready` items at once, then one item every `pace` seconds; records that it was closed."""

    def __init__(self, ready: int, pace: float) -> None:
        self.ready, self.pace, self.closed = ready, pace, False

    async def events(self) -> AsyncGenerator[int, None]:
        try:
            for i in range(1000):
                if i >= self.ready:
                    await asyncio.sleep(self.pace)
                yield i
        finally:
            self.closed = True


def setup(timeout: float) -> tuple[Guard, Admission, Metrics]:
    admission = Admission(4)
    metrics = Metrics(engine_stats=lambda: None, admitted=lambda: admission.in_use)
    return Guard(admission, metrics, timeout=timeout), admission, metrics


def cancellations(metrics: Metrics, reason: str) -> float:
    return metrics.cancellations.labels(reason)._value.get()


def test_the_deadline_during_a_wait_is_a_request_timeout() -> None:
    guard, admission, metrics = setup(timeout=0.3)
    source = Source(ready=2, pace=10)
    seen: list[int] = []

    async def main() -> None:
        with pytest.raises(RequestTimeout):
            async for item in guard.stream(guard.admit(1, 1), source.events()):
                seen.append(item)

    asyncio.run(main())
    assert seen == [0, 1] and source.closed and admission.in_use == 0
    assert (cancellations(metrics, "timeout"), cancellations(metrics, "disconnect")) == (1, 0)


def test_a_deadline_passing_while_an_item_is_sent_ends_the_stream_at_the_next_wait() -> None:
    guard, admission, metrics = setup(timeout=0.2)
    source = Source(ready=1000, pace=0)  # items are always ready: the stream never waits
    seen: list[int] = []

    async def main() -> None:
        with pytest.raises(RequestTimeout):
            async for item in guard.stream(guard.admit(1, 1), source.events()):
                seen.append(item)
                await asyncio.sleep(0.15)  # sending the item takes a while

    asyncio.run(main())
    assert seen == [0, 1] and source.closed and admission.in_use == 0
    assert cancellations(metrics, "timeout") == 1


def test_a_client_leaving_is_a_disconnect_even_when_the_deadline_lands_with_it() -> None:
    for delay in (0.1, 0.3):  # the client leaves before the deadline (0.3 s), then exactly at it
        guard, admission, metrics = setup(timeout=0.3)
        source = Source(ready=1, pace=10)

        async def consume(stream: AsyncGenerator[int, None]) -> None:
            async for _ in stream:
                pass

        async def main(stream: AsyncGenerator[int, None], delay: float = delay) -> None:
            task = asyncio.ensure_future(consume(stream))
            loop = asyncio.get_running_loop()
            loop.call_at(loop.time() + delay, task.cancel)
            with pytest.raises(asyncio.CancelledError):
                await task

        asyncio.run(main(guard.stream(guard.admit(1, 1), source.events())))
        assert source.closed and admission.in_use == 0
        assert cancellations(metrics, "disconnect") == 1, delay
        assert cancellations(metrics, "timeout") == 0, delay


def test_a_stream_that_ends_in_time_leaves_no_timer_behind() -> None:
    guard, admission, metrics = setup(timeout=0.2)
    source = Source(ready=0, pace=0.01)

    async def main() -> list[int]:
        items = []
        async with aclosing(guard.stream(guard.admit(1, 1), source.events())) as stream:
            async for item in stream:
                items.append(item)
                if item == 3:
                    break
        await asyncio.sleep(0.3)  # past the deadline: a timer left armed would count a timeout now
        return items

    assert asyncio.run(main()) == [0, 1, 2, 3]
    assert source.closed and admission.in_use == 0
    assert (cancellations(metrics, "timeout"), cancellations(metrics, "disconnect")) == (0, 0)
