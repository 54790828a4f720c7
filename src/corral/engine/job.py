"""What the engine is asked to do, and the events it answers with.

A job crosses from the asyncio world into the decode thread and its events cross back through
`loop.call_soon_threadsafe`, so the decode thread never touches the event loop's objects directly.
"""

from __future__ import annotations

import asyncio
import collections
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .sampling import SamplingParams

if TYPE_CHECKING:
    from .vision import MediaSpan


@dataclass(frozen=True)
class Token:
    """Text released for one choice; `text` may be empty while a stop string or UTF-8 is pending.

    `logprob` and `top` (the most likely alternatives, best first) are set when the job asks for them.
    """

    index: int
    text: str
    token: int
    logprob: float | None
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class PromptLogprobs:
    """Log-probabilities of the prompt's tokens (the first has none), for completions' `echo`."""

    entries: tuple[tuple[int, float | None, tuple[tuple[int, float], ...]], ...]  # (token, logprob, top)


@dataclass(frozen=True)
class Finished:
    index: int
    reason: str  # "stop" | "length"
    completion_tokens: int
    text: str  # any held-back text released at the end
    logprob_sum: float | None


@dataclass(frozen=True)
class Done:
    """Every choice has finished."""

    prompt_tokens: int
    cached_tokens: int
    prompt_ns: int = 0  # from the job's start in a slot to its first sampled token (prompt evaluation)
    eval_ns: int = 0  # from the first sampled token to the last choice's end (generation)


@dataclass(frozen=True)
class Failed:
    message: str


Event = Token | PromptLogprobs | Finished | Done | Failed


@dataclass
class GenerateJob:
    prompt: list[int]
    sampling: list[SamplingParams]  # one per choice; `n` is its length
    max_tokens: int  # per choice, already bounded by the context
    n_ctx: int  # the context limit for each sequence of this job
    stop: list[str] = field(default_factory=list)
    want_logprobs: bool = False  # the sampled token's log-probability (and their sum per choice)
    top_logprobs: int = 0  # with want_logprobs: how many alternatives to report per token
    prompt_logprobs: bool = False  # log-probabilities of the prompt's tokens too (disables prefix reuse)
    shown_tokens: frozenset[int] = frozenset()  # special tokens written out in the text (tool-call markers)
    # Images: each span's positions in `prompt` hold placeholder ids (see engine/vision.py); the runner
    # evaluates the image's embeddings there instead of tokens.
    media: tuple["MediaSpan", ...] = ()
    loop: asyncio.AbstractEventLoop | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)
    # Filled in by the runner when the job is admitted.
    cached_tokens: int = 0
    remaining: int = 0
    generated: int = 0  # tokens generated over all its choices so far, updated per token (for the log line)
    started_ns: int = 0  # when it took its slots
    first_token_ns: int = 0  # when its first token was sampled
    # Events cross threads through a deque; the consumer is woken once per delivery, not once per event.
    _outbox: collections.deque[Event] = field(default_factory=collections.deque)
    _ready: asyncio.Event = field(default_factory=asyncio.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _wake_pending: bool = False
    _last_wake: float = 0.0

    @property
    def n(self) -> int:
        return len(self.sampling)

    def emit(self, event: Event) -> None:
        """Called from the decode thread; the event is delivered at the next wake-up (see `deliver`)."""
        self._outbox.append(event)

    def due(self, interval: float, force: bool = False) -> bool:
        """Called from the decode thread: whether the consumer should be woken now (and mark it so)."""
        if not self._outbox or self.loop is None:
            return False
        now = time.monotonic()
        if not force and now - self._last_wake < interval:
            return False
        with self._lock:
            if self._wake_pending:
                return False
            self._wake_pending = True
        self._last_wake = now
        return True

    def wake(self) -> None:
        """Called on the event loop."""
        with self._lock:
            self._wake_pending = False
        self._ready.set()

    async def next_events(self) -> list[Event]:
        """Everything emitted since the last call, waiting until there is something."""
        while not self._outbox:
            self._ready.clear()
            if self._outbox:
                break
            await self._ready.wait()
        batch = []
        while self._outbox:
            batch.append(self._outbox.popleft())
        return batch

    def cancel(self) -> None:
        self.cancelled.set()


def _wake_all(jobs: list[GenerateJob]) -> None:
    for job in jobs:
        job.wake()


def deliver(jobs: Iterable[GenerateJob], interval: float = 0.0, force: bool = False) -> None:
    """Wakes the consumers of every job that is due, with one event-loop call per loop, not per job.

    While tokens flow, a consumer is woken at most once per `interval` seconds; `force` (the first
    token, a finish, a failure) wakes it at once. Each wake-up costs the event loop a turn and each
    stream a socket write, which compete with the decode threads for the CPU on a small machine.
    """
    by_loop: dict[asyncio.AbstractEventLoop, list[GenerateJob]] = {}
    for job in jobs:
        if job.due(interval, force):
            assert job.loop is not None
            by_loop.setdefault(job.loop, []).append(job)
    for loop, due in by_loop.items():
        try:
            loop.call_soon_threadsafe(_wake_all, due)
        except RuntimeError:  # the loop is closed: nobody is left to read these events
            pass
