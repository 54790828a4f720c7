"""Ollama-compatible Modelfiles: parse one into a typed `Modelfile`, and render one back to text.

The grammar is Ollama's, line-oriented and case-insensitive in its instruction names:

    # a comment
    FROM smollm2:135m
    PARAMETER temperature 0.7
    PARAMETER stop "<|im_end|>"
    TEMPLATE \"\"\"{{ .Prompt }}\"\"\"
    MESSAGE user Hello

A value runs to the end of its line (trimmed), or is quoted. `\"\"\"...\"\"\"` keeps everything between the
quotes verbatim, newlines and lone quotes included (quotes right before the closing three belong to the
value, so `\"\"\"say "hi"\"\"\"\"` is `say "hi"`). `"..."` may also span lines; inside it `\\"` is a quote and
`\\\\` a backslash, and any other backslash is kept as written, so Windows paths need no escaping. Ollama
itself does not unescape `"..."`; corral does so that `render` can write any value, `\"\"\"` included.

Every mistake is a `ModelfileError` naming the line its statement starts on, because a Modelfile that
is silently read differently from how it was written makes a model behave wrongly with no clue why.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

__all__ = [
    "ModelfileError",
    "PARAMETER_TYPES",
    "Modelfile",
    "coerce_parameter",
    "coerce_parameters",
    "parse",
    "render",
]


class ModelfileError(ValueError):
    """A Modelfile (or a parameter) corral cannot accept; the message says where and why.

    `line` is the 1-based line the offending statement starts on, or None when no line applies.
    """

    def __init__(self, message: str, line: int | None = None) -> None:
        super().__init__(message if line is None else f"line {line}: {message}")
        self.line = line


# --- parameters ------------------------------------------------------------------------------------

PARAMETER_TYPES: dict[str, type] = {
    **dict.fromkeys(
        [
            "num_ctx",
            "num_batch",
            "num_gpu",
            "main_gpu",
            "num_thread",
            "num_keep",
            "seed",
            "num_predict",
            "top_k",
            "repeat_last_n",
        ],
        int,
    ),
    **dict.fromkeys(
        [
            "top_p",
            "min_p",
            "typical_p",
            "temperature",
            "repeat_penalty",
            "presence_penalty",
            "frequency_penalty",
        ],
        float,
    ),
    "use_mmap": bool,
    "stop": list,
}

# Ollama still parses these but they do nothing (or nothing corral can do); accepting them would make a
# Modelfile look as if it changed something it does not.
DEPRECATED_PARAMETERS = frozenset(
    [
        "penalize_newline",
        "low_vram",
        "f16_kv",
        "logits_all",
        "vocab_only",
        "use_mlock",
        "mirostat",
        "mirostat_tau",
        "mirostat_eta",
    ]
)

# (lowest, highest) allowed, either end None for open; only where a value outside makes no sense.
_RANGES: dict[str, tuple[float | None, float | None]] = {
    "num_ctx": (16, None),
    "num_batch": (1, None),
    "num_thread": (0, None),
    "num_predict": (-2, None),  # -1: no limit, -2: until the context is full
    "top_k": (0, None),
    "repeat_last_n": (-1, None),  # -1: the whole context
    "temperature": (0, None),
    "top_p": (0, 1),
    "min_p": (0, 1),
    "typical_p": (0, 1),
}

_INT_TEXT = re.compile(r"[+-]?\d+")
_FLOAT_TEXT = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")


def _parse_int(name: str, value: object) -> int:
    """Ints come as text, as JSON ints, or as JSON floats with no fraction (JSON has one number type)."""
    if isinstance(value, str) and _INT_TEXT.fullmatch(value.strip()):
        try:
            return int(value.strip())
        except ValueError:  # over Python's 4300-digit limit for int(str): no such parameter value makes sense
            digits = len(value.strip())
            raise ModelfileError(f"invalid int value for parameter {name!r}: {digits} digits is too many") from None
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    raise ModelfileError(f"invalid int value {value!r} for parameter {name!r}")


def _parse_float(name: str, value: object) -> float:
    """Only plain decimal numbers: no 'nan', 'inf' or '1_0', which float() would take but mean nothing here."""
    result: float | None = None
    if isinstance(value, str) and _FLOAT_TEXT.fullmatch(value.strip()):
        result = float(value.strip())
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        result = float(value)
    if result is None or not math.isfinite(result):
        raise ModelfileError(f"invalid float value {value!r} for parameter {name!r}")
    return result


def _parse_bool(name: str, value: object) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise ModelfileError(f"invalid bool value {value!r} for parameter {name!r}")


def _parse_stop(name: str, value: object) -> list[str]:
    """A stop value is kept exactly as given (spaces and newlines can be the point of a stop string)."""
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        raise ModelfileError(f"invalid list value {value!r} for parameter {name!r}: expected strings")
    if any(v == "" for v in values):
        raise ModelfileError(f"parameter {name!r} must not be an empty string")
    return list(values)


_PARSERS = {int: _parse_int, float: _parse_float, bool: _parse_bool, list: _parse_stop}


def _check_range(name: str, value: int | float) -> None:
    low, high = _RANGES.get(name, (None, None))
    if low is not None and high is not None:
        if not low <= value <= high:
            raise ModelfileError(f"parameter {name!r} must be between {low} and {high}, got {value}")
    elif low is not None and value < low:
        raise ModelfileError(f"parameter {name!r} must be at least {low}, got {value}")
    elif high is not None and value > high:
        raise ModelfileError(f"parameter {name!r} must be at most {high}, got {value}")


def coerce_parameter(name: str, value: object) -> object:
    """Check one parameter and return it typed; 'stop' always comes back as a list of strings.

    `value` is a string (from a Modelfile) or a JSON value (from /api/create's `parameters`).
    """
    if name in DEPRECATED_PARAMETERS:
        raise ModelfileError(f"parameter {name!r} is deprecated and not supported")
    kind = PARAMETER_TYPES.get(name)
    if kind is None:
        raise ModelfileError(f"unknown parameter {name!r}")
    typed = _PARSERS[kind](name, value)
    if isinstance(typed, (int, float)) and not isinstance(typed, bool):
        _check_range(name, typed)
    return typed


def coerce_parameters(values: dict[str, object]) -> dict[str, object]:
    """Check and type a whole `parameters` object, keeping its order."""
    if not isinstance(values, dict):
        raise ModelfileError(f"parameters must be an object, got {type(values).__name__}")
    return {name: coerce_parameter(name, value) for name, value in values.items()}


# --- the model -------------------------------------------------------------------------------------

MESSAGE_ROLES = ("system", "user", "assistant")


@dataclass
class Modelfile:
    """What a Modelfile says. `from_[0]` is the model; `from_[1]`, when present, a vision projector."""

    from_: list[str]
    parameters: dict[str, object] = field(default_factory=dict)
    template: str | None = None
    system: str | None = None
    adapters: list[str] = field(default_factory=list)
    licenses: list[str] = field(default_factory=list)
    messages: list[dict[str, str]] = field(default_factory=list)


# --- parsing ---------------------------------------------------------------------------------------

_INSTRUCTIONS = ("FROM", "PARAMETER", "TEMPLATE", "SYSTEM", "ADAPTER", "LICENSE", "MESSAGE")
_UNSUPPORTED = ("REQUIRES", "DRAFT", "RENDERER", "PARSER")
_TRIPLE = '"""'


class _Cursor:
    """A position in the text that knows its line, so quoted values can run over several lines."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0
        self.line = 1

    def at_end(self) -> bool:
        return self.pos >= len(self.text)

    def _advance_to(self, pos: int) -> None:
        self.line += self.text.count("\n", self.pos, pos)
        self.pos = pos

    def skip_spaces(self) -> None:
        """Skip whitespace up to, not over, the end of the line."""
        pos = self.pos
        while pos < len(self.text) and self.text[pos] != "\n" and self.text[pos].isspace():
            pos += 1
        self.pos = pos

    def word(self) -> str:
        """The run of non-whitespace characters here (an instruction, parameter name or role)."""
        self.skip_spaces()
        start = pos = self.pos
        while pos < len(self.text) and not self.text[pos].isspace():
            pos += 1
        self.pos = pos
        return self.text[start:pos]

    def rest_of_line(self) -> str:
        """Everything up to the end of the line, which is consumed too."""
        end = self.text.find("\n", self.pos)
        end = len(self.text) if end == -1 else end
        rest = self.text[self.pos : end]
        self._advance_to(min(end + 1, len(self.text)))
        return rest

    def peek_line(self) -> str:
        end = self.text.find("\n", self.pos)
        return self.text[self.pos : len(self.text) if end == -1 else end]

    def value(self, line: int, what: str) -> str:
        """A plain, `"..."` or `\"\"\"...\"\"\"` value; `line` is the statement's, for errors."""
        self.skip_spaces()
        if self.text.startswith(_TRIPLE, self.pos):
            value = self._triple_quoted(line)
        elif self.text.startswith('"', self.pos):
            value = self._quoted(line)
        else:
            value = self.rest_of_line().strip()
            if not value:
                raise ModelfileError(f"missing value for {what}", line)
            return value
        trailing = self.rest_of_line().strip()
        if trailing:
            raise ModelfileError(f"unexpected text after the closing quote of {what}: {trailing!r}", line)
        return value

    def _triple_quoted(self, line: int) -> str:
        start = self.pos + len(_TRIPLE)
        close = self.text.find(_TRIPLE, start)
        if close == -1:
            raise ModelfileError('unterminated """ quote', line)
        while self.text.startswith('"', close + len(_TRIPLE)):
            close += 1  # a quote just before the closing three is part of the value
        self._advance_to(close + len(_TRIPLE))
        return self.text[start:close]

    def _quoted(self, line: int) -> str:
        chars: list[str] = []
        pos = self.pos + 1
        while pos < len(self.text):
            char = self.text[pos]
            if char == "\\" and self.text[pos + 1 : pos + 2] in ('"', "\\"):
                chars.append(self.text[pos + 1])
                pos += 2
            elif char == '"':
                self._advance_to(pos + 1)
                return "".join(chars)
            else:
                chars.append(char)
                pos += 1
        raise ModelfileError('unterminated " quote', line)


def _name_or_path(value: str, what: str, line: int) -> str:
    """FROM and ADAPTER name something to load; a quoted blank would only fail later, less clearly."""
    if not value.strip():
        raise ModelfileError(f"{what} needs a model name or a path, got {value!r}", line)
    return value


class _Builder:
    """Collects statements into a Modelfile, enforcing the rules that span statements."""

    def __init__(self) -> None:
        self.mf = Modelfile(from_=[])

    def statement(self, cursor: _Cursor, line: int) -> None:
        instruction = cursor.word()
        kind = instruction.upper()
        if kind in _UNSUPPORTED:
            raise ModelfileError(f"{kind} is not supported by corral", line)
        if kind not in _INSTRUCTIONS:
            valid = ", ".join(_INSTRUCTIONS)
            raise ModelfileError(f"unknown instruction {instruction!r}; valid commands are {valid}", line)
        getattr(self, "_" + kind.lower())(cursor, line)

    def _from(self, cursor: _Cursor, line: int) -> None:
        if len(self.mf.from_) == 2:
            raise ModelfileError("more than two FROM lines (a model and a vision projector)", line)
        self.mf.from_.append(_name_or_path(cursor.value(line, "FROM"), "FROM", line))

    def _parameter(self, cursor: _Cursor, line: int) -> None:
        name = cursor.word()
        if not name:
            raise ModelfileError("missing parameter name for PARAMETER", line)
        raw = cursor.value(line, f"parameter {name!r}")
        try:
            typed = coerce_parameter(name, raw)
        except ModelfileError as error:
            raise ModelfileError(str(error), line) from None
        if name == "stop":
            self.mf.parameters.setdefault("stop", []).extend(typed)  # type: ignore[union-attr]
        else:
            self.mf.parameters[name] = typed

    def _template(self, cursor: _Cursor, line: int) -> None:
        self.mf.template = cursor.value(line, "TEMPLATE")

    def _system(self, cursor: _Cursor, line: int) -> None:
        self.mf.system = cursor.value(line, "SYSTEM")

    def _adapter(self, cursor: _Cursor, line: int) -> None:
        self.mf.adapters.append(_name_or_path(cursor.value(line, "ADAPTER"), "ADAPTER", line))

    def _license(self, cursor: _Cursor, line: int) -> None:
        self.mf.licenses.append(cursor.value(line, "LICENSE"))

    def _message(self, cursor: _Cursor, line: int) -> None:
        role = cursor.word()
        if not role:
            raise ModelfileError("missing role for MESSAGE", line)
        if role not in MESSAGE_ROLES:
            raise ModelfileError(f"message role must be one of system, user or assistant, got {role!r}", line)
        self.mf.messages.append({"role": role, "content": cursor.value(line, "MESSAGE")})


def parse(text: str) -> Modelfile:
    """Parse a Modelfile's text; raises ModelfileError, with the line, on anything it cannot accept."""
    cursor = _Cursor(text[1:] if text.startswith("\ufeff") else text)
    builder = _Builder()
    while not cursor.at_end():
        head = cursor.peek_line().strip()
        if not head or head.startswith("#"):
            cursor.rest_of_line()
            continue
        builder.statement(cursor, cursor.line)
    if not builder.mf.from_:
        raise ModelfileError("no FROM line")
    return builder.mf


# --- rendering -------------------------------------------------------------------------------------


def _is_plain(value: str) -> bool:
    """Whether `value` reads back unchanged when written bare to the end of its line."""
    return bool(value) and value == value.strip() and "\n" not in value and not value.startswith('"')


def _escaped(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _block(value: str) -> str:
    """\"\"\"-quoted, the Ollama way, unless the value itself holds \"\"\"; then escaped "..."."""
    return _escaped(value) if _TRIPLE in value else _TRIPLE + value + _TRIPLE


def _inline(value: str) -> str:
    return value if _is_plain(value) else _block(value)


def _parameter_text(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value) if isinstance(value, float) else str(value)


def _parameter_lines(parameters: dict[str, object]) -> list[str]:
    lines = []
    for name, value in coerce_parameters(parameters).items():
        if name == "stop":
            lines += [f"PARAMETER stop {_escaped(stop)}" for stop in value]  # type: ignore[union-attr]
        else:
            lines.append(f"PARAMETER {name} {_parameter_text(value)}")
    return lines


def render(mf: Modelfile) -> str:
    """Write `mf` as Modelfile text that `parse` reads back to an equal Modelfile.

    An empty 'stop' list is not written (and so reads back as no 'stop' at all).
    """
    if not 1 <= len(mf.from_) <= 2:
        raise ModelfileError(f"a Modelfile needs one or two FROM values, got {len(mf.from_)}")
    for value in [*mf.from_, *mf.adapters]:
        if not value.strip():
            raise ModelfileError(f"FROM and ADAPTER need a model name or a path, got {value!r}")
    lines = [f"FROM {_inline(source)}" for source in mf.from_]
    if mf.template is not None:
        lines.append(f"TEMPLATE {_block(mf.template)}")
    if mf.system is not None:
        lines.append(f"SYSTEM {_block(mf.system)}")
    lines += _parameter_lines(mf.parameters)
    lines += [f"ADAPTER {_inline(adapter)}" for adapter in mf.adapters]
    lines += [f"LICENSE {_block(text)}" for text in mf.licenses]
    for message in mf.messages:
        role = message.get("role")
        if role not in MESSAGE_ROLES:
            raise ModelfileError(f"message role must be one of system, user or assistant, got {role!r}")
        lines.append(f"MESSAGE {role} {_inline(message['content'])}")
    return "\n".join(lines) + "\n"
