"""The HTTP server process: uvicorn, plus a graceful drain on SIGTERM, an exit when the engine dies, and bounded
connections.

SIGTERM: stop admitting (new requests get 503, `/health` turns 503 so balancers move away), let the admitted
requests finish for up to `drain_timeout` seconds, then answer those still running (a 503 in their route's shape, or
their stream's error event) and shut down and exit 0. A second SIGTERM, or a SIGINT at any
time, stops at once (exit code 1 if requests were still in flight, else 0). A failed model load or a dead engine
ends the process with exit code 1.

Connections: at most `max_connections` are held open; past that a new connection is answered 503 and closed, before
its file descriptors could run out: not counted as open, it gets up to `_REFUSAL_WAIT` seconds to send its request's
head first (while no more than `_WAITING_REFUSALS` wait so, else it is answered at once). A connection must send each
whole request, headers and body, within `header_timeout` seconds of opening (or of its previous response), else it is
closed without an answer: idle, trickling or stalled connections cannot pile up (as Go's `ReadTimeout`). A request's
line and headers may hold at most `MAX_HEAD_BYTES`; past that it is answered 431 and the connection closed, before
they could fill the memory. A request that does not parse is answered 400 and its connection closed.

These answers of the server's own go through the app's header middleware (`with_answer_headers`), with the request
headers read before the answer: they carry X-Request-ID and, for an allowed Origin, the CORS headers, as the app's
answers do, so that a page can read them. Their bodies are in the error shape of the route the request's path
names (OpenAI's under /v1, Anthropic's on /v1/messages, the seed API's elsewhere), as far as the path was read.
"""

from __future__ import annotations

import asyncio
import json
import logging
import resource
import signal
from collections.abc import Callable
from http import HTTPStatus
from types import FrameType
from typing import Any, NamedTuple

import uvicorn
from starlette.types import Message, Receive, Scope, Send
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from qwen_api.admission import Admission
from qwen_api.api.app import with_answer_headers
from qwen_api.api.errors import error_payload
from qwen_api.runtime import Runtime

log = logging.getLogger(__name__)

# File descriptors kept back from the connection bound for the model's files, logs, and the engine.
_RESERVED_FDS = 128

# The most bytes a request's line and headers may hold (Node's bound is 16 KiB, nginx's 32 KiB, Go's 1 MiB).
MAX_HEAD_BYTES = 64 * 1024

# Refused connections that may wait for their request's head at once, so that their 503 carries the headers the
# request calls for: half the descriptors kept back. Past that a refused connection is answered at once.
_WAITING_REFUSALS = _RESERVED_FDS // 2
# How long a refused connection may take to send its request's head (a client sends it as soon as it has connected).
_REFUSAL_WAIT = 1.0
# Seconds the requests cut off at the end of a drain get to write their answers before the server stops.
_CUT_OFF_GRACE = 2.0

Headers = list[tuple[bytes, bytes]]


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


class _Refusal(NamedTuple):
    """An answer the server gives itself, at the connection level, before closing the connection. Its body is in the
    shape of the route the request's path names, as far as it was read (`api.errors.error_payload`): the seed API's
    `{"detail": ...}` when none was."""

    status: int
    message: str
    type_: str  # and code: OpenAI's error fields
    code: str | None = None
    headers: tuple[tuple[bytes, bytes], ...] = ()  # its own, beyond the body's

    def body(self, url: bytes) -> bytes:
        path = url.partition(b"?")[0].decode("latin-1")
        return json.dumps(error_payload(path, self.status, self.message, self.type_, self.code)).encode()


async def _answer_headers(app: object, refusal: _Refusal, body: bytes, request: Headers) -> Headers:
    """The headers of `refusal`: its own, and those that `app`'s header middleware put on every answer (X-Request-ID,
    CORS), given `request`, the request headers read before the answer (`with_answer_headers`: one place for both)."""
    own = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *refusal.headers]
    started: dict[str, Any] = {}

    async def answer(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": refusal.status, "headers": own})
        await send({"type": "http.response.body", "body": body})

    async def keep(message: Message) -> None:
        if message["type"] == "http.response.start":
            started.update(message)

    async def no_body() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    # Those middleware read the request's headers alone. The method is not the request's: as a GET's, the answer gets
    # the CORS headers of an actual answer, never a preflight's "OK" (a refusal is no OK, whatever was asked).
    scope: Scope = {"type": "http", "method": "GET", "headers": request}
    await with_answer_headers(app, answer)(scope, no_body, keep)
    return list(started["headers"])


def _close_with(status: int, headers: Headers, body: bytes) -> bytes:
    """A whole HTTP/1.1 answer that closes the connection."""
    head = [f"HTTP/1.1 {status} {HTTPStatus(status).phrase}".encode()]
    head += [name + b": " + value for name, value in headers]
    head.append(b"connection: close")
    return b"\r\n".join(head) + b"\r\n\r\n" + body


def bounded_http(
    max_connections: int, header_timeout: float, max_head_bytes: int = MAX_HEAD_BYTES
) -> type[HttpToolsProtocol]:
    """uvicorn's httptools protocol with bounds on open connections, on the time to send a request (headers and
    body) and on the size of its headers (see the module docstring).

    httptools (llhttp, in C) rather than h11 (pure Python): each streamed token is one HTTP chunk written through
    the protocol, and with h11 its state machine was a fifth of the server's CPU per token."""
    busy = _Refusal(
        503,
        "Server has too many open connections; retry shortly",
        "service_unavailable",
        "too_many_connections",
        ((b"retry-after", b"1"),),
    )
    head_too_large = _Refusal(
        431, f"The request's line and headers exceed {max_head_bytes} bytes", "invalid_request_error", "head_too_large"
    )

    class BoundedHttpProtocol(HttpToolsProtocol):
        waiting_refusals = 0  # this server's refused connections that wait for their request's head
        _request_timer: asyncio.TimerHandle | None = None
        _in_head = True  # the bytes now arriving belong to a request's line and headers
        _head_bytes = 0  # received since that request began, while `_in_head`
        _refusal: _Refusal | None = None  # refused: the answer it gets once its request's head has come
        _waiting = False  # counted in `waiting_refusals`
        _refused = False  # an answer of the server's own is under way: the connection reads nothing more

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            open_now = len(self.connections) - BoundedHttpProtocol.waiting_refusals
            if open_now <= max_connections:
                self._arm_request_timer()
                return
            log.warning("refusing a connection: %d are open (max-connections)", open_now - 1)
            if BoundedHttpProtocol.waiting_refusals >= _WAITING_REFUSALS:
                self._refuse(busy)  # too many wait already: answered at once, with no request header known
                return
            # The answer waits for the request's head (briefly: a client sends it with the connection), so that it
            # carries the X-Request-ID and CORS headers that the request's headers call for, and so that the close
            # comes after the request was read (unread bytes would turn it into a reset, which may lose the answer).
            # Meanwhile the connection is not counted as open.
            self._refusal, self._waiting = busy, True
            BoundedHttpProtocol.waiting_refusals += 1
            self._request_timer = self.loop.call_later(min(header_timeout, _REFUSAL_WAIT), self._request_timed_out)

        def data_received(self, data: bytes) -> None:
            if self._refused:
                return  # resumed by a pipelined request's cycle: what comes after a refusal is not read
            if self._in_head:
                self._head_bytes += len(data)
            super().data_received(data)
            # headers that never end are refused as they grow (httptools would hold them all in memory); the
            # whole head of a request that ended in this piece is measured in `on_headers_complete`
            if (
                self._in_head
                and self._head_bytes > max_head_bytes
                and not self._refused
                and not self.transport.is_closing()
            ):
                self._refuse_head()

        def on_headers_complete(self) -> None:
            self._in_head = False
            if self._refused:
                return  # a request that came after a refused one, in the same piece of data
            if len(self.url) + sum(len(name) + len(value) for name, value in self.headers) > max_head_bytes:
                self._refuse_head()
            elif self._refusal is not None:
                self._refuse(self._refusal)
            else:
                super().on_headers_complete()

        def on_body(self, body: bytes) -> None:
            if not self._refused:  # a refused request has no cycle to take its body
                super().on_body(body)

        def _should_upgrade(self) -> bool:
            return not self._refused and super()._should_upgrade()  # a refused request is not handed to websockets

        def send_400_response(self, msg: str) -> None:
            if not self._refused:  # else the request that did not parse came after a refused one
                self._refuse(_Refusal(400, msg, "invalid_request_error"))

        def on_message_complete(self) -> None:
            if self._refused:
                return
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
            self._stop_waiting()
            super().connection_lost(exc)

        def _refuse_head(self) -> None:
            log.warning("refusing a request whose line and headers exceed %d bytes", max_head_bytes)
            self._refuse(head_too_large)

        def _refuse(self, refusal: _Refusal) -> None:
            """Answer `refusal` and close the connection, reading nothing more. Its headers come from the request
            headers read so far: while a head still arrives, those before the point where it was cut off (an Origin
            still to come is not waited for, which would mean reading on past a bound: that page sees a network
            error rather than the status); none when no head has begun."""
            self._refused = True
            self._stop_waiting()
            self._disarm_request_timer()
            self.transport.pause_reading()
            # An answer the app's header middleware run through: a task, as any ASGI call (uvicorn's shutdown waits
            # for the server's tasks).
            task = self.loop.create_task(
                self._write_refusal(refusal, list(self.headers or []), getattr(self, "url", b""))
            )
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

        async def _write_refusal(self, refusal: _Refusal, request: Headers, url: bytes) -> None:
            body = refusal.body(url)
            try:
                headers = await _answer_headers(self.config.app, refusal, body, request)
                if not self.transport.is_closing():
                    default = self.server_state.default_headers  # date and server, as on every uvicorn answer
                    self.transport.write(_close_with(refusal.status, [*default, *headers], body))
            finally:
                self.transport.close()

        def _stop_waiting(self) -> None:
            if self._waiting:
                self._waiting = False
                BoundedHttpProtocol.waiting_refusals -= 1

        def _arm_request_timer(self) -> None:
            self._disarm_request_timer()
            self._request_timer = self.loop.call_later(header_timeout, self._request_timed_out)

        def _disarm_request_timer(self) -> None:
            if self._request_timer is not None:
                self._request_timer.cancel()
                self._request_timer = None

        def _request_timed_out(self) -> None:
            self._request_timer = None
            if self._refusal is not None:  # refused, and its request's head has not come: answered all the same
                self._refuse(self._refusal)
                return
            cycle = self.cycle
            # between requests, in a request's headers, or in its body (a running request whose body stalled)
            if cycle is None or cycle.response_complete or cycle.more_body:
                self.transport.close()

    return BoundedHttpProtocol


class Server(uvicorn.Server):
    def __init__(
        self,
        config: uvicorn.Config,
        runtime: Runtime,
        admission: Admission,
        drain_timeout: float,
        cut_off: Callable[[], None] = lambda: None,
    ) -> None:
        """`cut_off`: ends every request still in flight when the drain's time runs out, each with an answer (the
        app's `Guard.cut_off`)."""
        super().__init__(config)
        self.runtime, self.admission, self.drain_timeout = runtime, admission, drain_timeout
        self._cut_requests = cut_off
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
            self._cut_requests()  # each answered (a 503, or its stream's error event) rather than dropped
            await self.admission.wait_idle(_CUT_OFF_GRACE)
        self.config.timeout_graceful_shutdown = 1
        self.should_exit = True
