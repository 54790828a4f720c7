"""Server-sent events as OpenAI frames them: `data: <json>` per chunk, `data: [DONE]` at the end.

An error after the stream has started cannot change the status any more, so it goes out as one
`data: {"error": ...}` frame (which the official clients raise as an APIError) and the stream ends.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator

from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from ..service.errors import ServiceError

log = logging.getLogger("corral.server")

DONE = b"data: [DONE]\n\n"


def frame(payload: BaseModel | dict) -> bytes:
    data = payload.model_dump_json() if isinstance(payload, BaseModel) else json.dumps(payload)
    return b"data: " + data.encode() + b"\n\n"


def error_frame(message: str, kind: str = "server_error", code: str | None = None) -> bytes:
    return frame({"error": {"message": message, "type": kind, "param": None, "code": code}})


async def sse_bytes(chunks: AsyncIterator[list[BaseModel]]) -> AsyncIterator[bytes]:
    """Each list of chunks goes out as one write."""
    try:
        async for group in chunks:
            yield b"".join(frame(chunk) for chunk in group)
    except ServiceError as exc:
        yield error_frame(exc.message, exc.kind, exc.code)
        return
    except Exception as exc:  # the status is already sent; tell the client in-band
        log.exception("stream failed")
        yield error_frame(f"internal error: {type(exc).__name__}")
        return
    yield DONE


def sse_response(chunks: AsyncIterator[list[BaseModel]]) -> StreamingResponse:
    return StreamingResponse(
        sse_bytes(chunks),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
