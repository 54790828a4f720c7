"""The embedding engine: one llama context in embeddings mode and one thread that runs its batches.

Inputs of every queued request are packed together into one `llama_batch` (one sequence id per input,
up to `n_ctx` tokens), evaluated by one `llama_decode` call (llama.cpp encodes when the model is an
encoder), and pooled per sequence by llama.cpp (`llama_get_embeddings_seq`), so concurrent requests share
batches. The event loop never runs compute.

The engine's thread starts when work arrives and ends after `LINGER` seconds without any. A thread that
has run ggml compute keeps an OpenMP thread pool; while a second pool exists beside the generation
runner's, libgomp manages more threads than there are cores and its workers stop spinning between
barriers, which measured 35% slower generation on a 2-core machine for as long as the pool lived. When the
embedding thread ends, its pool goes with it and generation is back at full speed.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from dataclasses import dataclass, field

import llama_cpp.llama_cpp as ll
import numpy as np

from .model import LlamaModel

log = logging.getLogger("corral.engine")

LINGER = 0.25  # seconds the engine's thread waits for more work before it ends

POOLING_NAMES = {ll.LLAMA_POOLING_TYPE_MEAN: "mean", ll.LLAMA_POOLING_TYPE_CLS: "cls",
                 ll.LLAMA_POOLING_TYPE_LAST: "last", ll.LLAMA_POOLING_TYPE_RANK: "rank"}


def declared_pooling(model: LlamaModel) -> int:
    """The pooling the GGUF declares (`<arch>.pooling_type`), or LLAMA_POOLING_TYPE_UNSPECIFIED."""
    arch = model.meta("general.architecture") or ""
    raw = (model.meta(f"{arch}.pooling_type") or "").strip()
    return int(raw) if raw.lstrip("-").isdigit() else ll.LLAMA_POOLING_TYPE_UNSPECIFIED


class EmbedError(RuntimeError):
    """An embedding job failed in the engine; the message says why."""


@dataclass(frozen=True)
class EmbedderConfig:
    n_ctx: int = 512  # the most tokens one input may have; also tokens per batch (an input fits one ubatch)
    n_seq_max: int = 64  # inputs per batch
    n_threads: int = 2


@dataclass(eq=False)
class EmbedJob:
    """Token lists to embed; `vectors` fills in input order. Resolve by awaiting `wait()`."""

    inputs: list[list[int]]
    vectors: list[np.ndarray | None] = field(default_factory=list)
    loop: asyncio.AbstractEventLoop | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)
    _future: asyncio.Future | None = None
    _left: int = 0
    _error: str | None = None

    def __post_init__(self) -> None:
        self.vectors = [None] * len(self.inputs)
        self._left = len(self.inputs)

    def bind(self) -> None:
        self.loop = asyncio.get_running_loop()
        self._future = self.loop.create_future()

    async def wait(self) -> list[np.ndarray]:
        assert self._future is not None, "bind() the job before submitting it"
        try:
            await self._future
        finally:
            self.cancelled.set()  # a caller that went away leaves nothing behind in the queue
        if self._error is not None:
            raise EmbedError(self._error)
        return [v for v in self.vectors if v is not None]

    # engine side ---------------------------------------------------------------------------------
    def _done(self, index: int, vector: np.ndarray) -> bool:
        self.vectors[index] = vector
        self._left -= 1
        return self._left == 0

    def _resolve(self, error: str | None = None) -> None:
        self._error = error
        future, loop = self._future, self.loop
        if future is None or loop is None:
            return

        def settle() -> None:
            if not future.done():
                future.set_result(None)

        try:
            loop.call_soon_threadsafe(settle)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            pass


class Embedder:
    """Owns one model's embedding context. `submit` is safe from any thread; llama calls stay on one thread."""

    def __init__(self, model: LlamaModel, config: EmbedderConfig) -> None:
        self.model = model
        self.config = config
        handle = model.handle
        self.encoder_only = bool(ll.llama_model_has_encoder(handle)) and not ll.llama_model_has_decoder(handle)
        self.n_embd: int = ll.llama_model_n_embd_out(handle) or ll.llama_model_n_embd(handle)
        params = ll.llama_context_default_params()
        params.embeddings = True
        # The model's own pooling (BERT models carry it); a generative model has none: mean, as Ollama does.
        pooling = declared_pooling(model)
        params.pooling_type = pooling if pooling in POOLING_NAMES else ll.LLAMA_POOLING_TYPE_MEAN
        params.n_ctx = config.n_ctx
        params.n_batch = config.n_ctx
        params.n_ubatch = config.n_ctx  # an input never spans two ubatches: non-causal attention needs it whole
        params.n_seq_max = config.n_seq_max
        params.n_threads = config.n_threads
        params.n_threads_batch = config.n_threads
        params.kv_unified = True  # a batch's sequences share one stream of n_ctx cells, cleared between batches
        params.no_perf = True
        ctx = ll.llama_init_from_model(handle, params)
        if not ctx:
            raise RuntimeError(f"llama.cpp could not create an embedding context for {model.path}")
        self.ctx = ctx
        self.pooling = POOLING_NAMES.get(ll.llama_pooling_type(ctx), "none")
        self.memory = ll.llama_get_memory(ctx)  # None for encoder-only models: they keep no cache
        self._batch = ll.llama_batch_init(config.n_ctx, 0, 1)
        self._pending: collections.deque[tuple[EmbedJob, int]] = collections.deque()
        self._wake = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None  # at most one at a time; started by submit
        # Counters, for tests and benchmarks: model evaluations, the inputs they embedded, threads started.
        self.batches = 0
        self.sequences = 0
        self.threads_started = 0

    # -- public --------------------------------------------------------------------------------------
    def submit(self, job: EmbedJob) -> None:
        for tokens in job.inputs:
            if not 0 < len(tokens) <= self.config.n_ctx:
                raise ValueError(f"an input of {len(tokens)} tokens does not fit 1..{self.config.n_ctx}")
        if not job.inputs:
            job._resolve()
            return
        with self._wake:
            if self._stopping:
                raise EmbedError("the model was unloaded")
            self._pending.extend((job, i) for i in range(len(job.inputs)))
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name=f"corral-embedder-{self.model.path.name}",
                                                daemon=True)
                self.threads_started += 1
                self._thread.start()
            else:
                self._wake.notify()

    @property
    def busy(self) -> int:
        with self._wake:
            return len(self._pending)

    def close(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
            thread = self._thread
        if thread is not None:
            thread.join()
        with self._wake:
            jobs = {id(j): j for j, _ in self._pending}
            self._pending.clear()
        for job in jobs.values():
            job._resolve("the model was unloaded")
        ll.llama_batch_free(self._batch)
        ll.llama_free(self.ctx)

    # -- the loop ------------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._wake:
                idle_until = time.monotonic() + LINGER
                while not self._stopping and not self._pending:
                    left = idle_until - time.monotonic()
                    if left <= 0:
                        break
                    self._wake.wait(left)
                if self._stopping or not self._pending:
                    self._thread = None  # the next submit starts a fresh thread
                    return
                work = self._take()
            if not work:
                continue
            try:
                self._run(work)
            except Exception as exc:  # fail this batch's jobs, keep serving the others
                log.exception("embedding batch failed")
                for job in {id(j): j for j, _ in work}.values():
                    job._resolve(f"engine error: {exc}")

    def _take(self) -> list[tuple[EmbedJob, int]]:
        """First come, first served: inputs in queue order while they fit the batch's tokens and sequences."""
        work: list[tuple[EmbedJob, int]] = []
        tokens = 0
        while self._pending and len(work) < self.config.n_seq_max:
            job, i = self._pending[0]
            if job.cancelled.is_set() or job._error is not None:
                self._pending.popleft()
                continue
            size = len(job.inputs[i])
            if tokens + size > self.config.n_ctx:
                break
            self._pending.popleft()
            work.append((job, i))
            tokens += size
        return work

    def _run(self, work: list[tuple[EmbedJob, int]]) -> None:
        batch = self._batch
        n = 0
        for seq, (job, i) in enumerate(work):
            for pos, token in enumerate(job.inputs[i]):
                batch.token[n] = token
                batch.pos[n] = pos
                batch.n_seq_id[n] = 1
                batch.seq_id[n][0] = seq
                batch.logits[n] = 1  # pooling reads every token's output
                n += 1
        batch.n_tokens = n
        if self.memory:
            ll.llama_memory_clear(self.memory, True)
        rc = ll.llama_encode(self.ctx, batch) if self.encoder_only else ll.llama_decode(self.ctx, batch)
        if rc != 0:
            raise RuntimeError(f"llama_{'encode' if self.encoder_only else 'decode'} returned {rc}")
        self.batches += 1
        self.sequences += len(work)
        for seq, (job, i) in enumerate(work):
            ptr = ll.llama_get_embeddings_seq(self.ctx, seq)
            if not ptr:
                raise RuntimeError(f"llama.cpp returned no pooled embedding for sequence {seq}")
            vector = np.ctypeslib.as_array(ptr, shape=(self.n_embd,)).copy()
            if job._done(i, vector):
                job._resolve()
