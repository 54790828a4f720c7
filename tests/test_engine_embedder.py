"""The embedding engine: inputs of queued jobs share batches, vectors do not depend on batch company."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import numpy as np
import pytest

from corral.engine.embedder import Embedder, EmbedderConfig, EmbedJob
from corral.engine.model import LlamaModel


@pytest.fixture(scope="module")
def engine(minilm_gguf: Path):
    model = LlamaModel(minilm_gguf)
    embedder = Embedder(model, EmbedderConfig(n_ctx=512, n_seq_max=64, n_threads=2))
    yield embedder
    embedder.close()
    model.close()


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


async def _run(engine: Embedder, *jobs: EmbedJob, hold: bool = False) -> list[list[np.ndarray]]:
    for job in jobs:
        job.bind()
    if hold:  # the engine cannot take work while the test holds its lock: every job is queued first
        with engine._wake:
            for job in jobs:
                engine.submit(job)
    else:
        for job in jobs:
            engine.submit(job)
    return list(await asyncio.gather(*(job.wait() for job in jobs)))


def test_queued_jobs_share_one_batch(engine, minilm_reference):
    tokens = minilm_reference["token_ids"]
    jobs = [EmbedJob([t]) for t in tokens[:5]] + [EmbedJob(tokens[5:8])]
    before = (engine.batches, engine.sequences)
    results = asyncio.run(_run(engine, *jobs, hold=True))
    assert engine.batches - before[0] == 1  # six requests, eight inputs: one llama_decode
    assert engine.sequences - before[1] == 8
    assert [len(r) for r in results] == [1, 1, 1, 1, 1, 3]


def test_vectors_do_not_depend_on_batch_company(engine, minilm_reference):
    tokens = minilm_reference["token_ids"]
    together = asyncio.run(_run(engine, EmbedJob(tokens)))[0]
    alone = [asyncio.run(_run(engine, EmbedJob([t])))[0][0] for t in tokens[:4]]
    for a, b in zip(alone, together):
        assert float(_unit(a) @ _unit(b)) > 0.99999


def test_large_jobs_are_split_by_tokens_and_sequences(engine):
    before = engine.batches
    inputs = [[101, 7592, 2088, 102]] * 200  # 800 tokens: more sequences than one batch takes
    vectors = asyncio.run(_run(engine, EmbedJob(inputs)))[0]
    assert len(vectors) == 200 and engine.batches - before == 4  # 64 sequences per batch at most
    assert all(float(_unit(v) @ _unit(vectors[0])) > 0.99999 for v in vectors)  # batch sizes differ
    before = engine.batches
    long = [[101] + [7592] * 300 + [102]] * 3  # 302 tokens each: one per batch of 512
    assert len(asyncio.run(_run(engine, EmbedJob(long)))[0]) == 3 and engine.batches - before == 3


def test_inputs_that_cannot_fit_are_refused_at_submit(engine):
    with pytest.raises(ValueError, match="513"):
        engine.submit(EmbedJob([[7592] * 513]))
    with pytest.raises(ValueError):
        engine.submit(EmbedJob([[]]))


def test_cancelled_jobs_are_skipped(engine):
    async def scenario() -> list[np.ndarray]:
        first, second = EmbedJob([[101, 7592, 102]] * 64), EmbedJob([[101, 2088, 102]])
        first.bind()
        second.bind()
        with engine._wake:
            engine.submit(first)
            engine.submit(second)
            first.cancelled.set()
        return await second.wait()

    before = engine.sequences
    assert len(asyncio.run(scenario())) == 1
    assert engine.sequences - before == 1


def test_the_engine_thread_ends_when_idle(engine, monkeypatch):
    """Its OpenMP pool ends with it, so generation in the same process is not slowed once embedding stops."""
    from corral.engine import embedder as module

    asyncio.run(_run(engine, EmbedJob([[101, 7592, 102]])))
    deadline = time.monotonic() + module.LINGER + 5
    while engine._thread is not None:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    started = engine.threads_started
    monkeypatch.setattr(module, "LINGER", 5.0)  # however slow this machine is right now
    for _ in range(3):  # back-to-back requests keep one thread
        asyncio.run(_run(engine, EmbedJob([[101, 2088, 102]])))
    assert engine.threads_started == started + 1
