"""The continuous-batching loop: one llama context, N sequence slots, one decode thread.

Each step builds one `llama_batch` holding the next token of every decoding sequence plus chunks of
pending prompts (bounded by `n_batch`, so a long prompt never stalls running streams), calls
`llama_decode` once, and samples every sequence that produced logits with its own sampler chain.
"""

from __future__ import annotations

import collections
import ctypes
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import llama_cpp.llama_cpp as ll
import numpy as np

from .job import Done, Failed, Finished, GenerateJob, PromptLogprobs, Token, deliver
from .model import LlamaModel
from .sampling import SequenceSampler
from .text import TextStream
from .vision import EmbeddingCache, MediaSpan, VisionContext, VisionError

log = logging.getLogger("corral.engine")


# Shared prompt tokens from which copying another slot's cache beats prefilling them again.
MIN_PREFIX_COPY = 16


def _outside_images(job: GenerateJob, keep: int) -> int:
    """`keep` moved back to the start of an image it falls inside: a cache never holds part of an image."""
    for span in job.media:
        if span.start < keep < span.end:
            return span.start
    return keep


@dataclass(frozen=True)
class RunnerConfig:
    n_ctx_per_seq: int = 4096
    n_parallel: int = 4
    n_threads: int = 2
    n_batch: int = 512
    stream_interval: float = 0.05  # seconds between deliveries of a flowing stream's tokens
    image_cache_bytes: int = 256 << 20  # encoded images kept for reuse (vision models only)


@dataclass
class _Slot:
    seq: int
    tokens: list[int] = field(default_factory=list)  # what this sequence holds in the KV cache
    job: GenerateJob | None = None
    choice: int = 0
    primary: bool = False  # the slot that prefills for the whole job (its forks copy the cache)
    forks: list["_Slot"] = field(default_factory=list)
    sampler: SequenceSampler | None = None
    text: TextStream | None = None
    next_token: int = -1  # sampled, not yet in the cache
    generated: int = 0
    logprob_sum: float = 0.0
    shift: int = 0  # cache cells minus positions used: images under M-RoPE take fewer positions than tokens
    embeds: dict[int, np.ndarray] = field(default_factory=dict)  # the job's images being evaluated, by span

    @property
    def n_past(self) -> int:
        """The position the next token takes."""
        return len(self.tokens) - self.shift

    @property
    def decoding(self) -> bool:
        return self.job is not None and self.next_token >= 0

    @property
    def prefilling(self) -> bool:
        return self.job is not None and self.primary and self.next_token < 0


class _Batch:
    """A reusable `llama_batch` with numpy views over its arrays, so filling it costs little Python."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.raw = ll.llama_batch_init(capacity, 0, 1)
        self.token = np.ctypeslib.as_array(self.raw.token, shape=(capacity,))
        self.pos = np.ctypeslib.as_array(self.raw.pos, shape=(capacity,))
        self.logits = np.ctypeslib.as_array(self.raw.logits, shape=(capacity,))
        np.ctypeslib.as_array(self.raw.n_seq_id, shape=(capacity,))[:] = 1
        self._seq_ptrs = [self.raw.seq_id[i] for i in range(capacity)]
        self.n = 0

    def clear(self) -> None:
        self.n = 0

    def add(self, tokens: list[int], start_pos: int, seq: int, want_last: bool, want_all: bool = False) -> int:
        """Appends tokens of one sequence; returns the batch index of the last one."""
        i, k = self.n, len(tokens)
        self.token[i : i + k] = tokens
        self.pos[i : i + k] = np.arange(start_pos, start_pos + k)
        self.logits[i : i + k] = 1 if want_all else 0
        for j in range(i, i + k):
            self._seq_ptrs[j][0] = seq
        if want_last:
            self.logits[i + k - 1] = 1
        self.n += k
        return i + k - 1

    def free(self) -> None:
        ll.llama_batch_free(self.raw)


class _EmbdBatch:
    """A `llama_batch` of embeddings (image tokens) instead of token ids, over numpy arrays it owns.

    llama.cpp takes tokens or embeddings in one batch, never both, so a step with images decodes two batches.
    Under M-RoPE an embedding has 4 positions, laid out section by section over the whole batch.
    """

    def __init__(self, capacity: int, n_embd: int, n_pos_per_embd: int) -> None:
        self.capacity = capacity
        self.n_pos_per_embd = n_pos_per_embd
        self.embd = np.zeros((capacity, n_embd), dtype=np.float32)
        self.pos = np.zeros(capacity * n_pos_per_embd, dtype=np.int32)
        self.n_seq_id = np.ones(capacity, dtype=np.int32)
        self.seq = np.zeros(capacity, dtype=np.int32)
        self.logits = np.zeros(capacity, dtype=np.int8)
        seq_p = ctypes.POINTER(ll.llama_seq_id)
        base = self.seq.ctypes.data
        self._seq_ptrs = (seq_p * (capacity + 1))(*[ctypes.cast(base + 4 * i, seq_p) for i in range(capacity)])
        raw = ll.llama_batch()
        raw.embd = self.embd.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        raw.pos = self.pos.ctypes.data_as(ctypes.POINTER(ll.llama_pos))
        raw.n_seq_id = self.n_seq_id.ctypes.data_as(ctypes.POINTER(ctypes.c_int32))
        raw.seq_id = self._seq_ptrs
        raw.logits = self.logits.ctypes.data_as(ctypes.POINTER(ctypes.c_int8))
        self.raw = raw
        self._positions: list[np.ndarray] = []
        self.n = 0

    def clear(self) -> None:
        self.n = 0
        self._positions = []

    def add(self, vectors: np.ndarray, positions: np.ndarray, seq: int, want_last: bool) -> int:
        """Appends embeddings of one sequence (`positions`: one row per position section); returns the batch
        index of the last one."""
        i, k = self.n, len(vectors)
        self.embd[i : i + k] = vectors
        self.seq[i : i + k] = seq
        self.logits[i : i + k] = 0
        if want_last:
            self.logits[i + k - 1] = 1
        self._positions.append(positions.reshape(self.n_pos_per_embd, k))
        self.n += k
        return i + k - 1

    def ready(self) -> ll.llama_batch:
        rows = np.concatenate(self._positions, axis=1)
        self.pos[: rows.size] = rows.ravel()  # section-major: every token's first section, then the second...
        self.raw.n_tokens = self.n
        return self.raw


class Runner:
    """Owns one loaded model's context. `submit` is safe from any thread; all llama calls stay on one thread."""

    def __init__(self, model: LlamaModel, config: RunnerConfig, adapters: list[ctypes.c_void_p] = (),
                 projector: Path | None = None) -> None:
        self.model = model
        self.config = config
        params = ll.llama_context_default_params()
        params.n_ctx = config.n_ctx_per_seq * config.n_parallel
        params.n_batch = config.n_batch
        params.n_ubatch = config.n_batch
        params.n_seq_max = config.n_parallel
        params.n_threads = config.n_threads
        params.n_threads_batch = config.n_threads
        # One KV stream per sequence: attention reads only its own cells, which is faster than a shared
        # stream and makes a sequence's numbers independent of what other sequences left in the cache.
        params.kv_unified = False
        params.no_perf = True
        ctx = ll.llama_init_from_model(model.handle, params)
        if not ctx:
            raise RuntimeError(f"llama.cpp could not create a context for {model.path}")
        self.ctx = ctx
        if adapters:  # LoRA adapters apply to every sequence of this context, at full scale
            n = len(adapters)
            rc = ll.llama_set_adapters_lora(ctx, (ll.llama_adapter_lora_p_ctypes * n)(*adapters), n,
                                            (ctypes.c_float * n)(*[1.0] * n))
            if rc != 0:
                ll.llama_free(ctx)
                raise RuntimeError(f"llama.cpp refused the LoRA adapters for {model.path} ({rc})")
        self.memory = ll.llama_get_memory(ctx)
        self.slots = [_Slot(seq=i) for i in range(config.n_parallel)]
        self._batch = _Batch(config.n_batch)
        self._pending: collections.deque[GenerateJob] = collections.deque()
        self._wake = threading.Condition()
        self._stopping = False
        # Vision: the projector is loaded on the decode thread (all ggml compute stays on that thread).
        self.vision: VisionContext | None = None
        self.vision_error: str | None = None  # why a model with a projector cannot take images
        self._projector = projector
        self._embd: _EmbdBatch | None = None
        self._media_cache = EmbeddingCache(config.image_cache_bytes)
        self.images_encoded = 0  # encoder runs; an image met again comes from the cache instead
        self.image_cache_hits = 0
        self._encodes_left = 0
        ready = threading.Event()
        self._thread = threading.Thread(target=self._loop, args=(ready,), name=f"corral-runner-{model.path.name}",
                                        daemon=True)
        self._thread.start()
        ready.wait()

    # -- public ----------------------------------------------------------------------
    def submit(self, job: GenerateJob) -> None:
        if job.n > self.config.n_parallel:
            raise ValueError(f"a job of {job.n} choices needs more than the {self.config.n_parallel} slots")
        if job.media:
            if self.vision is None:
                raise ValueError(self.vision_error or "this model has no vision projector")
            if job.prompt_logprobs:
                raise ValueError("prompt log-probabilities are not available for prompts with images")
            if self.vision.non_causal:
                widest = max(span.n_tokens for span in job.media)
                if widest > self.config.n_batch - self.config.n_parallel:
                    raise ValueError(f"an image of {widest} tokens must be evaluated in one batch, but batches "
                                     f"hold {self.config.n_batch} tokens (CORRAL_BATCH_SIZE) shared by "
                                     f"{self.config.n_parallel} sequences")
        with self._wake:
            self._pending.append(job)
            self._wake.notify()

    @property
    def queued(self) -> int:
        """Jobs waiting for free slots."""
        return len(self._pending)

    @property
    def busy(self) -> int:
        return sum(1 for s in self.slots if s.job is not None) + len(self._pending)

    def close(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        self._thread.join()
        for slot in self.slots:
            if slot.sampler is not None:
                slot.sampler.free()
            slot.sampler = None
        self._batch.free()
        if self.vision is not None:
            self.vision.close()
            self.vision = None
        ll.llama_free(self.ctx)

    # -- the loop ----------------------------------------------------------------------
    def _start_vision(self) -> None:
        if self._projector is None:
            return
        try:
            self.vision = VisionContext(self._projector, self.model, self.config.n_threads)
        except Exception as exc:  # the model still serves text; image requests get this reason
            self.vision_error = str(exc)
            log.error("%s: %s", self.model.path.name, exc)
            return
        self._embd = _EmbdBatch(self.config.n_batch, self.vision.n_embd, 4 if self.vision.mrope else 1)

    def _loop(self, ready: threading.Event) -> None:
        try:
            self._start_vision()
        finally:
            ready.set()
        while True:
            with self._wake:
                while not self._stopping and not self._pending and not any(s.job for s in self.slots):
                    self._wake.wait()
                if self._stopping:
                    break
            running = {id(s.job): s.job for s in self.slots if s.job is not None}
            try:
                self._drop_cancelled()
                self._admit()
                self._step()
            except Exception as exc:  # keep serving: fail the running jobs, not the process
                log.exception("engine step failed")
                self._fail_all(f"engine error: {exc}")
            deliver(running.values(), self.config.stream_interval)
        for slot in self.slots:
            if slot.job is not None and slot.primary:
                slot.job.emit(Failed("the model was unloaded"))
                deliver([slot.job], force=True)
        with self._wake:
            for job in self._pending:
                job.emit(Failed("the model was unloaded"))
            deliver(self._pending, force=True)

    def _drop_cancelled(self) -> None:
        with self._wake:
            for job in [j for j in self._pending if j.cancelled.is_set()]:
                self._pending.remove(job)
        for slot in self.slots:
            if slot.job is not None and slot.job.cancelled.is_set():
                self._release(slot)

    def _admit(self) -> None:
        """First come, first served: the head job waits until it has a slot for every choice."""
        while True:
            with self._wake:
                if not self._pending:
                    return
                job = self._pending[0]
                free = [s for s in self.slots if s.job is None]
                if len(free) < job.n:
                    return
                self._pending.popleft()
            try:
                self._start(job, free)
            except Exception as exc:  # this job alone fails; it must not vanish without an answer
                log.exception("could not start a job")
                for slot in self.slots:
                    if slot.job is job:
                        self._release(slot)
                job.emit(Failed(f"engine error: {exc}"))
                deliver([job], force=True)

    def _start(self, job: GenerateJob, free: list[_Slot]) -> None:
        def shared(slot: _Slot) -> int:
            n = 0
            for a, b in zip(slot.tokens, job.prompt):
                if a != b:
                    break
                n += 1
            return n

        try:  # a sampler that cannot be built fails this job alone, before it takes any slot
            samplers = [
                SequenceSampler(p, self.model.n_vocab, job.n_ctx, self.model.vocab, lambda t: self._piece(job, t))
                for p in job.sampling
            ]
        except ValueError as exc:
            job.emit(Failed(f"sampling could not start: {exc}"))
            deliver([job], force=True)
            return
        # Prefix reuse: the free slot already holding the longest prefix of this prompt prefills it ...
        free.sort(key=shared, reverse=True)
        primary, forks = free[0], free[1 : job.n]
        keep = _outside_images(job, min(shared(primary), len(job.prompt) - 1))
        if job.prompt_logprobs:  # every prompt token must pass through the model to get its logits
            keep = 0
        # ... or, when another slot (busy or idle) holds a clearly longer one, its cache is copied over.
        # A copy moves a whole KV stream, so it pays only when it saves a real amount of prefill.
        donor = max((s for s in self.slots if s is not primary), key=shared, default=None)
        donated = _outside_images(job, min(shared(donor), len(job.prompt) - 1)) if donor is not None else 0
        if donor is not None and donated >= keep + MIN_PREFIX_COPY and not job.prompt_logprobs:
            ll.llama_memory_seq_cp(self.memory, donor.seq, primary.seq, -1, -1)
            primary.tokens = list(donor.tokens)
            keep = donated
        # Equal prefixes hold equal images, so the kept cells sit at the same positions as this job's.
        shift = sum(span.n_tokens - span.n_pos for span in job.media if span.end <= keep)
        if not ll.llama_memory_seq_rm(self.memory, primary.seq, keep - shift, -1):
            ll.llama_memory_seq_rm(self.memory, primary.seq, -1, -1)
            keep = shift = 0
        del primary.tokens[keep:]
        primary.shift = shift
        job.cached_tokens = keep
        job.remaining = job.n
        job.started_ns = time.perf_counter_ns()
        for choice, slot in enumerate([primary, *forks]):
            slot.job = job
            slot.choice = choice
            slot.primary = slot is primary
            slot.forks = forks if slot is primary else []
            slot.sampler = samplers[choice]
            slot.text = TextStream(job.stop)
            slot.next_token = -1
            slot.generated = 0
            slot.logprob_sum = 0.0

    def _step(self) -> None:
        """One step: every decoding sequence's next token, then pending prompts up to the batch's room.

        Text goes in a token batch and images in an embeddings batch (llama.cpp takes one kind per batch);
        each is decoded and its logits sampled before the other overwrites them. A prompt contributes its
        text up to the next image and then, in the same step, that image, since the token batch runs first.
        """
        batch = self._batch
        batch.clear()
        embd = self._embd
        if embd is not None:
            embd.clear()
        self._encodes_left = 1  # an encode stalls every stream, so at most one per step
        outputs: list[tuple[_Slot, int]] = []
        for slot in self.slots:
            if slot.decoding:
                idx = batch.add([slot.next_token], slot.n_past, slot.seq, True)
                outputs.append((slot, idx))
        prefills: list[tuple[_Slot, list[int], int]] = []
        pieces: list[tuple[_Slot, int, int]] = []  # (slot, span index, tokens) of images in the embeddings batch
        embd_outputs: list[tuple[_Slot, int]] = []
        room = batch.capacity - batch.n
        for slot in list(self.slots):
            if room <= 0:
                break
            if not slot.prefilling:
                continue
            job = slot.job
            assert job is not None
            at = len(slot.tokens)
            image = next((k for k, span in enumerate(job.media) if span.end > at), None)
            text_end = job.media[image].start if image is not None else len(job.prompt)
            vectors = None
            if image is not None and text_end - at < room:  # this step reaches the image: have it encoded
                try:
                    vectors = self._image(slot, image)
                except VisionError as exc:
                    self._fail_job(job, str(exc))
                    continue
            if at < text_end:
                chunk = job.prompt[at : min(text_end, at + room)]
                last = at + len(chunk) == len(job.prompt)
                idx = batch.add(chunk, slot.n_past, slot.seq, last, job.prompt_logprobs)
                prefills.append((slot, chunk, idx - len(chunk) + 1))
                if last:
                    outputs.append((slot, idx))
                room -= len(chunk)
                at += len(chunk)
            if vectors is None or at < text_end or room <= 0:
                continue
            assert embd is not None and image is not None
            span = job.media[image]
            offset = at - span.start
            k = min(span.n_tokens - offset, room)
            if self.vision.non_causal and k < span.n_tokens:
                continue  # attention within the image needs all of it in one batch: wait for a roomier step
            pos_0 = span.start - slot.shift  # the image's first position (earlier images are settled in shift)
            positions = (self.vision.positions(span, pos_0)[:, offset : offset + k] if self.vision.mrope
                         else np.arange(pos_0 + offset, pos_0 + offset + k, dtype=np.int32))
            last = span.end == len(job.prompt) and offset + k == span.n_tokens
            idx = embd.add(vectors[offset : offset + k], positions, slot.seq, last)
            pieces.append((slot, image, k))
            if last:
                embd_outputs.append((slot, idx))
            room -= k
        if batch.n:
            batch.raw.n_tokens = batch.n
            rc = ll.llama_decode(self.ctx, batch.raw)
            if rc != 0:
                if rc == 1 and self._evict_idle():
                    return  # cache cells were freed; the same work is rebuilt next step
                raise RuntimeError(f"llama_decode returned {rc}")
            for slot, chunk, first in prefills:
                if slot.job is not None and slot.job.prompt_logprobs:
                    self._prompt_logprobs(slot, chunk, first)
                slot.tokens.extend(chunk)
            self._take_outputs(outputs)
        if pieces:
            assert embd is not None and self.vision is not None
            if self.vision.non_causal:
                ll.llama_set_causal_attn(self.ctx, False)
            try:
                rc = ll.llama_decode(self.ctx, embd.ready())
            finally:
                if self.vision.non_causal:
                    ll.llama_set_causal_attn(self.ctx, True)
            if rc != 0:
                if rc == 1 and self._evict_idle():
                    return
                raise RuntimeError(f"llama_decode returned {rc} for image embeddings")
            for slot, image, k in pieces:
                job = slot.job
                assert job is not None
                span = job.media[image]
                at = len(slot.tokens)
                slot.tokens.extend(job.prompt[at : at + k])
                if len(slot.tokens) == span.end:  # the image is in the cache: its positions are settled
                    slot.shift += span.n_tokens - span.n_pos
                    slot.embeds.pop(image, None)
            self._take_outputs(embd_outputs)

    def _take_outputs(self, outputs: list[tuple[_Slot, int]]) -> None:
        """Samples every sequence that produced logits in the batch just decoded."""
        for slot, idx in outputs:
            if slot.job is None:
                continue
            if slot.decoding:
                slot.tokens.append(slot.next_token)
            else:  # prefill just completed: forks copy the prompt's cache and sample from the same logits
                for fork in slot.forks:
                    ll.llama_memory_seq_rm(self.memory, fork.seq, -1, -1)
                    ll.llama_memory_seq_cp(self.memory, slot.seq, fork.seq, -1, -1)
                    fork.tokens = list(slot.tokens)
                    fork.shift = slot.shift
                    self._sample(fork, idx)
            self._sample(slot, idx)

    def _image(self, slot: _Slot, image: int) -> np.ndarray | None:
        """The embeddings of the job's `image`-th span: already at hand, from the cache, or encoded now (None
        when this step already ran the encoder)."""
        vectors = slot.embeds.get(image)
        if vectors is not None:
            return vectors
        assert slot.job is not None and self.vision is not None
        span: MediaSpan = slot.job.media[image]
        vectors = self._media_cache.get(span.key)
        if vectors is not None:
            self.image_cache_hits += 1
        else:
            if self._encodes_left <= 0:
                return None
            self._encodes_left -= 1
            started = time.perf_counter()
            vectors = self.vision.encode(span)
            self.images_encoded += 1
            self._media_cache.put(span.key, vectors)
            log.info("encoded image %s (%d tokens) in %.0f ms", span.key[:12], span.n_tokens,
                     (time.perf_counter() - started) * 1000)
        slot.embeds[image] = vectors
        return vectors

    def _fail_job(self, job: GenerateJob, message: str) -> None:
        """This job alone fails; its slots keep what their caches hold (`tokens` still says what that is)."""
        for slot in self.slots:
            if slot.job is job:
                self._release(slot)
        job.emit(Failed(message))
        deliver([job], force=True)

    def _sample(self, slot: _Slot, idx: int) -> None:
        job = slot.job
        assert job is not None and slot.text is not None
        token = slot.sampler.sample(self.ctx, idx)
        if not job.first_token_ns:
            job.first_token_ns = time.perf_counter_ns()
        logprob, top = self._logprobs(idx, token, job.top_logprobs) if job.want_logprobs else (None, ())
        if self.model.is_eog(token):
            return self._finish(slot, "stop")
        slot.generated += 1
        job.generated += 1  # counted as it goes, so an abandoned job's log line says what it cost
        if logprob is not None:
            slot.logprob_sum += logprob
        text, stopped = slot.text.feed(self._piece(job, token))
        job.emit(Token(slot.choice, text, token, logprob, top))
        if slot.generated == 1:
            deliver([job], force=True)  # the first token goes out at once: time to first token is not delayed
        if stopped:
            return self._finish(slot, "stop")
        if slot.generated >= job.max_tokens or len(slot.tokens) + 1 >= job.n_ctx:
            return self._finish(slot, "length")
        slot.next_token = token

    def _piece(self, job: GenerateJob, token: int) -> bytes:
        if token in job.shown_tokens:
            return self.model.special_bytes(token)
        return self.model.token_bytes(token)

    def _logprobs(self, idx: int, token: int, k: int) -> tuple[float, tuple[tuple[int, float], ...]]:
        """Log-probability under the model's raw distribution (log-softmax of the logits, before any
        sampler), and the k most likely tokens, best first."""
        ptr = ll.llama_get_logits_ith(self.ctx, idx)
        logits = np.ctypeslib.as_array(ptr, shape=(self.model.n_vocab,))  # float32, read in place
        top_logit = float(logits.max())
        norm = top_logit + float(np.log(np.exp(logits - top_logit).sum(dtype=np.float64)))
        if k <= 0:
            return float(logits[token]) - norm, ()
        best = np.argpartition(logits, -k)[-k:]
        best = best[np.argsort(-logits[best], kind="stable")]
        return float(logits[token]) - norm, tuple((int(t), float(logits[t]) - norm) for t in best)

    def _prompt_logprobs(self, slot: _Slot, chunk: list[int], first: int) -> None:
        """Each prompt token's log-probability given the tokens before it, from this chunk's logits."""
        job = slot.job
        assert job is not None
        start = len(slot.tokens)
        entries = [(job.prompt[0], None, ())] if start == 0 else []
        for j in range(len(chunk)):
            nxt = start + j + 1
            if nxt >= len(job.prompt):
                break
            lp, top = self._logprobs(first + j, job.prompt[nxt], job.top_logprobs)
            entries.append((job.prompt[nxt], lp, top))
        job.emit(PromptLogprobs(tuple(entries)))

    def _finish(self, slot: _Slot, reason: str) -> None:
        job = slot.job
        assert job is not None and slot.text is not None
        tail = slot.text.finish() if reason == "length" or reason == "stop" else ""
        job.emit(
            Finished(
                slot.choice, reason, slot.generated, tail, slot.logprob_sum if job.want_logprobs else None
            )
        )
        job.remaining -= 1
        if job.remaining == 0:
            now = time.perf_counter_ns()
            first = job.first_token_ns or now
            job.emit(Done(prompt_tokens=len(job.prompt), cached_tokens=job.cached_tokens,
                          prompt_ns=first - job.started_ns, eval_ns=now - first))
        deliver([job], force=True)
        self._release(slot)

    def _release(self, slot: _Slot) -> None:
        """The slot keeps its cache (for prefix reuse) but no longer belongs to a job."""
        if slot.sampler is not None:
            slot.sampler.free()
        slot.sampler = None
        slot.job = None
        slot.forks = []
        slot.text = None
        slot.next_token = -1
        slot.embeds = {}

    def _evict_idle(self) -> bool:
        freed = False
        for slot in self.slots:
            if slot.job is None and slot.tokens:
                ll.llama_memory_seq_rm(self.memory, slot.seq, -1, -1)
                slot.tokens = []
                slot.shift = 0
                freed = True
        return freed

    def _fail_all(self, message: str) -> None:
        jobs = {id(s.job): s.job for s in self.slots if s.job is not None}
        for slot in self.slots:
            if slot.job is not None:
                ll.llama_memory_seq_rm(self.memory, slot.seq, -1, -1)
                slot.tokens = []
                slot.shift = 0
                self._release(slot)
        for job in jobs.values():
            assert job is not None
            job.emit(Failed(message))
            deliver([job], force=True)
