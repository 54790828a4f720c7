"""JSON Schema -> GBNF, so that `response_format` structured outputs are enforced while sampling.

llama.cpp's grammar sampler only lets the model pick tokens that keep the text inside the grammar, so a
grammar built from a schema makes every completion a document that validates against that schema. The
converter is therefore *sound first*: every keyword it meets either becomes part of the grammar exactly,
or is an annotation with no effect on validity, or raises `SchemaError` naming the keyword (the server
turns that into a 400). Nothing is dropped silently. Where exactness would need an unreasonable grammar,
the grammar accepts a documented *subset* of the valid documents (it never accepts an invalid one):

* object keys come in schema order (`properties` order, then extra keys);
* `additionalProperties` absent is read as `false` when the schema lists `properties` (what OpenAI's
  strict mode requires anyway); an object schema without `properties` and without
  `additionalProperties` accepts any object;
* a schema without `type` gets its types from the keywords it uses (`properties` -> object,
  `items` -> array, `minLength` -> string, ...); with none of them it accepts any JSON value;
* `oneOf` is treated as `anyOf`: the grammar cannot check that exactly one branch matches, so the
  branches of a `oneOf` should be disjoint (pydantic's discriminated unions are);
* `nullable: true` (OpenAPI) means "null is accepted too";
* numbers have at most 20 integer digits (more only where a bound needs them), 20 fraction digits and 3
  exponent digits, so a model cannot loop on digits forever either; numbers with bounds are written
  without an exponent, and bounds count as the decimal the schema wrote; integers are written as
  integers (never `1.0`), and `-0` only where 0 is in range;
* strings are written with their usual JSON escapes; lone UTF-16 surrogates are never produced;
  inside a `pattern`, only control characters may be written as `\\uXXXX`;
* `pattern` follows ECMA-262 where the regex dialects differ, restricted to what Python's `re` and
  Rust's `regex` also agree on (`\\d` is `[0-9]`, `.` excludes line terminators, `$` is the very end);
* whitespace between tokens is at most one space, or one newline and up to 20 indent characters, so a
  model cannot loop on whitespace forever; there is none around the document;
* formats (checked wherever the value may be a string): `date`, `time`, `date-time` (RFC 3339, upper-case
  `T`/`Z`, up to 9 fraction digits, no leap seconds), `uuid` (and `uuid1`..`uuid5`), `ipv4`, and practical
  grammars for `email` (`local@domain.tld`) and `uri` (RFC 3986 `scheme://host[:port][/path][?query]
  [#fragment]` or `scheme:path`, without userinfo or IP literals; under `maxLength`, without fragment or
  percent-escapes, each part getting a share of the length);
* `minLength`/`maxLength` next to `pattern` or `format` are enforced where the pattern or format already
  fits them or is fixed parts around one repeated character class (like `^[A-Z][a-z]*$`), and for `uri`;
  otherwise they raise.

Composition: local `$ref`s (`#`, `#/$defs/...`, `#/definitions/...`, any JSON pointer) become rules, so
recursion works; a `$ref` that reaches itself without an object or array in between raises. `allOf`
members are merged (properties united, bounds tightened, `anyOf` inside distributed); values that cannot
merge (two patterns, a member forbidding another member's property) raise. `enum`/`const` take any JSON
values; next to them only `type` is accepted.

Unsupported, each raising `SchemaError` with its keyword: `not`, `if`/`then`/`else`, `multipleOf`
(except where it holds for every integer), `uniqueItems: true`, `contains`, `patternProperties`,
`propertyNames`, `dependentRequired`, `dependentSchemas`, `dependencies`, `minProperties` and
`maxProperties` (unless the object's shape already guarantees them), `unevaluatedProperties` and
`unevaluatedItems` (unless `true`), remote `$ref`s, `$dynamicRef`, unknown formats, regex features such as
lookarounds and backreferences, and any keyword this module does not know.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterable
from decimal import Decimal
from functools import cache
from typing import Any

__all__ = ["JSON_OBJECT_GRAMMAR", "SchemaError", "literal", "schema_to_grammar", "schemas_to_rules"]


class SchemaError(ValueError):
    """The schema uses something the grammar cannot enforce (or is not a valid schema).

    `subject` says whose schema it is (`response_format schema`, `tools[0].function.parameters`)."""

    def __init__(self, message: str, keyword: str | None = None, path: str = "",
                 subject: str = "response_format schema") -> None:
        self.message, self.keyword, self.path, self.subject = message, keyword, path, subject
        super().__init__(str(self))

    def __str__(self) -> str:
        label = f"'{self.keyword}' " if self.keyword else ""
        return f"{self.subject}: {label}at {self.path or '/'}: {self.message}"


# ---------------------------------------------------------------------------------------------------
# GBNF expressions. An expression is GBNF text; "" matches only the empty string and None matches
# nothing at all, so that impossible branches (a range with min > max, a `false` schema) fall out of
# unions instead of producing an invalid grammar.

Expr = str | None

_MAX_REPEAT = 10_000  # llama.cpp expands x{m,n} into n rules; beyond this the grammar gets unreasonable
# Digits a number may have, so that a model cannot loop on digits forever: integer part and fraction
# (each at least as many as the schema's own bounds need), and exponent.
_MAX_DIGITS = 20
_MAX_EXPONENT_DIGITS = 3


def _esc(code: int) -> str:
    """A code point as a GBNF escape, so that the grammar text itself is plain ASCII."""
    if code < 0x100:
        return f"\\x{code:02X}"
    if code < 0x10000:
        return f"\\u{code:04X}"
    return f"\\U{code:08X}"


_LITERAL_SAFE = frozenset(" !#$%&'()*+,-./:;<=>?@[]^_`{|}~")


def _lit(text: str) -> str:
    """A GBNF string literal matching exactly `text` ("" for the empty string)."""
    if not text:
        return ""
    out = []
    for ch in text:
        if ch.isascii() and (ch.isalnum() or ch in _LITERAL_SAFE):
            out.append(ch)
        elif ch in '"\\':
            out.append("\\" + ch)
        else:
            out.append(_esc(ord(ch)))
    return '"' + "".join(out) + '"'


def _is_atom(expr: str) -> bool:
    """Whether `expr` is one GBNF item (name, literal, class or group), so a postfix applies to all of it."""
    depth, quote, bracket, i = 0, False, False, 0
    while i < len(expr):
        ch = expr[i]
        if ch == "\\" and (quote or bracket):
            i += 2
            continue
        if quote:
            quote = ch != '"'
        elif bracket:
            bracket = ch != "]"
        elif ch == '"':
            quote = True
        elif ch == "[":
            bracket = True
        elif ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        elif depth == 0 and ch in " |":
            return False
        i += 1
    return True


def _group(expr: str) -> str:
    """`expr` made safe to take a postfix operator."""
    if _is_atom(expr) and not expr.endswith(("*", "+", "?", "}")):
        return expr
    return f"({expr})"


def _seq(*parts: Expr) -> Expr:
    if any(p is None for p in parts):
        return None
    return " ".join(p for p in parts if p)


def _alt(*parts: Expr) -> Expr:
    options: list[str] = []
    empty = False
    for p in parts:
        if p is None:
            continue
        if p == "":
            empty = True
        elif p not in options:
            options.append(p)
    if not options:
        return "" if empty else None
    body = " | ".join(options)
    if empty:
        return f"({body})?" if len(options) > 1 else f"{_group(body)}?"
    return body if len(options) == 1 else f"({body})"


def _opt(expr: Expr) -> Expr:
    return _alt(expr, "")


def _rep(expr: Expr, low: int, high: int | None) -> Expr:
    """`expr` repeated low..high times (high None: unbounded). `expr` must not match the empty string
    when unbounded: llama.cpp rejects that as left recursion."""
    if high is not None and high < low:
        return None
    if expr is None:
        return "" if low == 0 else None
    if expr == "" or high == 0:
        return ""
    if low == high == 1:
        return expr
    atom = _group(expr)
    if high is None:
        return atom + ("*" if low == 0 else "+" if low == 1 else f"{{{low},}}")
    if low == 0 and high == 1:
        return atom + "?"
    return atom + (f"{{{low}}}" if low == high else f"{{{low},{high}}}")


# ---------------------------------------------------------------------------------------------------
# Character sets, as sorted disjoint tuples of inclusive code point ranges.

Ranges = tuple[tuple[int, int], ...]
_MAX_CODE = 0x10FFFF
_SURROGATES: Ranges = ((0xD800, 0xDFFF),)


def _norm(ranges: Iterable[tuple[int, int]]) -> Ranges:
    out: list[list[int]] = []
    for lo, hi in sorted(r for r in ranges if r[0] <= r[1]):
        if out and lo <= out[-1][1] + 1:
            out[-1][1] = max(out[-1][1], hi)
        else:
            out.append([lo, hi])
    return tuple((lo, hi) for lo, hi in out)


def _chars(text: str) -> Ranges:
    return _norm((ord(c), ord(c)) for c in text)


def _union(*sets: Ranges) -> Ranges:
    return _norm(r for s in sets for r in s)


def _complement(ranges: Ranges) -> Ranges:
    out, start = [], 0
    for lo, hi in ranges:
        if lo > start:
            out.append((start, lo - 1))
        start = hi + 1
    if start <= _MAX_CODE:
        out.append((start, _MAX_CODE))
    return tuple(out)


def _intersect(a: Ranges, b: Ranges) -> Ranges:
    return _complement(_union(_complement(a), _complement(b)))


def _minus(a: Ranges, b: Ranges) -> Ranges:
    return _intersect(a, _complement(b))


def _contains(ranges: Ranges, code: int) -> bool:
    return any(lo <= code <= hi for lo, hi in ranges)


def _class_item(code: int) -> str:
    ch = chr(code)
    return ch if ch.isascii() and ch.isalnum() else _esc(code)


def _class(ranges: Ranges) -> Expr:
    """A GBNF character class for `ranges`, negated when that is shorter and leaves out only ASCII:
    while a token ends inside a multi-byte character, llama.cpp rejects it from a negated class as
    soon as any left-out character could still follow, so a negated class leaving out non-ASCII
    characters would wrongly refuse tokens that split other characters."""
    ranges = _minus(ranges, _SURROGATES)  # never in UTF-8 text
    if not ranges:
        return None
    if len(ranges) == 1 and ranges[0][0] == ranges[0][1]:
        return _lit(chr(ranges[0][0]))
    negated = _minus(_complement(ranges), _SURROGATES)
    ascii_only = bool(negated) and negated[-1][1] < 0x80
    shown, prefix = (negated, "^") if ascii_only and len(negated) < len(ranges) else (ranges, "")
    items = "".join(
        _class_item(lo) if lo == hi else f"{_class_item(lo)}-{_class_item(hi)}" for lo, hi in shown
    )
    return f"[{prefix}{items}]"


# Characters a JSON string may hold unescaped.
_RAW_OK: Ranges = _minus(((0x20, _MAX_CODE),), _union(_chars('"\\'), _SURROGATES))
_SHORT_ESCAPES = {0x22: '"', 0x5C: "\\", 0x2F: "/", 0x08: "b", 0x0C: "f", 0x0A: "n", 0x0D: "r", 0x09: "t"}
_CONTROLS: Ranges = ((0, 0x1F),)
_BMP_CHARS: Ranges = ((0, 0xD7FF), (0xE000, 0xFFFF))


# ---------------------------------------------------------------------------------------------------
# Fixed-width digit ranges, shared by integer bounds (base 10) and \uXXXX escapes (base 16).


def _dec_digit(lo: int, hi: int) -> str:
    return _lit(str(lo)) if lo == hi else f"[{lo}-{hi}]"


def _hex_digit(lo: int, hi: int) -> str:
    values = range(lo, hi + 1)
    codes = [ord(f"{v:x}") for v in values] + [ord(f"{v:X}") for v in values]
    return _class(_norm((c, c) for c in codes)) or ""


def _digit_span(low: list[int], high: list[int], base: int, digit: Callable[[int, int], str]) -> Expr:
    """Digit strings of the same length as `low` and `high` whose value lies between them (inclusive).

    Splits on the first digit: the strings that start like `low`, a block of free digits, and the
    strings that start like `high`, recursing on the rest; a side whose rest is all 0s (or all 9s)
    joins the free block."""
    if not low:
        return ""
    if low[0] == high[0]:
        return _seq(digit(low[0], low[0]), _digit_span(low[1:], high[1:], base, digit))
    rest = len(low) - 1
    top = base - 1
    low_full = all(d == 0 for d in low[1:])
    high_full = all(d == top for d in high[1:])
    first = low[0] if low_full else low[0] + 1
    last = high[0] if high_full else high[0] - 1
    parts: list[Expr] = []
    if not low_full:
        parts.append(_seq(digit(low[0], low[0]), _digit_span(low[1:], [top] * rest, base, digit)))
    if first <= last:
        parts.append(_seq(digit(first, last), _rep(digit(0, top), rest, rest)))
    if not high_full:
        parts.append(_seq(digit(high[0], high[0]), _digit_span([0] * rest, high[1:], base, digit)))
    return _alt(*parts)


def _hex4(ranges: Ranges) -> Expr:
    """Four hex digits (either case) whose value is in `ranges` (code points below 0x10000)."""
    parts = []
    for lo, hi in _intersect(ranges, ((0, 0xFFFF),)):
        low = [int(c, 16) for c in f"{lo:04x}"]
        high = [int(c, 16) for c in f"{hi:04x}"]
        parts.append(_digit_span(low, high, 16, _hex_digit))
    return _alt(*parts)


def _uint_range(low: int, high: int | None) -> Expr:
    """Canonical decimal integers (no leading zeros) in low..high; high None means unbounded (up to
    the digit limit)."""
    if high is not None and low > high:
        return None
    width = len(str(low))
    parts: list[Expr] = []
    top = len(str(high)) if high is not None else width
    for n in range(width, top + 1):
        lo = low if n == width else 10 ** (n - 1)
        hi = high if high is not None and n == top else 10**n - 1
        parts.append(_digit_span([int(c) for c in str(lo)], [int(c) for c in str(hi)], 10, _dec_digit))
    if high is None:  # longer numbers, up to the digit limit
        parts.append(_seq("[1-9]", _rep("[0-9]", width, max(_MAX_DIGITS, width + 1) - 1)))
    return _alt(*parts)


def _int_range(low: int | None, high: int | None) -> Expr:
    """Canonical JSON integers in low..high (None: unbounded on that side), plus "-0" when 0 is in
    range (JSON allows it and it means 0)."""
    parts: list[Expr] = []
    if (low is None or low <= 0) and (high is None or high >= 0):
        parts.append(_lit("-0"))
    if high is None or high >= 0:
        parts.append(_uint_range(max(low, 0) if low is not None else 0, high))
    if low is None or low < 0:
        magnitude_low = -high if high is not None and high < 0 else 1
        parts.append(_seq(_lit("-"), _uint_range(magnitude_low, -low if low is not None else None)))
    return _alt(*parts)


# ---------------------------------------------------------------------------------------------------
# Decimal fractions. A bounded number is written I or I.F; the integer part I is a digit range and the
# fraction F is compared digit by digit with the bound's own fraction digits. A `_Frac` describes the
# allowed digit strings G after some prefix: (whether G may be empty, a grammar for the non-empty G).
# `room` is how many more digits G may have: every G that fits the room is in, none much longer.

_Frac = tuple[bool, Expr] | None


def _frac_digits(value: Decimal) -> tuple[int, str]:
    """Integer part and fraction digits (no trailing zeros) of a non-negative decimal."""
    whole = int(value)
    text = format(value - whole, "f")
    digits = text.split(".", 1)[1].rstrip("0") if "." in text else ""
    return whole, digits


def _any_digits(low: int, room: int) -> Expr:
    return _rep("[0-9]", low, room) if room >= low else None


def _any_frac(room: int) -> _Frac:
    return True, _any_digits(1, room)


def _after(digit: int, frac: _Frac) -> Expr:
    """`digit` followed by the strings of `frac`."""
    if frac is None:
        return None
    empty, nonempty = frac
    return _alt(_lit(str(digit)) if empty else None, _seq(_lit(str(digit)), nonempty))


def _frac_at_least(bound: str, strict: bool, room: int) -> _Frac:
    """Digit strings G with 0.G >= 0.bound (> when strict)."""
    if not bound:
        if not strict:
            return _any_frac(room)
        nonzero = _seq(_rep('"0"', 0, room - 1), "[1-9]", _any_digits(0, room - 1)) if room > 0 else None
        return False, nonzero
    d = int(bound[0])
    higher = _seq(_dec_digit(d + 1, 9), _any_digits(0, room - 1)) if d < 9 else None
    return False, _alt(higher, _after(d, _frac_at_least(bound[1:], strict, room - 1)))


def _frac_at_most(bound: str, strict: bool, room: int) -> _Frac:
    """Digit strings G with 0.G <= 0.bound (< when strict)."""
    if not bound:
        return None if strict else (True, _rep('"0"', 1, room) if room > 0 else None)
    d = int(bound[0])
    lower = _seq(_dec_digit(0, d - 1), _any_digits(0, room - 1)) if d > 0 else None
    return True, _alt(lower, _after(d, _frac_at_most(bound[1:], strict, room - 1)))


def _frac_between(low: str, high: str, low_strict: bool, high_strict: bool, room: int) -> _Frac:
    """Digit strings G with 0.low <= 0.G <= 0.high (either side strict); requires 0.low <= 0.high."""
    if not low and not low_strict:
        return _frac_at_most(high, high_strict, room)
    if not high:
        return None  # only 0 is <= 0, and 0 is excluded by the lower bound here
    d_low, d_high = (int(low[0]) if low else 0), int(high[0])
    if d_low == d_high:
        return False, _after(d_low, _frac_between(low[1:], high[1:], low_strict, high_strict, room - 1))
    middle = _seq(_dec_digit(d_low + 1, d_high - 1), _any_digits(0, room - 1)) if d_low + 1 < d_high else None
    return False, _alt(
        _after(d_low, _frac_at_least(low[1:], low_strict, room - 1)),
        middle,
        _after(d_high, _frac_at_most(high[1:], high_strict, room - 1)),
    )


def _with_fraction(integer: Expr, frac: _Frac) -> Expr:
    """An integer part followed by an optional "." fraction drawn from `frac`."""
    if frac is None:
        return None
    empty, nonempty = frac
    return _seq(integer, _alt("" if empty else None, _seq(_lit("."), nonempty)))


def _nonneg_decimal(low: Decimal, low_strict: bool, high: Decimal | None, high_strict: bool) -> Expr:
    """Non-negative decimals I or I.F (no exponent) between low >= 0 and high (None: unbounded)."""
    whole_low, frac_low = _frac_digits(low)
    whole_high, frac_high = _frac_digits(high) if high is not None else (None, "")
    room = max(_MAX_DIGITS, len(frac_low) + 1, len(frac_high) + 1)
    if high is None:
        return _alt(
            _with_fraction(_lit(str(whole_low)), _frac_at_least(frac_low, low_strict, room)),
            _with_fraction(_uint_range(whole_low + 1, None), _any_frac(room)),
        )
    if high < low or (high == low and (low_strict or high_strict)):
        return None
    if whole_low == whole_high:
        return _with_fraction(
            _lit(str(whole_low)), _frac_between(frac_low, frac_high, low_strict, high_strict, room)
        )
    return _alt(
        _with_fraction(_lit(str(whole_low)), _frac_at_least(frac_low, low_strict, room)),
        _with_fraction(_uint_range(whole_low + 1, whole_high - 1), _any_frac(room)),
        _with_fraction(_lit(str(whole_high)), _frac_at_most(frac_high, high_strict, room)),
    )


_Bound = tuple[Decimal, bool] | None  # (value, exclusive)


def _decimal_range(low: _Bound, high: _Bound) -> Expr:
    """JSON numbers in the interval, written without exponent (negative zero spelled "-0", "-0.0"
    only when 0 is in range)."""
    parts: list[Expr] = []
    zero_above = low is None or low[0] < 0 or (low[0] == 0 and not low[1])
    zero_below = high is None or high[0] > 0 or (high[0] == 0 and not high[1])
    if zero_above and zero_below:
        parts.append(_seq(_lit("-0"), _opt(_seq(_lit("."), _rep('"0"', 1, _MAX_DIGITS)))))
    if high is None or high[0] > 0 or (high[0] == 0 and not high[1]):
        start = low if low is not None and low[0] >= 0 else (Decimal(0), False)
        parts.append(_nonneg_decimal(start[0], start[1], high[0] if high else None, bool(high and high[1])))
    if low is None or low[0] < 0:
        # x = -m with m > 0: the bounds swap sides and flip sign.
        m_low = (-high[0], high[1]) if high is not None and high[0] < 0 else (Decimal(0), True)
        m_high = (-low[0], low[1]) if low is not None else None
        magnitude = _nonneg_decimal(m_low[0], m_low[1], m_high[0] if m_high else None, bool(m_high and m_high[1]))
        parts.append(_seq(_lit("-"), magnitude))
    return _alt(*parts)


# ---------------------------------------------------------------------------------------------------
# Regular expressions (the `pattern` keyword): parsed into a small tree, then written as GBNF over the
# JSON-encoded characters of the string.

_Node = tuple  # ("set", Ranges) | ("seq", [nodes]) | ("alt", [nodes]) | ("rep", node, low, high)
_EMPTY: _Node = ("seq", [])


@cache
def _py_set(kind: str) -> Ranges:
    """Unicode sets as Python's `re` sees them, computed once when a pattern first needs them."""
    test = {"d": str.isdecimal, "w": lambda c: c.isalnum() or c == "_", "s": str.isspace}[kind]
    return _norm((c, c) for c in range(_MAX_CODE + 1) if test(chr(c)))


_ECMA_SPACE = _union(
    _chars("\t\n\x0b\x0c\r \xa0\u1680\u2028\u2029\u202f\u205f\u3000\ufeff"), ((0x2000, 0x200A),)
)
_DIGIT = _chars("0123456789")
_WORD = _union(((0x30, 0x39), (0x41, 0x5A), (0x61, 0x7A)), _chars("_"))
_LINE_TERMINATORS = _chars("\n\r\u2028\u2029")


def _class_escape(letter: str) -> Ranges:
    """\\d \\w \\s and their negations, narrowed to what ECMA-262, Python and Rust all agree on."""
    if letter == "d":
        return _DIGIT
    if letter == "w":
        return _WORD
    if letter == "s":
        return _minus(_ECMA_SPACE, _chars("\ufeff"))  # the one ECMA space Python does not count
    positive = {"D": _union(_DIGIT, _py_set("d")), "W": _union(_WORD, _py_set("w")),
                "S": _union(_ECMA_SPACE, _py_set("s"))}[letter]
    return _complement(positive)


class _RegexParser:
    """A recursive-descent parser for the practical regex subset; anything else is a SchemaError."""

    _CONTROL_ESCAPES = {"n": "\n", "r": "\r", "t": "\t", "f": "\f", "v": "\v", "0": "\0"}

    def __init__(self, pattern: str, path: str) -> None:
        self.text = pattern
        self.pos = 0
        self.path = path

    def fail(self, message: str) -> SchemaError:
        return SchemaError(f"{message} in {self.text!r}", "pattern", self.path)

    def peek(self, ahead: int = 0) -> str:
        i = self.pos + ahead
        return self.text[i] if i < len(self.text) else ""

    def eat(self, token: str) -> bool:
        if self.text.startswith(token, self.pos):
            self.pos += len(token)
            return True
        return False

    def branches(self) -> list[tuple[_Node, bool, bool]]:
        """Top-level alternatives, each with whether it is anchored at the start and at the end."""
        out = []
        while True:
            anchored_start = self.eat("^")
            node, anchored_end = self.sequence(top=True)
            out.append((node, anchored_start, anchored_end))
            if not self.eat("|"):
                break
        if self.pos < len(self.text):
            raise self.fail("unbalanced ')'")
        return out

    def alternation(self) -> _Node:
        options = [self.sequence(top=False)[0]]
        while self.eat("|"):
            options.append(self.sequence(top=False)[0])
        return options[0] if len(options) == 1 else ("alt", options)

    def sequence(self, top: bool) -> tuple[_Node, bool]:
        items: list[_Node] = []
        while self.peek() and self.peek() not in "|)":
            if self.peek() == "$":
                self.pos += 1
                if top and self.peek() in ("", "|"):
                    return ("seq", items), True
                raise self.fail("'$' is only supported at the end")
            if self.peek() == "^":
                raise self.fail("'^' is only supported at the start")
            items.append(self.quantified(self.atom()))
        return ("seq", items), False

    def quantified(self, node: _Node) -> _Node:
        start = self.pos
        bounds = self.quantifier()
        if bounds is None:
            return node
        self.eat("?")  # lazy: same language
        if self.quantifier() is not None:
            raise self.fail(f"nested quantifier at {start}")
        low, high = bounds
        if (high is not None and high < low) or max(low, high or 0) > _MAX_REPEAT:
            raise self.fail(f"unsupported repetition count at {start}")
        return ("rep", node, low, high)

    def quantifier(self) -> tuple[int, int | None] | None:
        ch = self.peek()
        if ch in ("*", "+", "?") and ch:
            self.pos += 1
            return {"*": (0, None), "+": (1, None), "?": (0, 1)}[ch]
        match = re.compile(r"\{(\d+)(,(\d*))?\}").match(self.text, self.pos)
        if ch == "{" and match:
            if max(len(match.group(1)), len(match.group(3) or "")) > 9:  # far over _MAX_REPEAT; int() refuses 4300+
                raise self.fail(f"unsupported repetition count at {self.pos}")
            self.pos = match.end()
            low = int(match.group(1))
            if match.group(2) is None:
                return low, low
            return low, int(match.group(3)) if match.group(3) else None
        return None

    def atom(self) -> _Node:
        ch = self.peek()
        self.pos += 1
        if ch == "(":
            if self.eat("?:"):
                pass
            elif self.text.startswith("?<", self.pos) and self.peek(2) not in ("=", "!"):
                end = self.text.find(">", self.pos)
                if end < 0:
                    raise self.fail("unterminated group name")
                self.pos = end + 1
            elif self.peek() == "?":
                raise self.fail("lookarounds and inline flags are not supported")
            node = self.alternation()
            if not self.eat(")"):
                raise self.fail("missing ')'")
            return node
        if ch == "[":
            return ("set", self.char_class())
        if ch == ".":
            return ("set", _complement(_LINE_TERMINATORS))
        if ch == "\\":
            return ("set", self.escape(in_class=False))
        if ch in "*+?" or (ch == "{" and self.quantifier_ahead()):
            raise self.fail(f"nothing to repeat at {self.pos - 1}")
        return ("set", _chars(ch))

    def quantifier_ahead(self) -> bool:
        return re.compile(r"\d+(,\d*)?\}").match(self.text, self.pos) is not None

    def escape(self, in_class: bool) -> Ranges:
        ch = self.peek()
        if not ch:
            raise self.fail("trailing backslash")
        self.pos += 1
        if ch in "dDwWsS":
            return _class_escape(ch)
        if ch == "b" and in_class:
            return _chars("\b")
        if ch in self._CONTROL_ESCAPES and not (ch == "0" and self.peek().isdigit()):
            return _chars(self._CONTROL_ESCAPES[ch])
        if ch in "xu":
            return _chars(chr(self.hex_code(2 if ch == "x" else 4)))
        if ch.isascii() and ch.isalnum():
            raise self.fail(f"unsupported escape \\{ch} (word boundaries, backreferences, properties)")
        return _chars(ch)

    def hex_code(self, size: int) -> int:
        """The code point of a \\xHH or \\uHHHH escape. Surrogates are refused: ECMA-262 pairs them
        into one character while Python's `re` keeps them apart, so no reading would be safe."""
        digits = self.text[self.pos : self.pos + size]
        if len(digits) != size or not all(c in "0123456789abcdefABCDEF" for c in digits):
            raise self.fail("bad hex escape")
        self.pos += size
        code = int(digits, 16)
        if 0xD800 <= code <= 0xDFFF:
            raise self.fail("surrogate escapes are not supported")
        return code

    def class_atom(self) -> tuple[Ranges, bool]:
        """One class member and whether it is a single character (so it can end a range)."""
        ch = self.peek()
        if not ch:
            raise self.fail("missing ']'")
        self.pos += 1
        if ch == "\\":
            letter = self.peek()
            return self.escape(in_class=True), letter not in "dDwWsS"
        return _chars(ch), True

    def char_class(self) -> Ranges:
        negate = self.eat("^")
        if self.peek() == "]":
            raise self.fail("'[]' and '[^]' mean different things in different dialects")
        members: list[Ranges] = []
        while not self.eat("]"):
            first, single = self.class_atom()
            if self.peek() == "-" and self.peek(1) not in ("]", ""):
                self.pos += 1
                last, last_single = self.class_atom()
                if not (single and last_single) or last[0][0] < first[0][0]:
                    raise self.fail("bad range in character class")
                members.append(((first[0][0], last[0][0]),))
            else:
                members.append(first)
        ranges = _union(*members)
        return _complement(ranges) if negate else ranges


def _nullable(node: _Node) -> bool:
    kind = node[0]
    if kind == "set":
        return False
    if kind == "seq":
        return all(_nullable(n) for n in node[1])
    if kind == "alt":
        return any(_nullable(n) for n in node[1])
    return node[2] == 0 or _nullable(node[1])


def _lengths(node: _Node) -> tuple[int, int | None]:
    """Shortest and longest match of `node` in characters (None: unbounded)."""
    kind = node[0]
    if kind == "set":
        return 1, 1
    if kind == "rep":
        low, high = _lengths(node[1])
        if high == 0:
            return 0, 0
        return low * node[2], None if high is None or node[3] is None else high * node[3]
    spans = [_lengths(n) for n in node[1]]
    lows = [low for low, _ in spans]
    highs = [high for _, high in spans if high is not None]
    unbounded = len(highs) < len(spans)
    if kind == "seq":
        return sum(lows), None if unbounded else sum(highs)
    return min(lows, default=0), None if unbounded else max(highs, default=0)


def _json_chars(ranges: Ranges) -> Expr:
    """One character from `ranges`, as it may appear inside a JSON string: raw where JSON allows,
    otherwise as its short escape or (for control characters) as \\u00XX."""
    parts: list[Expr] = [_class(_intersect(ranges, _RAW_OK))]
    for code, letter in _SHORT_ESCAPES.items():
        if _contains(ranges, code):
            parts.append(_lit("\\" + letter))
    controls = _intersect(ranges, _CONTROLS)
    if controls:
        parts.append(_seq(_lit("\\u"), _hex4(controls)))
    return _alt(*parts)


class _RegexWriter:
    """Writes a parsed regex as GBNF. Keeps x* from repeating something that can match nothing."""

    def write(self, node: _Node) -> Expr:
        kind = node[0]
        if kind == "set":
            return _json_chars(node[1])
        if kind == "seq":
            return _seq(*(self.write(n) for n in node[1]))
        if kind == "alt":
            return _alt(*(self.write(n) for n in node[1]))
        inner, low, high = node[1], node[2], node[3]
        if _nullable(inner):
            return _rep(self.write_nonempty(inner), 0, high)
        return _rep(self.write(inner), low, high)

    def write_nonempty(self, node: _Node) -> Expr:
        """The non-empty strings of `node`: each has a first part that matched something."""
        kind = node[0]
        if kind == "set":
            return self.write(node)
        if kind == "alt":
            return _alt(*(self.write_nonempty(n) for n in node[1]))
        if kind == "rep":
            inner, high = node[1], node[3]
            if high == 0:
                return None
            base = self.write_nonempty(inner) if _nullable(inner) else self.write(inner)
            low = 1 if _nullable(inner) else max(node[2], 1)
            return _rep(base, low, high)
        options = []
        items = node[1]
        for i, item in enumerate(items):
            options.append(_seq(self.write_nonempty(item), *(self.write(n) for n in items[i + 1 :])))
            if not _nullable(item):
                break
        return _alt(*options)


def _flatten(node: _Node) -> list[_Node]:
    if node[0] == "seq":
        return [leaf for n in node[1] for leaf in _flatten(n)]
    return [node]


def _fit_lengths(node: _Node, min_len: int, max_len: int | None) -> _Node | None:
    """A fully anchored branch narrowed to min_len..max_len characters, when it is fixed-length parts
    around one repeated character set (like ^[A-Z][a-z]*$); an empty set when nothing fits. None when
    the branch has another shape."""
    items = _flatten(node)
    variable = [i for i, n in enumerate(items) if _lengths(n)[0] != _lengths(n)[1]]
    if len(variable) != 1:
        return None
    target = items[variable[0]]
    if target[0] != "rep" or target[1][0] != "set":
        return None
    fixed = sum(_lengths(n)[0] for i, n in enumerate(items) if i != variable[0])
    low = max(target[2], min_len - fixed)
    high = target[3]
    if max_len is not None:
        high = max_len - fixed if high is None else min(high, max_len - fixed)
    if high is not None and high < max(low, 0):
        return ("set", ())
    items[variable[0]] = ("rep", target[1], max(low, 0), high)
    return ("seq", items)


# ---------------------------------------------------------------------------------------------------
# Keyword tables.

_ANNOTATIONS = frozenset({
    "title", "description", "default", "examples", "example", "$schema", "$id", "$comment",
    "deprecated", "readOnly", "writeOnly", "discriminator", "strict", "$anchor", "$defs",
    "definitions", "contentEncoding", "contentMediaType",
})
_OBJECT_KEYWORDS = frozenset({
    "properties", "required", "additionalProperties", "minProperties", "maxProperties",
    "patternProperties", "propertyNames", "dependentRequired", "dependentSchemas", "dependencies",
    "unevaluatedProperties",
})
_ARRAY_KEYWORDS = frozenset({
    "items", "prefixItems", "additionalItems", "minItems", "maxItems", "uniqueItems", "contains",
    "minContains", "maxContains", "unevaluatedItems",
})
_STRING_KEYWORDS = frozenset({"minLength", "maxLength", "pattern", "format"})
_NUMBER_KEYWORDS = frozenset({"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf"})
_GENERAL_KEYWORDS = frozenset({"type", "nullable", "enum", "const", "$ref", "allOf", "anyOf", "oneOf"})
_NEVER = frozenset({"not", "if", "then", "else", "$dynamicRef", "$recursiveRef", "$dynamicAnchor", "$recursiveAnchor"})
_KNOWN = _OBJECT_KEYWORDS | _ARRAY_KEYWORDS | _STRING_KEYWORDS | _NUMBER_KEYWORDS | _GENERAL_KEYWORDS
_TYPES = ("object", "array", "string", "number", "integer", "boolean", "null")
_TYPE_KEYWORDS = {"object": _OBJECT_KEYWORDS, "array": _ARRAY_KEYWORDS, "string": _STRING_KEYWORDS,
                  "number": _NUMBER_KEYWORDS}
_LOWER_BOUNDS = frozenset({"minimum", "exclusiveMinimum", "minLength", "minItems", "minProperties"})
_UPPER_BOUNDS = frozenset({"maximum", "exclusiveMaximum", "maxLength", "maxItems", "maxProperties"})


def _is_annotation(key: str) -> bool:
    return key in _ANNOTATIONS or key.startswith("x-")


def _assertions(schema: dict[str, Any]) -> dict[str, Any]:
    """The schema without annotations: what actually constrains values."""
    return {k: v for k, v in schema.items() if not _is_annotation(k)}


def _check_keywords(schema: dict[str, Any], path: str) -> None:
    for key in schema:
        if _is_annotation(key):
            continue
        if key in _NEVER:
            raise SchemaError("this keyword cannot be enforced by a grammar", key, path)
        if key not in _KNOWN:
            raise SchemaError("unknown keyword; it cannot be enforced", key, path)


def _pointer_escape(name: str) -> str:
    return name.replace("~", "~0").replace("/", "~1")


def _json_type_of(value: Any) -> set[str]:
    if value is None:
        return {"null"}
    if isinstance(value, bool):
        return {"boolean"}
    if isinstance(value, int):
        return {"integer", "number"}
    if isinstance(value, float):
        return {"number", "integer"} if value.is_integer() else {"number"}
    if isinstance(value, str):
        return {"string"}
    if isinstance(value, list):
        return {"array"}
    return {"object"}


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True)


def _normalize(schema: dict[str, Any]) -> dict[str, Any]:
    """Rewrites older spellings into the ones the converter handles: OpenAPI `nullable`, draft-4
    boolean `exclusiveMinimum`/`exclusiveMaximum`, and draft-7 tuple `items` + `additionalItems`."""
    schema = dict(schema)
    for exclusive, inclusive in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        flag = schema.get(exclusive)
        if isinstance(flag, bool):
            del schema[exclusive]
            if flag and inclusive in schema:
                schema[exclusive] = schema.pop(inclusive)
    if isinstance(schema.get("items"), list):
        schema["prefixItems"] = schema.pop("items")
        if "additionalItems" in schema:
            schema["items"] = schema.pop("additionalItems")
    elif "additionalItems" in schema:
        del schema["additionalItems"]  # has no effect unless `items` is a list
    if "nullable" in schema:
        nullable = schema.pop("nullable")
        if nullable is True:
            return {"anyOf": [schema, {"type": "null"}]}
    return schema


def _within(shortest: int, longest: int | None, low: int, high: int | None) -> bool:
    """Whether every length in shortest..longest (None: unbounded) lies in low..high."""
    return low <= shortest and (high is None or (longest is not None and longest <= high))


# ---------------------------------------------------------------------------------------------------
# Formats: content grammars (inside the quotes) and the range of their lengths.

_D = "[0-9]"


def _date_grammar() -> str:
    year = _alt(  # 0001..9999: year 0000 does not exist
        _seq("[1-9]", _D, _D, _D), _seq('"0"', "[1-9]", _D, _D), _seq('"00"', "[1-9]", _D), _seq('"000"', "[1-9]")
    )
    by_four = _alt('"0" [48]', "[2468] [048]", "[13579] [26]")  # 04..96 step 4, not 00
    leap_year = _alt(_seq(_D, _D, by_four), _seq(by_four, '"00"'))  # year 0000 does not exist
    day28 = '("0" [1-9] | "1" [0-9] | "2" [0-8])'
    day30 = '("0" [1-9] | [12] [0-9] | "30")'
    day31 = '("0" [1-9] | [12] [0-9] | "3" [01])'
    return _alt(
        _seq(year, '"-"', '("0" [13578] | "1" [02])', '"-"', day31),
        _seq(year, '"-"', '("0" [469] | "11")', '"-"', day30),
        _seq(year, '"-02-"', day28),
        _seq(leap_year, '"-02-29"'),
    ) or ""


def _time_grammar() -> str:
    hour = '([01] [0-9] | "2" [0-3])'
    minute = f"[0-5] {_D}"
    offset = _alt('"Z"', _seq("[+\\x2D]", hour, '":"', minute))
    return _seq(hour, '":"', minute, '":"', minute, _opt(_seq('"."', _rep(_D, 1, 9))), offset) or ""


def _uuid_grammar(version: int | None) -> str:
    hx = "[0-9a-fA-F]"
    third = _seq(_lit(str(version)), _rep(hx, 3, 3)) if version else _rep(hx, 4, 4)
    fourth = _seq("[89abAB]", _rep(hx, 3, 3)) if version else _rep(hx, 4, 4)
    return _seq(_rep(hx, 8, 8), '"-"', _rep(hx, 4, 4), '"-"', third, '"-"', fourth, '"-"', _rep(hx, 12, 12)) or ""


def _email_grammar() -> str:
    atext = "[A-Za-z0-9!#$%&'*+/=?^_`{|}~\\x2D]"
    label = "[A-Za-z0-9] ([A-Za-z0-9\\x2D]{0,61} [A-Za-z0-9])?"
    return f'{atext}+ ("." {atext}+)* "@" ({label} ".")+ [A-Za-z]{{2,63}}'


_PCHAR = "[A-Za-z0-9\\x2D._~!$&'()*+,;=:@]"  # RFC 3986 pchar, less percent-escapes
_HOST_CHAR = "[A-Za-z0-9\\x2D._~]"
_SCHEME_CHAR = "[A-Za-z0-9+.\\x2D]"


def _uri_grammar(budget: int | None = None) -> Expr:
    """A practical RFC 3986 URI: scheme ":" then either "//" host [":" port] [path/query] or a
    rootless path (urn:..., mailto:...), then [#fragment]. No userinfo, IP literals or "scheme:/path".

    Under a maxLength `budget` each part gets its own share (scheme up to 15, host up to 253, port
    up to 5 digits, the rest to the path and query), chosen so the shares add up to at most the
    budget; fragments and percent-escapes are left out there, since they would need a shared count."""
    if budget is None:
        pchar = _alt(_PCHAR, '"%" [0-9a-fA-F] [0-9a-fA-F]')
        more = _rep(_alt(pchar, "[/?]"), 0, None)
        fragment = _opt(_seq('"#"', more))
        scheme = _seq("[A-Za-z]", _rep(_SCHEME_CHAR, 0, 31))
        authority = _seq('"//"', _rep(_HOST_CHAR, 1, None), '(":" [0-9]{1,5})?', _opt(_seq("[/?]", more)), fragment)
        return _seq(scheme, '":"', _alt(authority, _seq(pchar, more, fragment)))
    scheme_max = max(1, min(15, budget // 4))
    host_max = max(1, min(253, budget // 3))
    after_host = budget - scheme_max - len("://") - host_max - len(":12345")
    after_colon = budget - scheme_max - len(":")
    if after_colon < 1:
        return None
    more = _alt(_PCHAR, "[/?]")
    scheme = _seq("[A-Za-z]", _rep(_SCHEME_CHAR, 0, scheme_max - 1))
    authority = _seq(
        '"//"', _rep(_HOST_CHAR, 1, host_max), '(":" [0-9]{1,5})?', _opt(_seq("[/?]", _rep(more, 0, after_host - 1)))
    ) if after_host >= 1 else None
    return _seq(scheme, '":"', _alt(authority, _seq(_PCHAR, _rep(more, 0, after_colon - 1))))


_FORMATS: dict[str, tuple[Callable[[], str], int, int | None]] = {
    "date": (_date_grammar, 10, 10),
    "time": (_time_grammar, 9, 24),
    "date-time": (lambda: _seq(_date_grammar(), '"T"', _time_grammar()) or "", 20, 35),
    "uuid": (lambda: _uuid_grammar(None), 36, 36),
    **{f"uuid{v}": ((lambda v=v: _uuid_grammar(v)), 36, 36) for v in range(1, 6)},
    "email": (_email_grammar, 6, None),
    "uri": (lambda: _uri_grammar() or "", 3, None),  # "a:b"
    "ipv4": (lambda: '{0} "." {0} "." {0} "." {0}'.format(
        '("25" [0-5] | "2" [0-4] [0-9] | "1" [0-9] [0-9] | [1-9] [0-9] | [0-9])'), 7, 15),
}


# ---------------------------------------------------------------------------------------------------
# The converter.

_QUOTE = '"\\""'
_PRIMITIVES = (
    "ws", "char", "string", "string-tail", "number", "integer", "boolean", "null", "value", "object", "array",
)
_SEP = 'ws "," ws'
_NOTHING = object()  # `combine` found two values that no instance can satisfy together
_COLON = 'ws ":" ws'


class _Converter:
    """Turns one schema into GBNF rules. `chain` (in `convert`) holds the $refs being expanded since
    the last object or array: meeting one of them again would be left recursion, which llama.cpp
    rejects, and which no finite JSON value could satisfy anyway."""

    def __init__(self, root: Any) -> None:
        self.root = root
        self.rules: dict[str, str] = {}
        self.by_body: dict[str, str] = {}
        self.ref_rules: dict[str, str] = {"": "root"}
        self.names: set[str] = {"root", *_PRIMITIVES}

    # --- rules ----------------------------------------------------------------------------------

    def new_name(self, hint: str) -> str:
        base = re.sub(r"[^A-Za-z0-9]+", "-", hint).strip("-") or "rule"
        name, n = base, 1
        while name in self.names:
            n += 1
            name = f"{base}-{n}"
        self.names.add(name)
        return name

    def rule(self, hint: str, body: Expr) -> Expr:
        """A named rule for `body` (the same body reuses its rule); None stays None."""
        if body is None or re.fullmatch(r'[A-Za-z0-9-]+|"[^"\\]*"|\[[^\]\\]*\]', body):
            return body  # a name, or a literal or class without escapes: no rule needed
        if body in self.by_body:
            return self.by_body[body]
        name = self.new_name(hint)
        self.rules[name] = body
        self.by_body[body] = name
        return name

    def prim(self, name: str) -> str:
        """A shared rule for a basic JSON piece, defined the first time it is used."""
        if name in self.rules:
            return name
        self.rules[name] = "(pending)"  # reserve first: `value` and `object` refer to each other
        self.rules[name] = getattr(self, "_prim_" + name.replace("-", "_"))()
        return name

    def _prim_ws(self) -> str:
        return _opt(_alt(_lit(" "), _seq(_lit("\n"), _rep("[ \\t]", 0, 20)))) or ""

    def _prim_char(self) -> str:
        escaped = _alt(
            _class(_chars('"\\/bfnrt')),
            _seq('"u"', _hex4(_BMP_CHARS)),
            _seq('"u"', _hex4(((0xD800, 0xDBFF),)), _lit("\\u"), _hex4(((0xDC00, 0xDFFF),))),
        )
        return _alt(_class(_RAW_OK), _seq(_lit("\\"), escaped)) or ""

    def _prim_string(self) -> str:
        return f"{_QUOTE} {self.prim('char')}* {_QUOTE}"

    def _prim_string_tail(self) -> str:
        return f"{self.prim('char')}* {_QUOTE}"

    def _prim_number(self) -> str:
        fraction = _opt(_seq(_lit("."), _any_digits(1, _MAX_DIGITS)))
        exponent = _opt(_seq("[eE]", "[+\\x2D]?", _any_digits(1, _MAX_EXPONENT_DIGITS)))
        return _seq(self._prim_integer(), fraction, exponent) or ""

    def _prim_integer(self) -> str:
        return _seq('"-"?', _alt(_lit("0"), _seq("[1-9]", _any_digits(0, _MAX_DIGITS - 1)))) or ""

    def _prim_boolean(self) -> str:
        return '("true" | "false")'

    def _prim_null(self) -> str:
        return '"null"'

    def _prim_value(self) -> str:
        parts = ["object", "array", "string", "number", "boolean", "null"]
        return " | ".join(self.prim(p) for p in parts)

    def _prim_object(self) -> str:
        self.prim("ws")
        return self.object_body([], self.prim("string"), self.prim("value"), "object") or ""

    def _prim_array(self) -> str:
        self.prim("ws")
        return self.array_body([], self.prim("value"), 0, None, "array") or ""

    # --- schemas --------------------------------------------------------------------------------

    def convert(self, schema: Any, path: str, hint: str, chain: frozenset[str]) -> Expr:
        """The grammar for values valid against `schema` (None when no value is)."""
        if schema is True:
            return self.prim("value")
        if schema is False:
            return None
        if not isinstance(schema, dict):
            raise SchemaError("a schema must be an object or a boolean", None, path)
        _check_keywords(schema, path)
        schema = _normalize(schema)
        rest = _assertions(schema)
        if "$ref" in rest:
            ref = rest.pop("$ref")
            if rest:  # siblings of $ref apply too (draft 2019-09 and later)
                return self.convert({"allOf": [{"$ref": ref}, rest]}, path, hint, chain)
            return self.ref(ref, path, chain)
        if "allOf" in rest:
            members = self.list_of_schemas(rest.pop("allOf"), "allOf", path)
            merged = self.merge([rest, *members], path)
            return self.convert(merged, path, hint, chain)
        if "anyOf" in rest and "oneOf" in rest:
            both = {"allOf": [{"anyOf": rest.pop("anyOf")}, {"oneOf": rest.pop("oneOf")}], **rest}
            return self.convert(both, path, hint, chain)
        for key in ("anyOf", "oneOf"):  # oneOf is read as anyOf: see the module docstring
            if key in rest:
                branches = self.list_of_schemas(rest.pop(key), key, path)
                if rest:
                    branches = [self.merge([rest, b], path) for b in branches]
                return _alt(*(
                    self.convert(b, f"{path}/{key}/{i}", hint, chain) for i, b in enumerate(branches)
                ))
        if "enum" in rest or "const" in rest:
            return self.enum(rest, path)
        if not rest:
            return self.prim("value")
        return _alt(*(self.typed(t, rest, path, hint) for t in self.types(rest, path)))

    def list_of_schemas(self, value: Any, keyword: str, path: str) -> list[Any]:
        if not isinstance(value, list) or not value:
            raise SchemaError("must be a non-empty list of schemas", keyword, path)
        return value

    def types(self, schema: dict[str, Any], path: str) -> list[str]:
        """The JSON types this schema allows; without `type`, the ones its keywords talk about."""
        declared = schema.get("type")
        if declared is None:
            implied = [t for t, words in _TYPE_KEYWORDS.items() if words & schema.keys()]
            types = implied or ["object", "array", "string", "number", "boolean", "null"]
        else:
            types = declared if isinstance(declared, list) else [declared]
            for t in types:
                if t not in _TYPES:
                    raise SchemaError(f"unknown type {t!r}", "type", path)
        if "number" in types and "integer" in types:
            types = [t for t in types if t != "integer"]
        return list(dict.fromkeys(types))

    def typed(self, kind: str, schema: dict[str, Any], path: str, hint: str) -> Expr:
        if kind == "object":
            return self.object(schema, path, hint)
        if kind == "array":
            return self.array(schema, path, hint)
        if kind == "string":
            return self.string(schema, path, hint)
        if kind in ("number", "integer"):
            return self.number(schema, path, kind == "integer")
        return self.prim(kind)

    # --- $ref -----------------------------------------------------------------------------------

    def resolve(self, ref: Any, path: str) -> tuple[str, Any]:
        """The JSON pointer of a local $ref and the schema it points at."""
        if not isinstance(ref, str) or not ref.startswith("#"):
            raise SchemaError(f"only local references ('#/...') are supported, not {ref!r}", "$ref", path)
        pointer = ref[1:]
        node = self.root
        if pointer:
            if not pointer.startswith("/"):
                raise SchemaError(f"unsupported reference {ref!r}", "$ref", path)
            for part in pointer[1:].split("/"):
                part = re.sub(r"%([0-9A-Fa-f]{2})", lambda m: chr(int(m.group(1), 16)), part)
                part = part.replace("~1", "/").replace("~0", "~")
                if isinstance(node, dict) and part in node:
                    node = node[part]
                elif isinstance(node, list) and part.isascii() and part.isdigit() and len(part) < 10 \
                        and int(part) < len(node):  # "²" is a digit to isdigit() but not to int()
                    node = node[int(part)]
                else:
                    raise SchemaError(f"reference {ref!r} points at nothing", "$ref", path)
        return pointer, node

    def ref(self, ref: Any, path: str, chain: frozenset[str]) -> str:
        pointer, target = self.resolve(ref, path)
        if pointer in chain:
            raise SchemaError(f"{ref!r} refers to itself without an object or array in between", "$ref", path)
        if pointer in self.ref_rules:
            return self.ref_rules[pointer]
        name = self.new_name(pointer.rsplit("/", 1)[-1] or "schema")
        self.ref_rules[pointer] = name
        body = self.convert(target, pointer, name, chain | {pointer})
        if body is None:
            raise SchemaError(f"{ref!r} accepts no value", "$ref", path)
        self.rules[name] = body
        return name

    # --- allOf ----------------------------------------------------------------------------------

    def merge(self, schemas: list[Any], path: str, seen: frozenset[str] = frozenset()) -> Any:
        """One schema equivalent to all of `schemas` (or a sound narrowing of it); anyOf/oneOf inside
        them are distributed, so the result may be {"anyOf": [...]}. Raises for what cannot merge."""
        flat: list[dict[str, Any]] = []
        for s in schemas:
            for member in self.flatten(s, path, seen):
                if member is False:
                    return False
                if member is not True:
                    flat.append(member)
        for i, member in enumerate(flat):
            for key in ("anyOf", "oneOf"):
                if key in member:
                    others = flat[:i] + flat[i + 1 :]
                    rest = {k: v for k, v in member.items() if k != key}
                    branches = self.list_of_schemas(member[key], key, path)
                    return {"anyOf": [self.merge([*others, rest, b], path, seen) for b in branches]}
        merged: dict[str, Any] = {}
        for member in flat:
            for key, value in member.items():
                merged[key] = self.combine(key, merged[key], value, path) if key in merged else value
                if merged[key] is _NOTHING:
                    return False
        if any(k in m for m in flat for k in ("properties", "additionalProperties")):
            self.merge_properties(flat, merged, path)
        return merged

    def flatten(self, schema: Any, path: str, seen: frozenset[str]) -> list[Any]:
        """`schema` as a list of plain members: $refs inlined, nested allOf spread, nullable rewritten."""
        if isinstance(schema, bool):
            return [schema]
        if not isinstance(schema, dict):
            raise SchemaError("a schema must be an object or a boolean", "allOf", path)
        _check_keywords(schema, path)
        schema = _assertions(_normalize(schema))
        out: list[Any] = []
        if "$ref" in schema:
            pointer, target = self.resolve(schema.pop("$ref"), path)
            if pointer in seen:
                raise SchemaError("recursive reference inside allOf", "allOf", path)
            out += self.flatten(target, path, seen | {pointer})
        if "allOf" in schema:
            for member in self.list_of_schemas(schema.pop("allOf"), "allOf", path):
                out += self.flatten(member, path, seen)
        return [schema, *out] if schema else out

    def combine(self, key: str, a: Any, b: Any, path: str) -> Any:
        """Two values of the same keyword, both of which must hold."""
        if key == "type":  # every integer is a number, so number & integer = integer
            def widen(t: Any) -> set[str]:
                types = set(t if isinstance(t, list) else [t])
                return types | {"integer"} if "number" in types else types

            both = widen(a) & widen(b)
            return [t for t in _TYPES if t in both]
        if key == "required":
            return list(dict.fromkeys([*a, *b]))
        if key == "properties":
            out = dict(a)
            for name, sub in b.items():
                out[name] = {"allOf": [out[name], sub]} if name in out else sub
            return out
        if key in ("items", "additionalProperties") and isinstance(a, (dict, bool)) and isinstance(b, (dict, bool)):
            if a is False or b is False:
                return False
            return b if a is True else a if b is True else {"allOf": [a, b]}
        if key == "enum":
            right = {_canonical(v) for v in b}
            return [v for v in a if _canonical(v) in right]
        if key == "const":
            return a if _canonical(a) == _canonical(b) else _NOTHING
        if key in _LOWER_BOUNDS:
            return max(a, b)
        if key in _UPPER_BOUNDS:
            return min(a, b)
        if _canonical(a) == _canonical(b):
            return a
        raise SchemaError("allOf members give it different values that cannot be merged", key, path)

    def merge_properties(self, members: list[dict[str, Any]], merged: dict[str, Any], path: str) -> None:
        """Object keywords across allOf members: a property listed by one member must also satisfy
        each other member's additionalProperties schema; one that forbids extras must list it."""
        names = list(merged.get("properties", {}))
        props = dict(merged.get("properties", {}))
        for member in members:
            extra = member.get("additionalProperties")
            own = member.get("properties", {})
            for name in names:
                if name in own or extra is None or extra is True:
                    continue
                if extra is False:
                    raise SchemaError(
                        f"one allOf member forbids property {name!r} that another defines",
                        "additionalProperties", path,
                    )
                props[name] = {"allOf": [props[name], extra]}
        if props:
            merged["properties"] = props

    # --- enum / const ---------------------------------------------------------------------------

    def enum(self, schema: dict[str, Any], path: str) -> Expr:
        for key in schema:
            if key not in ("enum", "const", "type"):
                raise SchemaError("cannot be combined with enum/const", key, path)
        if "enum" in schema:
            if not isinstance(schema["enum"], list):
                raise SchemaError("must be a list", "enum", path)
            values = list(schema["enum"])
        else:
            values = [schema["const"]]
        if "const" in schema:
            values = [v for v in values if _canonical(v) == _canonical(schema["const"])]
        if "type" in schema:
            allowed = set(self.types(schema, path))
            values = [v for v in values if _json_type_of(v) & allowed]
        return _alt(*(self.literal(v) for v in values))

    def literal(self, value: Any) -> str:
        """Exactly `value`, written compactly except for the usual optional whitespace."""
        if isinstance(value, dict):
            self.prim("ws")
            members = [
                f"{_lit(json.dumps(k, ensure_ascii=False))} {_COLON} {self.literal(v)}" for k, v in value.items()
            ]
            return _seq('"{"', "ws", f" {_SEP} ".join(members), "ws", '"}"') or ""
        if isinstance(value, list):
            self.prim("ws")
            return _seq('"["', "ws", f" {_SEP} ".join(self.literal(v) for v in value), "ws", '"]"') or ""
        return _lit(json.dumps(value, ensure_ascii=False, allow_nan=False))

    # --- objects --------------------------------------------------------------------------------

    def object(self, schema: dict[str, Any], path: str, hint: str) -> Expr:
        self.prim("ws")
        for key in ("patternProperties", "propertyNames", "dependentRequired", "dependentSchemas", "dependencies"):
            if schema.get(key) not in (None, {}, True):
                raise SchemaError("cannot be enforced by a grammar", key, path)
        if schema.get("unevaluatedProperties", True) is not True:
            raise SchemaError("cannot be enforced by a grammar", "unevaluatedProperties", path)
        properties = schema.get("properties", {})
        required = schema.get("required", [])
        if not isinstance(properties, dict):
            raise SchemaError("must be an object", "properties", path)
        if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
            raise SchemaError("must be a list of strings", "required", path)
        extra_value = self.extra_value(schema, path, hint)
        members: list[tuple[str, Expr, bool]] = []
        for name, sub in properties.items():
            value = self.convert(sub, f"{path}/properties/{_pointer_escape(name)}", name, frozenset())
            members.append((name, value, name in required))
        for name in required:
            if name not in properties:
                if extra_value is None:
                    raise SchemaError(f"required property {name!r} is not allowed by the schema", "required", path)
                members.append((name, extra_value, True))
        self.check_property_counts(schema, members, extra_value is not None, path)
        kvs = []
        for name, value, needed in members:
            if value is None:
                if needed:
                    return None
                continue
            kvs.append((_seq(_lit(json.dumps(name, ensure_ascii=False)), _COLON, value) or "", needed))
        extra_key = self.key_excluding([n for n, _, _ in members]) if extra_value is not None else None
        return self.rule(hint, self.object_body(kvs, extra_key, extra_value, hint))

    def extra_value(self, schema: dict[str, Any], path: str, hint: str) -> Expr:
        """The grammar for values of keys not in `properties`, or None when there may be none.
        additionalProperties absent means false if `properties` is there (see the module docstring)."""
        extra = schema.get("additionalProperties", None if "properties" in schema else True)
        if extra is None or extra is False:
            return None
        return self.convert(extra, f"{path}/additionalProperties", f"{hint}-extra", frozenset())

    def check_property_counts(self, schema: dict[str, Any], members: list, open_ended: bool, path: str) -> None:
        """minProperties/maxProperties only pass when the object's shape already guarantees them."""
        low = self.count(schema, "minProperties", path) or 0
        high = self.count(schema, "maxProperties", path)
        if low > sum(1 for _, v, needed in members if needed):
            raise SchemaError("cannot be enforced beyond what 'required' guarantees", "minProperties", path)
        if high is not None and (open_ended or high < len(members)):
            raise SchemaError("cannot be enforced beyond the listed properties", "maxProperties", path)

    def object_body(self, members: list[tuple[str, bool]], extra_key: Expr, extra_value: Expr, hint: str) -> Expr:
        """{ members in order (optional ones may be skipped), then any extra key/value pairs }.

        Built from the end: `tail` is what may follow once a member was written (each item starts
        with a comma), `first` is what may follow "{" (the first item has no comma)."""
        extra = _seq(extra_key, _COLON, extra_value) if extra_key is not None and extra_value is not None else None
        tail: Expr = _rep(_seq(_SEP, extra), 0, None) if extra else ""
        first: Expr = _opt(_seq(extra, tail)) if extra else ""
        for i in range(len(members) - 1, -1, -1):
            kv, needed = members[i]
            if not needed:
                tail = self.rule(f"{hint}-tail", tail) if tail and not _is_atom(tail) else tail
            with_this = _seq(kv, tail)
            first = with_this if needed else _alt(with_this, first)
            tail = _seq(_SEP, kv, tail) if needed else _alt(_seq(_SEP, kv, tail), tail)
        return _seq('"{"', "ws", first, "ws", '"}"')

    def key_excluding(self, names: list[str]) -> str:
        """A JSON string that decodes to none of `names` (a character trie, where each step matches a
        character in any of its spellings, raw or escaped, and leaving the trie frees the rest)."""
        if not names:
            return self.prim("string")
        trie: dict[str, Any] = {}
        for name in names:
            node = trie
            for ch in name:
                node = node.setdefault(ch, {})
            node[""] = True
        return _seq(_QUOTE, self.trie_node(trie)) or ""

    def trie_node(self, node: dict[str, Any]) -> str:
        kids = sorted(k for k in node if k)
        options: list[Expr] = [] if "" in node else [_QUOTE]
        options.append(_seq(self.other_char(kids), self.prim("string-tail")))
        for ch in kids:
            options.append(_seq(self.spellings(ch), self.trie_node(node[ch])))
        return self.rule("key", _alt(*options)) or ""

    def spellings(self, ch: str) -> Expr:
        code = ord(ch)
        raw = _lit(ch) if _contains(_RAW_OK, code) else None
        short = _lit("\\" + _SHORT_ESCAPES[code]) if code in _SHORT_ESCAPES else None
        unicode = _seq(_lit("\\u"), _hex4(((code, code),))) if code < 0x10000 else None
        return _alt(raw, short, unicode)

    def other_char(self, kids: list[str]) -> Expr:
        """One string character, in any spelling, that is none of `kids`. Surrogate-pair escapes are
        left out when they could spell a kid (sound, and such keys are vanishingly rare)."""
        taken = _chars("".join(kids))
        highs = _norm(((0xD800 + ((ord(k) - 0x10000) >> 10),) * 2 for k in kids if ord(k) >= 0x10000))
        shorts = "".join(v for c, v in _SHORT_ESCAPES.items() if not _contains(taken, c))
        escaped = _alt(
            _class(_chars(shorts)) if shorts else None,
            _seq('"u"', _hex4(_minus(_BMP_CHARS, taken))),
            _seq('"u"', _hex4(_minus(((0xD800, 0xDBFF),), highs)), _lit("\\u"), _hex4(((0xDC00, 0xDFFF),))),
        )
        return _alt(_class(_minus(_RAW_OK, taken)), _seq(_lit("\\"), escaped))

    # --- arrays ---------------------------------------------------------------------------------

    def array(self, schema: dict[str, Any], path: str, hint: str) -> Expr:
        self.prim("ws")
        if "contains" in schema:
            raise SchemaError("cannot be enforced by a grammar", "contains", path)
        if schema.get("unevaluatedItems", True) is not True:
            raise SchemaError("cannot be enforced by a grammar", "unevaluatedItems", path)
        low = self.count(schema, "minItems", path) or 0
        high = self.count(schema, "maxItems", path)
        if schema.get("uniqueItems") is True and (high is None or high > 1):
            raise SchemaError("cannot be enforced by a grammar", "uniqueItems", path)
        prefix = schema.get("prefixItems", [])
        if not isinstance(prefix, list):
            raise SchemaError("must be a list of schemas", "prefixItems", path)
        firsts = [self.element(s, f"{path}/prefixItems/{i}", f"{hint}-{i}") for i, s in enumerate(prefix)]
        item = self.element(schema.get("items", True), f"{path}/items", f"{hint}-item")
        return self.rule(hint, self.array_body(firsts, item, low, high, hint))

    def count(self, schema: dict[str, Any], key: str, path: str) -> int | None:
        value = schema.get(key)
        if value is None:
            return None
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise SchemaError("must be a non-negative integer", key, path)
        if value > _MAX_REPEAT:
            raise SchemaError(f"counts above {_MAX_REPEAT} are not supported", key, path)
        return value

    def element(self, schema: Any, path: str, hint: str) -> Expr:
        """An array element's grammar; a long one becomes a rule, since x{m,n} repeats it m times."""
        expr = self.convert(schema, path, hint, frozenset())
        return self.rule(hint, expr) if expr and len(expr) > 24 else expr

    def array_body(self, firsts: list[Expr], item: Expr, low: int, high: int | None, hint: str) -> Expr:
        """[ the positional items, then more items, with low..high items in all ]."""
        def after(count: int) -> Expr:  # what may follow once `count` >= 1 items were written
            if high is not None and count >= high:
                return ""
            if count < len(firsts):
                more = _seq(_SEP, firsts[count], after(count + 1))
                return more if count < low else _opt(more)
            return _rep(_seq(_SEP, item), max(low - count, 0), None if high is None else high - count)

        first_item = firsts[0] if firsts else item
        body = _seq(first_item, after(1)) if high != 0 else None
        if low == 0:
            body = _opt(body)
        return _seq('"["', "ws", body, "ws", '"]"')

    # --- strings --------------------------------------------------------------------------------

    def string(self, schema: dict[str, Any], path: str, hint: str) -> Expr:
        low = self.count(schema, "minLength", path) or 0
        high = self.count(schema, "maxLength", path)
        pattern, fmt = schema.get("pattern"), schema.get("format")
        if pattern is not None and fmt is not None:
            raise SchemaError("cannot be combined with format", "pattern", path)
        if fmt is not None:
            content = self.format(fmt, low, high, path)
        elif pattern is not None:
            content = self.pattern(pattern, low, high, path)
        else:
            content = _rep(self.prim("char"), low, high)
        return _seq(_QUOTE, content, _QUOTE)

    def format(self, fmt: Any, low: int, high: int | None, path: str) -> Expr:
        if fmt not in _FORMATS:
            raise SchemaError(f"unsupported format {fmt!r}", "format", path)
        build, shortest, longest = _FORMATS[fmt]
        if _within(shortest, longest, low, high):
            return self.rule(fmt, build())
        if fmt == "uri" and high is not None and low <= shortest:
            content = _uri_grammar(budget=high)
            if content is None:
                raise SchemaError("too small for a practical uri", "maxLength", path)
            return self.rule("uri", content)
        keyword = "minLength" if low > shortest else "maxLength"
        raise SchemaError(f"cannot be enforced together with format {fmt!r}", keyword, path)

    def pattern(self, pattern: Any, low: int, high: int | None, path: str) -> Expr:
        """The string content matching `pattern` (a search, so unanchored ends take any characters).
        Length bounds only combine with branches that already fit them or that `_fit_lengths` can
        narrow; anything else raises rather than ignoring the bounds."""
        if not isinstance(pattern, str):
            raise SchemaError("must be a string", "pattern", path)
        anything = f"{self.prim('char')}*"
        options: list[Expr] = []
        for node, at_start, at_end in _RegexParser(pattern, path).branches():
            shortest, longest = _lengths(node)
            if not _within(shortest, longest if at_start and at_end else None, low, high):
                fitted = _fit_lengths(node, low, high) if at_start and at_end else None
                if fitted is None:
                    keyword = "maxLength" if high is not None else "minLength"
                    raise SchemaError("cannot be enforced together with this pattern", keyword, path)
                node = fitted
            body = _RegexWriter().write(node)
            options.append(_seq("" if at_start else anything, body, "" if at_end else anything))
        return self.rule("pattern", _alt(*options))

    # --- numbers --------------------------------------------------------------------------------

    def number(self, schema: dict[str, Any], path: str, integer: bool) -> Expr:
        if "multipleOf" in schema:
            self.check_multiple_of(schema["multipleOf"], integer, path)
        low = self.bound(schema, ("minimum", "exclusiveMinimum"), max, path)
        high = self.bound(schema, ("maximum", "exclusiveMaximum"), min, path)
        if integer:
            if low is None and high is None:
                return self.prim("integer")
            int_low = None if low is None else (math.floor(low[0]) + 1 if low[1] else math.ceil(low[0]))
            int_high = None if high is None else (math.ceil(high[0]) - 1 if high[1] else math.floor(high[0]))
            if int_low is not None and int_high is not None and int_low > int_high:
                return None
            return self.rule("integer-range", _int_range(int_low, int_high))
        if low is None and high is None:
            return self.prim("number")
        return self.rule("number-range", _decimal_range(low, high))

    def check_multiple_of(self, value: Any, integer: bool, path: str) -> None:
        """Only the case that holds for every candidate (an integer and a divisor of 1) is accepted."""
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise SchemaError("must be a positive number", "multipleOf", path)
        step = Decimal(repr(value)) if isinstance(value, float) else Decimal(value)
        if not (integer and (Decimal(1) / step) == (Decimal(1) / step).to_integral_value()):
            raise SchemaError("cannot be enforced by a grammar", "multipleOf", path)

    def bound(self, schema: dict[str, Any], keys: tuple[str, str], tighter: Callable, path: str) -> _Bound:
        """The tightest bound among the inclusive and exclusive keywords: (value, exclusive)."""
        found: list[tuple[Decimal, bool]] = []
        for key, exclusive in zip(keys, (False, True)):
            if key not in schema:
                continue
            value = schema[key]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or (
                isinstance(value, float) and not math.isfinite(value)
            ):
                raise SchemaError("must be a finite number", key, path)
            found.append((Decimal(repr(value)) if isinstance(value, float) else Decimal(value), exclusive))
        if not found:
            return None
        best = tighter(v for v, _ in found)
        return best, any(ex for v, ex in found if v == best)


def schemas_to_rules(schemas: dict[str, Any], reserved: Iterable[str] = ()) -> dict[str, str]:
    """GBNF rules, one named after each key of `schemas` accepting the JSON documents valid against it,
    plus the rules they share. Names in `reserved` are left for the caller's own rules.

    Raises SchemaError, naming the keyword, for anything the grammar cannot enforce."""
    converter = _Converter(None)
    converter.names.update(schemas, reserved)
    roots: dict[str, str] = {}
    for name, schema in schemas.items():
        converter.root = schema
        converter.ref_rules = {"": name}  # each schema's local $refs resolve within it
        body = converter.convert(schema, "", name, frozenset({""}))
        if body is None:
            raise SchemaError("the schema accepts no value at all", None, "")
        roots[name] = body
    return {**roots, **converter.rules}


def schema_to_grammar(schema: dict[str, Any]) -> str:
    """GBNF (rule `root`) accepting only JSON documents that validate against `schema`."""
    return rules_text(schemas_to_rules({"root": schema}))


def rules_text(rules: dict[str, str]) -> str:
    return "".join(f"{name} ::= {rule}\n" for name, rule in rules.items())


def literal(text: str) -> str:
    """A GBNF literal matching exactly `text`."""
    return _lit(text)


# response_format {"type": "json_object"}: any JSON object.
JSON_OBJECT_GRAMMAR: str = schema_to_grammar({"type": "object"})
