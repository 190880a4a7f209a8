"""Server-sent events: framing, and the rule that a stream which has begun ends with an error event and [DONE]."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi.responses import StreamingResponse

log = logging.getLogger(__name__)

DONE = "data: [DONE]\n\n"


def sse(data: Any, event: str | None = None) -> str:
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n"


def sse_response(
    events: AsyncIterator[Any], error_payload: Callable[[Exception], Any], error_event: str | None = "error"
) -> StreamingResponse:
    """Stream `events` (JSON-able objects) as SSE, then [DONE]. A failure mid-stream becomes one error event."""

    async def body() -> AsyncIterator[str]:
        try:
            async for item in events:
                yield sse(item)
        except Exception as exc:
            log.warning("stream failed after it began: %s", exc)
            yield sse(error_payload(exc), event=error_event)
        finally:
            await events.aclose()  # type: ignore[attr-defined]
        yield DONE

    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(body(), media_type="text/event-stream", headers=headers)
