"""The HTTP server process: uvicorn, plus a graceful drain on SIGTERM, an exit when the engine dies, and bounded
connections.

SIGTERM: stop admitting (new requests get 503, `/health` turns 503 so balancers move away), let the admitted
requests finish for up to `drain_timeout` seconds, then shut down and exit 0. A second SIGTERM, or a SIGINT at any
time, stops at once (exit code 1 if requests were still in flight, else 0). A failed model load or a dead engine
ends the process with exit code 1.

Connections: at most `max_connections` are held open; past that a new connection is answered 503 and closed at
once, before its file descriptors could run out. A connection must send each whole request, headers and body,
within `header_timeout` seconds of opening (or of its previous response), else it is closed: idle, trickling or
stalled connections cannot pile up (as Go's `ReadTimeout`). A request's line and headers may hold at most
`MAX_HEAD_BYTES`; past that it is answered 431 and the connection closed, before they could fill the memory.
"""

from __future__ import annotations

import asyncio
import json
import logging
import resource
import signal
from types import FrameType
from typing import Any

import httptools
import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from qwen_api.admission import Admission
from qwen_api.runtime import Runtime

log = logging.getLogger(__name__)

# File descriptors kept back from the connection bound for the model's files, logs, and the engine.
_RESERVED_FDS = 128

# The most bytes a request's line and headers may hold (Node's bound is 16 KiB, nginx's 32 KiB, Go's 1 MiB).
MAX_HEAD_BYTES = 64 * 1024


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


def _close_with(status: str, detail: str) -> bytes:
    """A whole HTTP/1.1 answer that closes the connection, with a JSON `detail` (the seed API's error shape)."""
    body = json.dumps({"detail": detail}).encode()
    return (
        f"HTTP/1.1 {status}\r\ncontent-type: application/json\r\nconnection: close\r\n"
        f"content-length: {len(body)}\r\n\r\n"
    ).encode() + body


class _HeadTooLarge(httptools.HttpParserError):
    """Raised from a parser callback: uvicorn answers parser errors itself, with 400 (`send_400_response`)."""


def bounded_http(
    max_connections: int, header_timeout: float, max_head_bytes: int = MAX_HEAD_BYTES
) -> type[HttpToolsProtocol]:
    """uvicorn's httptools protocol with bounds on open connections, on the time to send a request (headers and
    body) and on the size of its headers (see the module docstring).

    httptools (llhttp, in C) rather than h11 (pure Python): each streamed token is one HTTP chunk written through
    the protocol, and with h11 its state machine was a fifth of the server's CPU per token."""
    busy = _close_with("503 Service Unavailable", "Server has too many open connections; retry shortly")
    busy = busy.replace(b"connection: close", b"retry-after: 1\r\nconnection: close")
    head_too_large = _close_with(
        "431 Request Header Fields Too Large", f"The request's line and headers exceed {max_head_bytes} bytes"
    )

    class BoundedHttpProtocol(HttpToolsProtocol):
        _request_timer: asyncio.TimerHandle | None = None
        _in_head = True  # the bytes now arriving belong to a request's line and headers
        _head_bytes = 0  # received since that request began, while `_in_head`
        _head_too_large = False

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            if len(self.connections) > max_connections:
                log.warning("refusing a connection: %d are open (max-connections)", len(self.connections) - 1)
                transport.write(busy)
                transport.close()
                return
            self._arm_request_timer()

        def data_received(self, data: bytes) -> None:
            if self._in_head:
                self._head_bytes += len(data)
            super().data_received(data)
            # headers that never end are refused as they grow (httptools would hold them all in memory); the
            # whole head of a request that ended in this piece is measured in `on_headers_complete`
            if self._in_head and self._head_bytes > max_head_bytes and not self.transport.is_closing():
                self._refuse_head()

        def on_headers_complete(self) -> None:
            self._in_head = False
            if len(self.url) + sum(len(name) + len(value) for name, value in self.headers) > max_head_bytes:
                self._head_too_large = True
                raise _HeadTooLarge("request head too large")
            super().on_headers_complete()

        def send_400_response(self, msg: str) -> None:
            if self._head_too_large:
                self._refuse_head()
            else:
                super().send_400_response(msg)

        def on_message_complete(self) -> None:
            running = self.cycle is not None and not self.cycle.response_complete
            super().on_message_complete()
            self._in_head, self._head_bytes = True, 0
            if running:
                self._disarm_request_timer()  # read in time: what it asks may take as long as it takes
            else:  # answered before its body had come (e.g. 413): the next request starts now
                self._arm_request_timer()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm_request_timer()  # the next request on this keep-alive connection gets the same bound

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm_request_timer()
            super().connection_lost(exc)

        def _refuse_head(self) -> None:
            log.warning("refusing a request whose line and headers exceed %d bytes", max_head_bytes)
            self.transport.write(head_too_large)
            self.transport.close()

        def _arm_request_timer(self) -> None:
            self._disarm_request_timer()
            self._request_timer = self.loop.call_later(header_timeout, self._request_timed_out)

        def _disarm_request_timer(self) -> None:
            if self._request_timer is not None:
                self._request_timer.cancel()
                self._request_timer = None

        def _request_timed_out(self) -> None:
            self._request_timer = None
            cycle = self.cycle
            # between requests, in a request's headers, or in its body (a running request whose body stalled)
            if cycle is None or cycle.response_complete or cycle.more_body:
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
