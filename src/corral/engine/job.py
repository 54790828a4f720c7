"""What the engine is asked to do, and the events it answers with.

A job crosses from the asyncio world into the decode thread and its events cross back through
`loop.call_soon_threadsafe`, so the decode thread never touches the event loop's objects directly.
"""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass, field

from .sampling import SamplingParams


@dataclass(frozen=True)
class Token:
    """Text released for one choice; `text` may be empty while a stop string or UTF-8 is pending."""

    index: int
    text: str
    token: int
    logprob: float | None


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


@dataclass(frozen=True)
class Failed:
    message: str


Event = Token | Finished | Done | Failed


@dataclass
class GenerateJob:
    prompt: list[int]
    sampling: list[SamplingParams]  # one per choice; `n` is its length
    max_tokens: int  # per choice, already bounded by the context
    n_ctx: int  # the context limit for each sequence of this job
    stop: list[str] = field(default_factory=list)
    want_logprobs: bool = False
    loop: asyncio.AbstractEventLoop | None = None
    events: asyncio.Queue[Event] = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    # Filled in by the runner when the job is admitted.
    cached_tokens: int = 0
    remaining: int = 0

    @property
    def n(self) -> int:
        return len(self.sampling)

    def emit(self, event: Event) -> None:
        """Called from the decode thread."""
        if self.loop is None:
            self.events.put_nowait(event)
        else:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)

    def cancel(self) -> None:
        self.cancelled.set()
