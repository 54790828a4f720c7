"""Properties of the stream writers: OpenAI's SSE (`sse_bytes`) and Ollama's NDJSON (`_ndjson`, `_progress`).

Any sequence of chunks, with any unicode in them, comes out of the framing exactly as it went in, however the
bytes are cut into reads on the way; and a failure after the response has started ends the stream with its
API's documented error (an OpenAI error frame with no `[DONE]`, or Ollama's `{"error": "..."}` as the last
line), for the service's own errors and for unexpected ones alike.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator, Iterable
from typing import Any

import pytest
from fastapi.responses import JSONResponse, StreamingResponse
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from corral.protocol.native import GenerateChunk, StatusResponse
from corral.protocol.openai import ChatCompletionChunk, ChunkChoice, Delta
from corral.server.native_routes import _ndjson, _progress
from corral.server.sse import DONE, sse_bytes
from corral.service.errors import EngineFailure, InvalidRequest, ModelNotFound, ServiceError

# Text that leans on what framing must survive (newlines of every kind, quotes, escapes, "data:", NUL,
# astral characters), mixed with arbitrary text; surrogates cannot be encoded as UTF-8 and are left out.
tricky_text = st.one_of(
    st.text(),
    st.lists(st.sampled_from(["\n", "\r", "\r\n", "\u2028", "\u0085", '"', "\\", "data: ", "[DONE]", "\x00",
                              "é", "😀", "\ufeff", " "]), max_size=16).map("".join),
)
texts = st.lists(tricky_text, max_size=8)
service_errors = st.builds(lambda cls, message: cls(message), st.sampled_from([InvalidRequest, EngineFailure]),
                           tricky_text) | st.builds(ModelNotFound, tricky_text)
# Where a failure strikes: never, or after that many chunks have gone out.
failure_at = st.none() | st.integers(min_value=0, max_value=8)


def _run(coro: Any) -> Any:
    return asyncio.run(coro)


async def _source(items: list[Any], fail_at: int | None, error: Exception) -> AsyncIterator[Any]:
    for index, item in enumerate(items):
        if index == fail_at:
            raise error
        yield item
    if fail_at is not None and fail_at >= len(items):
        raise error


def _cut(data: bytes, cuts: Iterable[int]) -> list[bytes]:
    """`data` split at the given offsets, as a network might deliver it."""
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in zip(points, points[1:])]


def read_sse(reads: list[bytes]) -> list[str]:
    """A client's SSE reader (the WHATWG event-stream rules, `data` fields only): the data of each event."""
    buffer, events, data = b"", [], []
    for read in reads:
        buffer += read
        *lines, buffer = re.split(rb"\r\n|\r|\n", buffer)  # the last piece may be an unfinished line
        for line in lines:
            text = line.decode()
            if not text:
                if data:
                    events.append("\n".join(data))
                data = []
            elif text.startswith("data:"):
                data.append(text[5:].removeprefix(" "))
    assert buffer == b"" and not data, "the stream ended inside an event"
    return events


def read_ndjson(reads: list[bytes]) -> list[Any]:
    """A client's NDJSON reader: one JSON value per `\\n`-terminated line."""
    buffer, values = b"", []
    for read in reads:
        buffer += read
        *lines, buffer = buffer.split(b"\n")
        values += [json.loads(line) for line in lines]
    assert buffer == b"", "the stream ended inside a line"
    return values


def _chat_chunk(text: str) -> ChatCompletionChunk:
    return ChatCompletionChunk(id="chatcmpl-1", created=1, model="m", system_fingerprint="fp",
                               choices=[ChunkChoice(index=0, delta=Delta(content=text))])


# -- SSE ----------------------------------------------------------------------------------------------


async def _sse(groups: AsyncIterator[list[BaseModel]]) -> list[bytes]:
    return [b async for b in sse_bytes(groups)]


@settings(max_examples=200, deadline=None)
@given(st.lists(texts, max_size=6), st.lists(st.integers(min_value=0), max_size=12))
def test_sse_round_trips_any_text_exactly(groups: list[list[str]], cuts: list[int]) -> None:
    async def chunks() -> AsyncIterator[list[BaseModel]]:
        for group in groups:
            yield [_chat_chunk(text) for text in group]

    writes = _run(_sse(chunks()))
    assert len(writes) == len(groups) + 1 and writes[-1] == DONE  # one write per group, then [DONE]
    events = read_sse(_cut(b"".join(writes), cuts))
    assert events[-1] == "[DONE]"
    got = [json.loads(event)["choices"][0]["delta"]["content"] for event in events[:-1]]
    assert got == [text for group in groups for text in group]


@settings(max_examples=200, deadline=None)
@given(texts, failure_at, service_errors, st.lists(st.integers(min_value=0), max_size=12))
def test_sse_service_error_mid_stream_is_the_last_event(
    sent: list[str], fail_at: int | None, error: ServiceError, cuts: list[int]
) -> None:
    groups = _source([[_chat_chunk(text)] for text in sent], fail_at, error)
    events = read_sse(_cut(b"".join(_run(_sse(groups))), cuts))
    if fail_at is None:
        assert events[-1] == "[DONE]" and len(events) == len(sent) + 1
        return
    delivered = min(fail_at, len(sent))
    assert len(events) == delivered + 1 and "[DONE]" not in events
    assert [json.loads(e)["choices"][0]["delta"]["content"] for e in events[:-1]] == sent[:delivered]
    assert json.loads(events[-1]) == {
        "error": {"message": error.message, "type": error.kind, "param": None, "code": error.code}}


@pytest.mark.parametrize("error", [RuntimeError("boom"), KeyError("x"), asyncio.TimeoutError()])
def test_sse_unexpected_error_mid_stream_is_a_server_error_event(error: Exception) -> None:
    events = read_sse(_run(_sse(_source([[_chat_chunk("a")]], 1, error))))
    assert json.loads(events[0])["choices"][0]["delta"]["content"] == "a"
    assert json.loads(events[1]) == {"error": {"message": f"internal error: {type(error).__name__}",
                                               "type": "server_error", "param": None, "code": None}}
    assert len(events) == 2


# -- NDJSON -------------------------------------------------------------------------------------------


async def _body(response: StreamingResponse) -> list[bytes]:
    return [b if isinstance(b, bytes) else b.encode() async for b in response.body_iterator]


def _generate_chunk(text: str) -> GenerateChunk:
    return GenerateChunk(model="m", created_at="2024-01-01T00:00:00Z", response=text, done=False)


@settings(max_examples=200, deadline=None)
@given(texts, failure_at, service_errors, st.lists(st.integers(min_value=0), max_size=12))
def test_ndjson_round_trips_any_text_and_ends_with_the_error_line(
    sent: list[str], fail_at: int | None, error: ServiceError, cuts: list[int]
) -> None:
    response = _ndjson(_source([_generate_chunk(text) for text in sent], fail_at, error))
    assert response.media_type == "application/x-ndjson"
    writes = _run(_body(response))
    assert all(w.endswith(b"\n") and w.count(b"\n") == 1 for w in writes)  # one whole line per write
    lines = read_ndjson(_cut(b"".join(writes), cuts))
    delivered = len(sent) if fail_at is None else min(fail_at, len(sent))
    assert [line["response"] for line in lines[:delivered]] == sent[:delivered]
    if fail_at is None:
        assert len(lines) == len(sent)
    else:
        assert lines[delivered:] == [{"error": error.message}]


@pytest.mark.parametrize("error", [RuntimeError("boom"), KeyError("x")])
def test_ndjson_unexpected_error_mid_stream_is_an_error_line(error: Exception) -> None:
    lines = read_ndjson(_run(_body(_ndjson(_source([_generate_chunk("a")], 1, error)))))
    assert lines == [json.loads(_generate_chunk("a").model_dump_json()),
                     {"error": f"internal error: {type(error).__name__}"}]


# -- _progress (pull, push, create) -------------------------------------------------------------------

statuses = st.lists(st.builds(StatusResponse, status=tricky_text, digest=st.none() | tricky_text,
                              total=st.none() | st.integers(min_value=0), completed=st.none() | st.integers(0)),
                    min_size=1, max_size=6)


async def _progress_lines(items: list[StatusResponse], fail_at: int | None, error: Exception,
                          stream: bool | None) -> tuple[int, list[Any]]:
    response = await _progress(_source(items, fail_at, error), stream)
    if isinstance(response, JSONResponse):
        return response.status_code, [json.loads(response.body)]
    return response.status_code, read_ndjson(await _body(response))


@settings(max_examples=200, deadline=None)
@given(statuses, failure_at, service_errors)
def test_progress_streams_every_status_and_ends_with_the_error_line(
    items: list[StatusResponse], fail_at: int | None, error: ServiceError
) -> None:
    if fail_at == 0:  # before the first status: the route's error, with its status code, not a stream
        with pytest.raises(type(error)):
            _run(_progress_lines(items, fail_at, error, True))
        return
    status, lines = _run(_progress_lines(items, fail_at, error, True))
    delivered = len(items) if fail_at is None else min(fail_at, len(items))
    assert status == 200
    assert lines[:delivered] == [s.model_dump(exclude_none=True) for s in items[:delivered]]
    assert lines[delivered:] == ([] if fail_at is None else [{"error": error.message}])


@settings(max_examples=100, deadline=None)
@given(statuses, st.sampled_from([False, None]))
def test_progress_not_streamed_is_the_last_status(items: list[StatusResponse], stream: bool | None) -> None:
    status, body = _run(_progress_lines(items, None, RuntimeError(), stream))
    assert status == 200 and body == [items[-1].model_dump(exclude_none=True)]


def test_progress_unexpected_error_after_the_first_status_is_an_error_line() -> None:
    items = [StatusResponse(status="pulling manifest"), StatusResponse(status="success")]
    _, lines = _run(_progress_lines(items, 1, OSError("disk full"), True))
    assert lines == [{"status": "pulling manifest"}, {"error": "internal error: OSError"}]
