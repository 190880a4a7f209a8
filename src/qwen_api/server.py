"""The HTTP server process: uvicorn, plus a graceful drain on SIGTERM and an exit when the engine dies.

SIGTERM: stop admitting (new requests get 503, `/health` turns 503 so balancers move away), let the admitted
requests finish for up to `drain_timeout` seconds, then shut down and exit 0. A second SIGTERM or a SIGINT is
uvicorn's own prompt shutdown. A failed model load or a dead engine ends the process with exit code 1.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from types import FrameType

import uvicorn

from qwen_api.admission import Admission
from qwen_api.runtime import Runtime

log = logging.getLogger(__name__)


class Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, runtime: Runtime, admission: Admission, drain_timeout: float) -> None:
        super().__init__(config)
        self.runtime, self.admission, self.drain_timeout = runtime, admission, drain_timeout
        self._loop: asyncio.AbstractEventLoop | None = None
        self._draining = False
        runtime.on_fatal = self.request_exit

    async def serve(self, sockets: list | None = None) -> None:  # type: ignore[type-arg]
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def request_exit(self) -> None:
        """Shut down now (from the event loop): the process then exits with the runtime's exit code."""
        self.should_exit = True

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if sig == signal.SIGTERM and not self._draining and self._loop is not None:
            self._draining = True
            loop = self._loop
            loop.call_soon_threadsafe(lambda: loop.create_task(self.drain()))
            return
        super().handle_exit(sig, frame)

    async def drain(self) -> None:
        self.admission.draining = self.runtime.draining = True
        log.info("draining: %d sequence(s) in flight, waiting up to %.0f s", self.admission.in_use, self.drain_timeout)
        if not await self.admission.wait_idle(self.drain_timeout):
            log.warning("drain timeout: %d sequence(s) still in flight are cut off", self.admission.in_use)
        self.config.timeout_graceful_shutdown = 1
        self.should_exit = True
