"""Overload (issue 9, item 7): many more concurrent streams than slots all complete, without errors, in the
order they arrived. (Past CORRAL_MAX_QUEUE a request gets 503 at once: test_service_scheduler.py.)"""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest
from conftest import MODEL, start_server, stop_server

SLOTS = 8
STREAMS = 64
TOKENS = 12  # per stream; EOS is banned, so every stream generates exactly this many
STAGGER = 0.005  # seconds between the requests' starts, so their arrival order is known


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    root = tmp_path_factory.mktemp("overload")
    server = start_server(root / "models", root / "server.log", CORRAL_NUM_PARALLEL=str(SLOTS),
                          CORRAL_NUM_THREADS="1")
    yield server
    stop_server(server)


async def one(client: httpx.AsyncClient, i: int) -> dict:
    await asyncio.sleep(i * STAGGER)
    body = {"model": MODEL, "stream": True, "max_tokens": TOKENS, "seed": i, "logit_bias": {"0": -100, "2": -100},
            "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": f"Request {i}: tell me something about the sea."}]}
    result: dict = {"first": None, "text": "", "finish": None, "usage": None, "errors": [], "last": None}
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        result["status"] = r.status_code
        async for line in r.aiter_lines():
            if not line:
                continue
            result["last"] = line
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                result["errors"].append(chunk["error"])
            elif chunk["choices"]:
                choice = chunk["choices"][0]
                if choice["delta"].get("content"):
                    result["first"] = result["first"] or time.monotonic()
                    result["text"] += choice["delta"]["content"]
                result["finish"] = choice["finish_reason"] or result["finish"]
            else:
                result["usage"] = chunk["usage"]
    return result


async def flood(url: str) -> list[dict]:
    limits = httpx.Limits(max_connections=STREAMS + 8, max_keepalive_connections=STREAMS + 8)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as client:
        return await asyncio.gather(*(one(client, i) for i in range(STREAMS)))


def test_64_streams_on_8_slots_all_complete_in_arrival_order(srv):
    httpx.post(srv.url + "/v1/chat/completions", timeout=120, json={  # loads the model
        "model": MODEL, "max_tokens": 1, "messages": [{"role": "user", "content": "Hi"}]})
    results = asyncio.run(flood(srv.url))

    for i, r in enumerate(results):
        assert r["status"] == 200 and not r["errors"], (i, r)
        assert r["last"] == "data: [DONE]" and r["finish"] == "length" and r["text"], (i, r)
        assert r["usage"]["completion_tokens"] == TOKENS, (i, r["usage"])

    # First come, first served. With 8 slots, up to 8 streams start in the same step, so only requests at
    # least 8 apart have a fixed order: by the time request j gets a slot, every request up to j - 8 has
    # finished, so its first token came TOKENS steps earlier.
    firsts = [r["first"] for r in results]
    late = [(i, j) for i in range(STREAMS) for j in range(i + SLOTS, STREAMS) if firsts[i] >= firsts[j]]
    assert not late, f"requests served before ones that arrived at least {SLOTS} earlier: {late[:10]}"
    order = sorted(range(STREAMS), key=lambda i: firsts[i])
    assert max(abs(position - i) for position, i in enumerate(order)) < SLOTS, order
