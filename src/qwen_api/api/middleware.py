"""ASGI middleware: request ids, the body-size limit, per-route request metrics, and HEAD on every GET route.

Pure ASGI (no BaseHTTPMiddleware), so streaming responses pass through untouched and a client that leaves
is still seen by the route.
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import uuid
from typing import Any

from starlette.routing import Match, Router

from qwen_api.api.errors import error_payload
from qwen_api.metrics import Metrics

log = logging.getLogger(__name__)

request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")
_VALID_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")

Scope = dict[str, Any]


class RequestIdFilter(logging.Filter):
    """Puts the current request's id on every log record (`%(request_id)s`)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id_var.get()
        return True


class RequestId:
    """Every response carries X-Request-ID: the client's own when it sent a sane one, else a new one."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        given = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        rid = given if _VALID_ID.match(given) else uuid.uuid4().hex
        token = request_id_var.set(rid)

        async def send_with_id(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), (b"x-request-id", rid.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            request_id_var.reset(token)


class BodyLimit:
    """Refuse bodies over `max_bytes` with 413, by Content-Length up front or by counting a chunked body."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            return await self._refuse(scope, send)
        seen, refused = 0, False

        async def counting_receive() -> dict[str, Any]:
            nonlocal seen, refused
            if refused:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    # Answer 413 now; to the app the client has gone, and whatever it sends is dropped.
                    refused = True
                    await self._refuse(scope, send)
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: dict[str, Any]) -> None:
            if not refused:
                await send(message)

        await self.app(scope, counting_receive, guarded_send)

    async def _refuse(self, scope: Scope, send: Any) -> None:
        message = f"Request body too large: the limit is {self.max_bytes} bytes"
        payload = error_payload(scope["path"], 413, message, "invalid_request_error", "body_too_large")
        await _send_json(send, 413, payload)


class CatchAll:
    """The last resort: an exception no handler took becomes a 500 in the route's error shape, inside the request-id
    middleware (so it carries X-Request-ID) and without re-raising (so the keep-alive connection stays usable)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def tracking_send(message: dict[str, Any]) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as exc:
            log.exception("unhandled error on %s", scope.get("path"))
            if started:  # the answer has begun: nothing more can be said on this response
                return
            message = f"Internal server error ({type(exc).__name__}); request id {request_id_var.get()}"
            await _send_json(send, 500, error_payload(scope["path"], 500, message, "server_error"))


async def _send_json(send: Any, status: int, payload: dict[str, Any]) -> None:
    body = json.dumps(payload).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class HeadAsGet:
    """HEAD is answered as GET would be (the same status and headers, no body) on every path a GET route takes, as
    Starlette's own routes do: FastAPI's take only the methods they name, and load balancers and uptime checkers probe
    with HEAD. A route that names HEAD itself still gets it. The outermost middleware, so that every other one sees
    the request as its route does (the metrics count a HEAD under its route)."""

    def __init__(self, app: Any, router: Router) -> None:
        self.app, self.router = app, router

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["method"] == "HEAD" and not self._routed(scope):
            # A copy: the server's own scope still says HEAD, so that it sends the answer's headers and no body
            # (uvicorn drops a HEAD answer's body itself, as for Starlette's routes).
            scope = {**scope, "method": "GET"}
        await self.app(scope, receive, send)

    def _routed(self, scope: Scope) -> bool:
        """Whether a route takes this request as it is."""
        probe = dict(scope)  # matching may note its progress in the scope it is given
        return any(route.matches(probe)[0] is Match.FULL for route in self.router.routes)


class RequestMetrics:
    """Counts responses by route template (not raw path: bounded label values) and status."""

    def __init__(self, app: Any, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = 500

        async def send_status(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = scope.get("route")
            self.metrics.requests.labels(getattr(route, "path", "unmatched"), str(status)).inc()
