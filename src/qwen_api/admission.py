"""Bounded admission: a fixed number of sequences may be in flight; past it a request is refused at once.

Each request takes as many slots as sequences it asks for (`n`), held until its answer is complete or its
stream has ended. There is no hidden queue in front of the engine: the engine's own waiting list is bounded by
`capacity - max_batch_size`, and everything beyond is a fast, clear refusal the client can retry. Draining
(on SIGTERM) refuses every new request while the admitted ones finish.
"""

from __future__ import annotations

import asyncio
import time


class Overloaded(Exception):
    """No free slot: retry later."""

    def __init__(self, requested: int, capacity: int) -> None:
        super().__init__(
            f"Server overloaded: {requested} sequence(s) asked for, all {capacity} slots are in use; retry shortly"
        )


class Draining(Exception):
    """The server is shutting down and takes no new requests."""

    def __init__(self) -> None:
        super().__init__("Server is shutting down; retry on another instance")


class Ticket:
    """Slots held by one request; `release` is idempotent."""

    def __init__(self, admission: Admission, slots: int) -> None:
        self._admission, self.slots, self._held = admission, slots, True

    def release(self) -> None:
        if self._held:
            self._held = False
            self._admission.in_use -= self.slots


class Admission:
    """Counts sequences in flight against a capacity. Used from the event loop only: no lock needed."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.in_use = 0
        self.draining = False

    def acquire(self, slots: int) -> Ticket:
        if self.draining:
            raise Draining()
        if self.in_use + slots > self.capacity:
            raise Overloaded(slots, self.capacity)
        self.in_use += slots
        return Ticket(self, slots)

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until nothing is in flight; False if `timeout` seconds passed first."""
        deadline = time.monotonic() + timeout
        while self.in_use > 0:
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.05)
        return True
