"""SSE framing, including the in-band error frame for failures after the stream has started."""

import asyncio
import json

from corral.protocol.openai import Completion, CompletionChoice
from corral.server.sse import DONE, sse_bytes
from corral.service.errors import EngineFailure


def chunk(text):
    return Completion(id="cmpl-1", created=1, model="m", system_fingerprint="fp",
                      choices=[CompletionChoice(index=0, text=text)])


def collect(gen):
    async def run():
        return [b async for b in sse_bytes(gen)]
    return asyncio.run(run())


def test_frames_then_done():
    async def chunks():
        yield [chunk("a")]
        yield [chunk("b")]

    frames = collect(chunks())
    assert frames[-1] == DONE
    assert all(f.startswith(b"data: ") and f.endswith(b"\n\n") for f in frames)
    assert [json.loads(f[6:])["choices"][0]["text"] for f in frames[:-1]] == ["a", "b"]
    assert b'"usage"' not in frames[0]


def test_a_group_of_chunks_is_one_write():
    async def chunks():
        yield [chunk("a"), chunk("b")]

    frames = collect(chunks())
    assert len(frames) == 2 and frames[0].count(b"data: ") == 2 and frames[1] == DONE


def test_error_after_start_is_an_error_frame_and_the_stream_ends():
    async def chunks():
        yield [chunk("a")]
        raise EngineFailure("decode failed")

    frames = collect(chunks())
    assert len(frames) == 2
    err = json.loads(frames[1][6:])["error"]
    assert err["message"] == "decode failed" and set(err) == {"message", "type", "param", "code"}
