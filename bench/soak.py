"""Soak: mixed traffic against one server for a set time, then error counts, latencies and memory growth.

    .venv/bin/python bench/soak.py [--seconds 60] [--workers 8] [--parallel 4] [--threads N] [--seed 0]

A corral server is started on a free port with a temporary store (the bundled models are imported into it)
and `--workers` clients send requests back to back, each picking its next kind at random by weight:

    chat         POST /v1/chat/completions                      expects 200 and a message
    stream       POST /v1/chat/completions, stream: true        expects 200, content chunks, then [DONE]
    completions  POST /v1/completions                           expects 200 and a text
    embeddings   POST /v1/embeddings, model all-minilm          expects 200 and 384-value vectors
    disconnect   a stream (SSE or /api/chat NDJSON) that the client drops after its first content chunks
    bad          malformed JSON, an unknown model, out-of-range or unknown fields, an empty messages list or
                 input, max_tokens past the context, n past the slots: each expects its own 4xx

If /v1/embeddings cannot serve all-minilm when the run starts, that kind is skipped and the table says why.
A request is `ok` when it got the status and body it expects; any other status counts as unexpected (and as
5xx when it is one), and a transport failure or malformed body as an exception. Latency is the whole request
(to [DONE] for streams, to the drop for disconnects). The server's RSS is read from /proc after the warm-up
and again when the traffic has stopped and the server is idle.

The clients run on the same machine as the server, so by default the server gets one core fewer than the
machine has: llama.cpp's threads spin while they wait for each other, and with every core given to them, a
busy client (or any other load) can slow decoding down many times over.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import subprocess
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from server import start_server

MODEL = "smollm2:135m"
EMBED_MODEL = "all-minilm"
WEIGHTS = {"chat": 3, "stream": 3, "completions": 2, "embeddings": 2, "disconnect": 2, "bad": 2}
TOPICS = ["the sea", "a dragon", "bread", "the moon", "trains", "a small bird", "rain", "chess", "a lighthouse"]


@dataclass
class Tally:
    count: int = 0
    ok: int = 0
    unexpected: int = 0  # a status other than the expected one (5xx included)
    server_errors: int = 0  # 5xx
    exceptions: int = 0  # transport failures, timeouts, bodies that are not what the status promised
    latencies: list[float] = field(default_factory=list)
    examples: list[str] = field(default_factory=list)

    def note(self, what: str) -> None:
        if len(self.examples) < 3:
            self.examples.append(what[:300])


class Unexpected(Exception):
    """The request got an answer other than the one its kind expects."""

    def __init__(self, status: int, body: str) -> None:
        super().__init__(f"HTTP {status}: {body[:200]}")
        self.status = status


def _prompt(rng: random.Random) -> list[dict]:
    return [{"role": "user", "content": f"Tell me one fact about {rng.choice(TOPICS)} ({rng.randrange(10**6)})."}]


def _expect(r: httpx.Response, status: int = 200) -> dict:
    if r.status_code != status:
        raise Unexpected(r.status_code, r.text)
    return r.json()


async def do_chat(client: httpx.AsyncClient, rng: random.Random) -> None:
    body = _expect(await client.post("/v1/chat/completions", json={
        "model": MODEL, "messages": _prompt(rng), "max_tokens": rng.randint(8, 32), "seed": rng.randrange(1000)}))
    assert isinstance(body["choices"][0]["message"]["content"], str) and body["usage"]["completion_tokens"] > 0


async def do_stream(client: httpx.AsyncClient, rng: random.Random) -> None:
    request = {"model": MODEL, "messages": _prompt(rng), "max_tokens": rng.randint(8, 48), "stream": True,
               "stream_options": {"include_usage": True}}
    last, content, usage = "", 0, None
    async with client.stream("POST", "/v1/chat/completions", json=request) as r:
        if r.status_code != 200:
            raise Unexpected(r.status_code, (await r.aread()).decode(errors="replace"))
        async for line in r.aiter_lines():
            if not line:
                continue
            last = line
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                assert "error" not in chunk, chunk["error"]
                if chunk["choices"]:
                    content += bool(chunk["choices"][0]["delta"].get("content"))
                else:
                    usage = chunk["usage"]
    assert last == "data: [DONE]" and usage is not None and usage["completion_tokens"] > 0, (last, usage)


async def do_completions(client: httpx.AsyncClient, rng: random.Random) -> None:
    body = _expect(await client.post("/v1/completions", json={
        "model": MODEL, "prompt": f"A short poem about {rng.choice(TOPICS)}:\n", "max_tokens": rng.randint(8, 32)}))
    assert isinstance(body["choices"][0]["text"], str) and body["usage"]["completion_tokens"] > 0


async def do_embeddings(client: httpx.AsyncClient, rng: random.Random) -> None:
    inputs = [f"{rng.choice(TOPICS)} number {rng.randrange(10**6)}" for _ in range(rng.randint(1, 8))]
    body = _expect(await client.post("/v1/embeddings", json={"model": EMBED_MODEL, "input": inputs,
                                                                   "encoding_format": "float"}))
    assert len(body["data"]) == len(inputs) and all(len(d["embedding"]) == 384 for d in body["data"])


async def do_disconnect(client: httpx.AsyncClient, rng: random.Random) -> None:
    chunks = rng.randint(1, 4)
    if rng.random() < 0.5:
        path, request = "/v1/chat/completions", {"model": MODEL, "messages": _prompt(rng), "stream": True,
                                                 "max_tokens": 400}
    else:
        path, request = "/api/chat", {"model": MODEL, "messages": _prompt(rng), "options": {"num_predict": 400}}
    seen = 0
    async with client.stream("POST", path, json=request) as r:
        if r.status_code != 200:
            raise Unexpected(r.status_code, (await r.aread()).decode(errors="replace"))
        async for line in r.aiter_lines():
            if line.startswith("data: {") or line.startswith("{"):
                chunk = json.loads(line.removeprefix("data: "))
                assert "error" not in chunk, chunk["error"]
                seen += 1
                if seen >= chunks:
                    return  # leaving the block mid-body drops the connection


def _bad_request(rng: random.Random) -> tuple[str, dict | bytes, int]:
    """One bad request: (path, body, the status it must get)."""
    return rng.choice([
        ("/v1/chat/completions", b'{"model": "smollm2:135m", "messages": [', 400),  # malformed JSON
        ("/v1/chat/completions", {"model": "no-such-model:7b", "messages": _prompt(rng)}, 404),
        ("/v1/chat/completions", {"model": MODEL, "messages": _prompt(rng), "temperature": 5}, 400),
        ("/v1/chat/completions", {"model": MODEL, "messages": []}, 400),
        ("/v1/chat/completions", {"model": MODEL, "messages": _prompt(rng), "frobnicate": True}, 400),
        ("/v1/chat/completions", {"model": MODEL, "messages": _prompt(rng), "max_tokens": 10**7}, 400),
        ("/v1/completions", {"model": MODEL, "prompt": "x", "n": 10**4}, 400),
        ("/v1/embeddings", {"model": MODEL, "input": []}, 400),
        ("/api/chat", {"model": MODEL, "messages": "not a list"}, 400),
        ("/api/generate", {"model": "no-such-model", "prompt": "hi", "stream": False}, 404),
    ])


async def do_bad(client: httpx.AsyncClient, rng: random.Random) -> None:
    path, body, status = _bad_request(rng)
    if isinstance(body, bytes):
        r = await client.post(path, content=body, headers={"content-type": "application/json"})
    else:
        r = await client.post(path, json=body)
    if r.status_code != status:
        raise Unexpected(r.status_code, f"{path} {str(body)[:80]}: {r.text}")
    payload = r.json()
    assert "error" in payload, payload


KINDS: dict[str, Callable[[httpx.AsyncClient, random.Random], Awaitable[None]]] = {
    "chat": do_chat, "stream": do_stream, "completions": do_completions, "embeddings": do_embeddings,
    "disconnect": do_disconnect, "bad": do_bad,
}


async def worker(url: str, deadline: float, kinds: list[str], weights: list[int], seed: int,
                 tallies: dict[str, Tally]) -> None:
    rng = random.Random(seed)
    limits = httpx.Limits(max_connections=4)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        while time.monotonic() < deadline:
            kind = rng.choices(kinds, weights)[0]
            tally = tallies[kind]
            started = time.perf_counter()
            try:
                await KINDS[kind](client, rng)
                tally.ok += 1
            except Unexpected as exc:
                tally.unexpected += 1
                tally.server_errors += exc.status >= 500
                tally.note(str(exc))
            except (httpx.HTTPError, AssertionError, ValueError, KeyError, TypeError, IndexError) as exc:
                tally.exceptions += 1
                tally.note(f"{type(exc).__name__}: {exc}")
            tally.count += 1
            tally.latencies.append(time.perf_counter() - started)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]  # nearest rank


def rss(pid: int, key: str = "VmRSS") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0


async def warm_up(url: str) -> str | None:
    """Loads the models; returns why embeddings are skipped, or None when they work."""
    async with httpx.AsyncClient(base_url=url, timeout=300) as client:
        r = await client.post("/v1/chat/completions", json={"model": MODEL, "max_tokens": 4,
                                                            "messages": [{"role": "user", "content": "Hi"}]})
        if r.status_code != 200:
            raise SystemExit(f"chat does not work: HTTP {r.status_code} {r.text[:300]}")
        try:
            r = await client.post("/v1/embeddings", json={"model": EMBED_MODEL, "input": "hello"})
        except httpx.HTTPError as exc:
            return f"{type(exc).__name__}"
        if r.status_code != 200:
            try:
                error = r.json()["error"]
                return f"HTTP {r.status_code}: {error['message'] if isinstance(error, dict) else error}"[:160]
            except (ValueError, KeyError, TypeError):
                return f"HTTP {r.status_code}: {r.text[:120]}"
        return None


async def soak(url: str, seconds: float, workers: int, seed: int, skip: set[str]) -> dict[str, Tally]:
    kinds = [k for k in WEIGHTS if k not in skip]
    tallies = {k: Tally() for k in WEIGHTS}
    deadline = time.monotonic() + seconds
    await asyncio.gather(*(worker(url, deadline, kinds, [WEIGHTS[k] for k in kinds], seed + i, tallies)
                           for i in range(workers)))
    return tallies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=60, help="how long the traffic runs")
    parser.add_argument("--workers", type=int, default=8, help="concurrent clients")
    parser.add_argument("--parallel", type=int, default=4, help="CORRAL_NUM_PARALLEL for the server")
    parser.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 1) - 1),
                        help="CORRAL_NUM_THREADS (default: one core left for the clients, which share the machine)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "server.log"
        started = time.monotonic()
        proc, url = start_server(Path(tmp) / "models", log, num_parallel=args.parallel,
                                 num_threads=args.threads)
        try:
            rss_boot = rss(proc.pid)
            skipped = asyncio.run(warm_up(url))
            skip = {"embeddings"} if skipped else set()
            asyncio.run(soak(url, min(5.0, args.seconds), args.workers, args.seed + 1000, skip))  # warm-up
            time.sleep(1.0)
            rss_start = rss(proc.pid)
            t0 = time.monotonic()
            tallies = asyncio.run(soak(url, args.seconds, args.workers, args.seed, skip))
            elapsed = time.monotonic() - t0
            time.sleep(1.0)  # the last abandoned streams are dropped at the engine's next step
            rss_end, rss_peak = rss(proc.pid), rss(proc.pid, "VmHWM")
            after = httpx.post(url + "/v1/chat/completions", timeout=120, json={
                "model": MODEL, "max_tokens": 4, "messages": [{"role": "user", "content": "Hi"}]}).status_code
            alive = proc.poll() is None
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        server_log = log.read_text(errors="replace")
    tracebacks = server_log.count("Traceback")
    error_lines = sum(1 for line in server_log.splitlines() if " ERROR " in line)

    threads = f"{args.threads} llama.cpp thread{'s' * (args.threads != 1)}"
    print(f"soak: {elapsed:.0f} s of mixed traffic from {args.workers} workers, {args.parallel} slots, {threads}, "
          f"model {MODEL} (server up {time.monotonic() - started:.0f} s in all)")
    print()
    header = (f"{'kind':<13}{'requests':>9}{'ok':>7}{'unexpected':>11}{'5xx':>5}{'exceptions':>11}"
              f"{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}")
    print(header)
    print("-" * len(header))
    total = Tally()
    for kind, t in tallies.items():
        if kind == "embeddings" and skipped:
            print(f"{kind:<13}  skipped: /v1/embeddings with {EMBED_MODEL} is not available ({skipped})")
            continue
        total.count += t.count
        total.ok += t.ok
        total.unexpected += t.unexpected
        total.server_errors += t.server_errors
        total.exceptions += t.exceptions
        total.latencies += t.latencies
        print(f"{kind:<13}{t.count:>9}{t.ok:>7}{t.unexpected:>11}{t.server_errors:>5}{t.exceptions:>11}"
              f"{percentile(t.latencies, 50) * 1000:>9.0f}{percentile(t.latencies, 95) * 1000:>9.0f}"
              f"{percentile(t.latencies, 99) * 1000:>9.0f}")
    print("-" * len(header))
    print(f"{'all':<13}{total.count:>9}{total.ok:>7}{total.unexpected:>11}{total.server_errors:>5}"
          f"{total.exceptions:>11}{percentile(total.latencies, 50) * 1000:>9.0f}"
          f"{percentile(total.latencies, 95) * 1000:>9.0f}{percentile(total.latencies, 99) * 1000:>9.0f}")
    print(f"{total.count / elapsed:.1f} requests/s")
    print()
    mib = 1 << 20
    print(f"server RSS: {rss_boot / mib:.1f} MiB at start, {rss_start / mib:.1f} MiB after warm-up, "
          f"{rss_end / mib:.1f} MiB at the end: {(rss_end - rss_start) / mib:+.1f} MiB over the run "
          f"(peak {rss_peak / mib:.1f} MiB)")
    print(f"after the run: server {'alive' if alive else 'DEAD'}, a chat request got HTTP {after}; server log: "
          f"{tracebacks} tracebacks, {error_lines} ERROR lines")
    for kind, t in tallies.items():
        for example in t.examples:
            print(f"  {kind}: {example}")


if __name__ == "__main__":
    main()
