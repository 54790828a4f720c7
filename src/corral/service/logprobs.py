"""Log-probabilities in OpenAI's two shapes, aligned with the text actually sent.

The engine reports one entry per sampled token, but it releases text later than that (a possible stop
string is held back) and never releases a stop string at all. An entry is handed out once all of its
token's bytes have been released as text, so the entries of a response join to its content, and the
tokens that spelled a stop string have no entries.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from ..engine.job import PromptLogprobs, Token
from ..engine.model import LlamaModel
from ..protocol.openai import ChoiceLogprobs, CompletionLogprobs, TokenLogprob, TopLogprob


@dataclass(frozen=True)
class Entry:
    token: int
    piece: bytes
    logprob: float | None
    top: tuple[tuple[int, float], ...]


class Aligner:
    """Per choice: turns Token events into entries as their text is released."""

    def __init__(self, model: LlamaModel) -> None:
        self.model = model
        self._pending: deque[Entry] = deque()
        self._released = 0  # bytes of text released so far
        self._handed = 0  # bytes covered by entries handed out so far

    def on_token(self, event: Token) -> list[Entry]:
        self._pending.append(Entry(event.token, self.model.token_bytes(event.token), event.logprob, event.top))
        return self.release(event.text)

    def release(self, text: str) -> list[Entry]:
        self._released += len(text.encode("utf-8"))
        out = []
        while self._pending and self._handed + len(self._pending[0].piece) <= self._released:
            entry = self._pending.popleft()
            self._handed += len(entry.piece)
            out.append(entry)
        return out


def prompt_entries(model: LlamaModel, event: PromptLogprobs) -> list[Entry]:
    return [Entry(t, model.token_bytes(t), lp, top) for t, lp, top in event.entries]


def _text(piece: bytes) -> str:
    return piece.decode("utf-8", errors="replace")


def chat_logprobs(model: LlamaModel, entries: list[Entry]) -> ChoiceLogprobs:
    content = []
    for entry in entries:
        top = [
            TopLogprob(token=_text(p := model.token_bytes(t)), logprob=lp, bytes=list(p)) for t, lp in entry.top
        ]
        content.append(TokenLogprob(token=_text(entry.piece), logprob=entry.logprob or 0.0,
                                    bytes=list(entry.piece), top_logprobs=top))
    return ChoiceLogprobs(content=content)


def legacy_logprobs(model: LlamaModel, entries: list[Entry], offset: int = 0) -> CompletionLogprobs:
    """`text_offset` counts characters from the start of the returned text (which includes an echo)."""
    result = CompletionLogprobs(tokens=[], token_logprobs=[], top_logprobs=[], text_offset=[])
    for entry in entries:
        text = _text(entry.piece)
        result.tokens.append(text)
        result.token_logprobs.append(entry.logprob)
        result.top_logprobs.append(
            {_text(model.token_bytes(t)): lp for t, lp in entry.top} if entry.logprob is not None else None
        )
        result.text_offset.append(offset)
        offset += len(text)
    return result
