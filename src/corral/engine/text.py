"""Turning a stream of token bytes into text that is safe to send: whole UTF-8 characters, no stop strings."""

from __future__ import annotations

import codecs


class StopMatcher:
    """Holds back text that might be the start of a stop string, so a stop split across tokens never leaks."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = [s for s in stops if s]
        self._pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """Returns (text safe to emit, whether a stop string was found)."""
        if not self.stops:
            return text, False
        buf = self._pending + text
        hits = [i for i in (buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            self._pending = ""
            return buf[: min(hits)], True
        hold = 0
        for stop in self.stops:
            for k in range(min(len(stop) - 1, len(buf)), hold, -1):
                if buf.endswith(stop[:k]):
                    hold = k
                    break
        self._pending = buf[len(buf) - hold :] if hold else ""
        return buf[: len(buf) - hold], False

    def flush(self) -> str:
        rest, self._pending = self._pending, ""
        return rest


class TextStream:
    """Token bytes in, emit-ready text out: incremental UTF-8 decoding followed by stop matching."""

    def __init__(self, stops: list[str]) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._stops = StopMatcher(stops)

    def feed(self, piece: bytes) -> tuple[str, bool]:
        return self._stops.feed(self._decoder.decode(piece))

    def finish(self) -> str:
        """Text still held back when generation ends for a reason other than a stop string."""
        tail, _ = self._stops.feed(self._decoder.decode(b"", final=True))
        return tail + self._stops.flush()
