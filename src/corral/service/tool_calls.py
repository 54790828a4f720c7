"""Reading tool calls out of a model's output as it streams, for the common output formats.

One parser serves both the streamed and the whole response: the non-streamed message is what the deltas
add up to, so the two always agree. Text outside calls is content; the markup around calls never is.

A call is a JSON object `{"name": ..., "arguments": {...}}` (`"parameters"` in Llama 3's format) inside
a *region*: after an opening marker (`<tool_call>`, `[TOOL_CALLS]`, `<|python_tag|>`) up to its closing
marker or the end of the output, or, where the format allows it, a bare object or array opening the
output. A region may hold several calls, separated by blanks, commas or semicolons, or wrapped in `[...]`.
Arguments stream out as the model writes them, once the function's name is known.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass, field

ARGUMENT_KEYS = ("arguments", "parameters")


@dataclass(frozen=True)
class ToolFormat:
    """How one family of models writes tool calls."""

    name: str
    open: str | None = None  # marker opening a region
    close: str | None = None  # marker closing it (else the region runs to the end of the output)
    at_start: bool = False  # a bare JSON object or array opening the output is a region too
    arguments_key: str = "arguments"  # the key the family writes (the parser reads either)


HERMES = ToolFormat("hermes", open="<tool_call>", close="</tool_call>")
MISTRAL = ToolFormat("mistral", open="[TOOL_CALLS]")
LLAMA3 = ToolFormat("llama3", open="<|python_tag|>", at_start=True, arguments_key="parameters")
BARE_JSON = ToolFormat("json", at_start=True)


@dataclass
class Content:
    text: str


@dataclass
class CallStart:
    index: int
    id: str
    name: str


@dataclass
class CallArguments:
    index: int
    text: str


Piece = Content | CallStart | CallArguments


def call_id() -> str:
    return "call_" + secrets.token_hex(12)


@dataclass
class _Call:
    """One call object being read: its raw text and what is known of it so far."""

    text: str = ""
    depth: int = 0  # brackets open, the call's own `{` included
    in_string: bool = False
    escaped: bool = False
    string_start: int = 0  # where the string being read at the top level began
    last_key: str | None = None  # the last string read at the top level, a key if `:` follows
    key: str | None = None  # the key whose value is being read
    value_start: int | None = None
    name: str | None = None
    args_start: int | None = None
    args_end: int | None = None
    args_is_string: bool = False
    index: int | None = None  # set once the call is announced
    sent: int = 0  # argument characters already sent


class ToolCallParser:
    """Feed it the output as it comes; it returns content and tool-call pieces, holding back only what
    might still turn out to be markup."""

    def __init__(self, fmt: ToolFormat, functions: set[str]) -> None:
        self.fmt = fmt
        self.functions = functions
        self.pending = ""  # text not yet classified
        self.started = False  # non-blank output seen (a bare region can only open the output)
        self.after_region = False  # blanks after a region are dropped, not content
        self.in_region = False
        self.region = ""  # the current region's text, content after all if it holds no call
        self.region_calls = 0
        self.wrapped = False  # the region's calls sit inside `[...]`
        self.call: _Call | None = None
        self.calls = 0

    def feed(self, text: str) -> list[Piece]:
        self.pending += text
        out: list[Piece] = []
        while self.pending and (self._region(out) if self.in_region else self._content(out)):
            pass
        return _merge(out)

    def finish(self) -> list[Piece]:
        """The end of the output: a call cut short ends there, and held-back text is released."""
        out: list[Piece] = []
        if self.in_region:
            self.region += self.pending
            marked = self.fmt.open is not None and self.region.startswith(self.fmt.open)
            if marked and self.region_calls == 0:  # a call cut short before its name: markup, not content
                self.call = None
                self.region = ""
            self._close_region(out)
        elif self.pending and not (self.after_region and not self.pending.strip()):
            out.append(Content(self.pending))
        self.pending = ""
        return _merge(out)

    # -- outside calls --------------------------------------------------------------------------
    def _content(self, out: list[Piece]) -> bool:
        """Classifies pending text outside a region; True when a region opened and reading goes on."""
        text = self.pending
        if self.fmt.at_start and not self.started:
            body = text.lstrip()
            if not body:
                return False  # only blanks so far: they may precede a bare region
            self.started = True
            if body[0] in "{[":
                self._open_region(len(text) - len(body), 0)
                return True
        keep = 0
        marker = self.fmt.open
        if marker is not None:
            at = text.find(marker)
            if at >= 0:
                if not (self.after_region and not text[:at].strip()):  # blanks between calls are not content
                    self._emit(out, text[:at])
                self._open_region(at, len(marker))
                return True
            keep = _partial_suffix(text, marker)
        ready = text[: len(text) - keep]
        if self.after_region and not ready.strip():
            return False  # blanks between calls: held until real text (or the end) decides
        self._emit(out, ready)
        self.pending = text[len(ready):]
        return False

    def _emit(self, out: list[Piece], text: str) -> None:
        if text:
            self.started = True
            self.after_region = False
            out.append(Content(text))

    def _open_region(self, at: int, marker_len: int) -> None:
        self.in_region = True
        self.region = self.pending[at:at + marker_len]
        self.region_calls = 0
        self.wrapped = False
        self.pending = self.pending[at + marker_len:]

    def _close_region(self, out: list[Piece]) -> None:
        self._end_call(out)
        self.in_region = False
        if self.region_calls == 0:  # nothing in it was a call: it was text all along
            self._emit(out, self.region)
        else:
            self.after_region = True
        self.region = ""

    # -- inside a region ------------------------------------------------------------------------
    def _region(self, out: list[Piece]) -> bool:
        """Reads pending text inside a region; True when the region closed and reading goes on."""
        text, i = self.pending, 0
        close = self.fmt.close
        while i < len(text):
            if self.call is not None:
                j = self._read_call(text, i, out)
                self.region += text[i:j]
                i = j
                continue
            ch = text[i]
            if close is not None and text.startswith(close, i):
                self.region += close
                self.pending = text[i + len(close):]
                self._close_region(out)
                return True
            if close is not None and close.startswith(text[i:]):
                break  # perhaps the start of the closing marker: wait for more
            if ch == "{":
                self.call = _Call()
                continue
            if ch == "[" and not self.wrapped and self.region_calls == 0 and self.call is None:
                self.wrapped = True
            elif ch == "]" and self.wrapped:
                self.wrapped = False
            elif not (ch.isspace() or ch in ",;"):  # not calls any more: the region ends here
                self.pending = text[i:]
                self._close_region(out)
                return True
            self.region += ch
            i += 1
        self.pending = text[i:]
        return False

    def _read_call(self, text: str, i: int, out: list[Piece]) -> int:
        """Reads the current call object from text[i:]; returns where it stopped."""
        call = self.call
        assert call is not None
        while i < len(text):
            ch = text[i]
            pos = len(call.text)
            call.text += ch
            i += 1
            if call.in_string:
                if call.escaped:
                    call.escaped = False
                elif ch == "\\":
                    call.escaped = True
                elif ch == '"':
                    call.in_string = False
                    if call.depth == 1:
                        if call.key is None:
                            call.last_key = _loads(call.text[call.string_start:])
                        else:
                            self._value_done(call, pos + 1)
                continue
            if ch == '"':
                call.in_string = True
                if call.depth == 1:
                    call.string_start = pos
                    self._value_begins(call, pos)
            elif ch in "{[":
                call.depth += 1
                if call.depth == 2:
                    self._value_begins(call, pos)
            elif ch in "}]":
                call.depth -= 1
                if call.depth == 1:
                    self._value_done(call, pos + 1)
                elif call.depth <= 0:
                    self._value_done(call, pos)
                    self._announce(call, out)
                    self._end_call(out)
                    return i
            elif call.depth == 1 and ch == ":":
                call.key = call.last_key if isinstance(call.last_key, str) else ""
                call.last_key = None
            elif call.depth == 1 and ch == ",":
                self._value_done(call, pos)
                call.key = None
            elif call.depth == 1 and not ch.isspace():
                self._value_begins(call, pos)  # a number, true, false or null
        self._announce(call, out)
        return i

    @staticmethod
    def _value_begins(call: _Call, pos: int) -> None:
        if call.key is None or call.value_start is not None:
            return
        call.value_start = pos
        if call.key in ARGUMENT_KEYS and call.args_start is None:
            call.args_start = pos
            call.args_is_string = call.text[pos] == '"'

    @staticmethod
    def _value_done(call: _Call, end: int) -> None:
        if call.key is None or call.value_start is None:
            return
        value = call.text[call.value_start:end].rstrip()
        if call.key == "name" and call.name is None:
            name = _loads(value)
            call.name = name if isinstance(name, str) else None
        if call.value_start == call.args_start:
            call.args_end = call.value_start + len(value)
        call.key = None
        call.value_start = None

    def _announce(self, call: _Call, out: list[Piece]) -> None:
        """Sends the call's header once it names an offered function, then argument text not yet sent."""
        if call.index is None:
            if call.name not in self.functions:
                return
            call.index = self.calls
            self.calls += 1
            self.region_calls += 1
            out.append(CallStart(call.index, call_id(), call.name))
        if call.args_start is None or call.args_is_string:
            return
        end = call.args_end
        if end is None:  # still open: trailing blanks may turn out to follow the value
            end = call.args_start + len(call.text[call.args_start:].rstrip())
        if end > call.args_start + call.sent:
            out.append(CallArguments(call.index, call.text[call.args_start + call.sent:end]))
            call.sent = end - call.args_start

    def _end_call(self, out: list[Piece]) -> None:
        call, self.call = self.call, None
        if call is None or call.index is None:
            return  # a call that never named an offered function is left in the region's text
        if call.args_is_string and call.args_end is not None:
            decoded = _loads(call.text[call.args_start:call.args_end])
            out.append(CallArguments(call.index, decoded if isinstance(decoded, str) else "{}"))
        elif call.args_start is None:
            out.append(CallArguments(call.index, "{}"))


def _loads(text: str) -> object:
    try:
        return json.loads(text)
    except ValueError:
        return None


def _partial_suffix(text: str, marker: str) -> int:
    """The length of the longest end of `text` that is a beginning of `marker`."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


def _merge(pieces: list[Piece]) -> list[Piece]:
    """Adjacent pieces of the same kind joined, so that a delta carries what one step produced."""
    out: list[Piece] = []
    for piece in pieces:
        last = out[-1] if out else None
        if isinstance(piece, Content) and isinstance(last, Content) or isinstance(piece, CallArguments) and isinstance(last, CallArguments) and last.index == piece.index:
            last.text += piece.text
        elif not (isinstance(piece, Content) and not piece.text):
            out.append(piece)
    return out


@dataclass
class ParsedCall:
    id: str
    name: str
    arguments: str


@dataclass
class Parsed:
    content: str
    calls: list[ParsedCall] = field(default_factory=list)


def gather(pieces: list[Piece]) -> Parsed:
    """The whole message that a list of pieces adds up to."""
    parsed = Parsed("")
    for piece in pieces:
        if isinstance(piece, Content):
            parsed.content += piece.text
        elif isinstance(piece, CallStart):
            parsed.calls.append(ParsedCall(piece.id, piece.name, ""))
        else:
            parsed.calls[piece.index].arguments += piece.text
    return parsed


def parse(text: str, fmt: ToolFormat, functions: set[str]) -> Parsed:
    parser = ToolCallParser(fmt, functions)
    return gather(parser.feed(text) + parser.finish())

