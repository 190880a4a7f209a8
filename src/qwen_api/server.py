"""The HTTP server process: uvicorn, plus a graceful drain on SIGTERM, an exit when the engine dies, and bounded
connections.

SIGTERM: stop admitting (new requests get 503, `/health` turns 503 so balancers move away), let the admitted
requests finish for up to `drain_timeout` seconds, then shut down and exit 0. A second SIGTERM, or a SIGINT at any
time, stops at once (exit code 1 if requests were still in flight, else 0). A failed model load or a dead engine
ends the process with exit code 1.

Connections: at most `max_connections` are held open; past that a new connection is answered 503 and closed at
once, before its file descriptors could run out. A connection must complete each request's headers within
`header_timeout` seconds of opening (or of its previous response), else it is closed: idle or trickling
connections cannot pile up.
"""

from __future__ import annotations

import asyncio
import json
import logging
import resource
import signal
from types import FrameType
from typing import Any

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from qwen_api.admission import Admission
from qwen_api.runtime import Runtime

log = logging.getLogger(__name__)

# File descriptors kept back from the connection bound for the model's files, logs, and the engine.
_RESERVED_FDS = 128


def connection_bound(requested: int) -> int:
    """How many connections may be open at once: as asked, but never so many that file descriptors run out.
    Raises the soft descriptor limit to the hard one first (a server's usual first step)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return max(1, min(requested, soft - _RESERVED_FDS))


def bounded_http(max_connections: int, header_timeout: float) -> type[HttpToolsProtocol]:
    """uvicorn's httptools protocol with a bound on open connections and on the time to send a request's headers.

    httptools (llhttp, in C) rather than h11 (pure Python): each streamed token is one HTTP chunk written through
    the protocol, and with h11 its state machine was a fifth of the server's CPU per token."""
    busy = json.dumps({"detail": "Server has too many open connections; retry shortly"}).encode()
    refusal = (
        b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\n"
        b"connection: close\r\ncontent-length: " + str(len(busy)).encode() + b"\r\n\r\n" + busy
    )

    class BoundedHttpProtocol(HttpToolsProtocol):
        _header_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            if len(self.connections) > max_connections:
                log.warning("refusing a connection: %d are open (max-connections)", len(self.connections) - 1)
                transport.write(refusal)
                transport.close()
                return
            self._arm_header_timer()

        def on_headers_complete(self) -> None:
            self._disarm_header_timer()  # the request's headers arrived in time
            super().on_headers_complete()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm_header_timer()  # the next request on this keep-alive connection gets the same bound

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm_header_timer()
            super().connection_lost(exc)

        def _arm_header_timer(self) -> None:
            self._disarm_header_timer()
            self._header_timer = self.loop.call_later(header_timeout, self._header_timed_out)

        def _disarm_header_timer(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _header_timed_out(self) -> None:
            self._header_timer = None
            if self.cycle is None or self.cycle.response_complete:
                self.transport.close()

    return BoundedHttpProtocol


class Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, runtime: Runtime, admission: Admission, drain_timeout: float) -> None:
        super().__init__(config)
        self.runtime, self.admission, self.drain_timeout = runtime, admission, drain_timeout
        self._loop: asyncio.AbstractEventLoop | None = None
        self._draining = False
        self.cut_off = False  # stopped at once with requests still in flight

    async def serve(self, sockets: list | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def request_exit(self) -> None:
        """Shut down now (from the event loop): the process then exits with the runtime's exit code. The runtime's
        `on_fatal`: whoever builds both connects it (`runtime.connect(on_fatal=server.request_exit)`)."""
        self.should_exit = True

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if sig == signal.SIGTERM and not self._draining and self._loop is not None:
            self._draining = True
            loop = self._loop
            loop.call_soon_threadsafe(lambda: loop.create_task(self.drain()))
            return
        # A second SIGTERM, or SIGINT: stop now. uvicorn's own handler would wait for every connection without a
        # bound and then re-raise the signal to end the process; this stops waiting and exits with a code instead.
        self.cut_off = self.admission.in_use > 0
        self.admission.draining = self.runtime.draining = True
        self.force_exit = self.should_exit = True

    async def drain(self) -> None:
        self.admission.draining = self.runtime.draining = True
        log.info("draining: %d sequence(s) in flight, waiting up to %.0f s", self.admission.in_use, self.drain_timeout)
        if not await self.admission.wait_idle(self.drain_timeout):
            log.warning("drain timeout: %d sequence(s) still in flight are cut off", self.admission.in_use)
        self.config.timeout_graceful_shutdown = 1
        self.should_exit = True
