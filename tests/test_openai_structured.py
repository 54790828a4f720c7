"""Structured outputs: response_format json_object and json_schema, enforced by a grammar while sampling."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import openai
import pytest
from pydantic import BaseModel

from conftest import MODEL


class FriendInfo(BaseModel):
    name: str
    age: int
    is_available: bool


class FriendList(BaseModel):
    friends: list[FriendInfo]


FRIENDS = ("I have two friends. The first is Ollama 22 years old busy saving the world, and the second is Alonso "
           "23 years old and wants to hang out. Return a list of friends in JSON format")

SCHEMAS: dict[str, dict] = {
    "flat": {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                              "age": {"type": "integer"}}, "required": ["name", "age"],
             "additionalProperties": False},
    "nested": {"type": "object", "properties": {"person": {"type": "object", "properties": {
        "first": {"type": "string", "maxLength": 12}, "last": {"type": "string", "maxLength": 12}},
        "required": ["first", "last"]}}, "required": ["person"]},
    "refs": {"$defs": {"Point": {"type": "object", "properties": {"x": {"type": "integer"}, "y": {"type": "integer"}},
                                 "required": ["x", "y"]}},
             "type": "object", "properties": {"a": {"$ref": "#/$defs/Point"}, "b": {"$ref": "#/$defs/Point"}},
             "required": ["a", "b"]},
    "enum": {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}}, "required": ["color"]},
    "const": {"type": "object", "properties": {"kind": {"const": "dragon"}, "n": {"type": "integer"}},
              "required": ["kind", "n"]},
    "array_bounds": {"type": "object", "properties": {"tags": {"type": "array", "items": {"type": "string",
                     "maxLength": 8}, "minItems": 2, "maxItems": 3}}, "required": ["tags"]},
    "int_bounds": {"type": "object", "properties": {"age": {"type": "integer", "minimum": 18, "maximum": 99}},
                   "required": ["age"]},
    "negative_bounds": {"type": "object", "properties": {"t": {"type": "integer", "minimum": -40, "maximum": -5}},
                        "required": ["t"]},
    "exclusive_bounds": {"type": "object", "properties": {"p": {"type": "integer", "exclusiveMinimum": 0,
                                                                "exclusiveMaximum": 10}}, "required": ["p"]},
    "number_bounds": {"type": "object", "properties": {"score": {"type": "number", "minimum": 0, "maximum": 1}},
                      "required": ["score"]},
    "anyof": {"type": "object", "properties": {"v": {"anyOf": [{"type": "integer"}, {"type": "string",
                                                                                   "maxLength": 10}]}},
              "required": ["v"]},
    "oneof": {"type": "object", "properties": {"v": {"oneOf": [{"type": "boolean"}, {"type": "null"}]}},
              "required": ["v"]},
    "nullable": {"type": "object", "properties": {"nick": {"type": ["string", "null"], "maxLength": 10}},
                 "required": ["nick"]},
    "optional": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "boolean"}},
                 "required": ["a"], "additionalProperties": False},
    "pattern": {"type": "object", "properties": {"code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2}$"}},
                "required": ["code"]},
    "date": {"type": "object", "properties": {"when": {"type": "string", "format": "date"}}, "required": ["when"]},
    "uuid": {"type": "object", "properties": {"id": {"type": "string", "format": "uuid"}}, "required": ["id"]},
    "time": {"type": "object", "properties": {"at": {"type": "string", "format": "time"}}, "required": ["at"]},
    "array_of_objects": {"type": "object", "properties": {"items": {"type": "array", "maxItems": 2, "items": {
        "type": "object", "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 9},
                                         "ok": {"type": "boolean"}}, "required": ["id", "ok"]}}},
                         "required": ["items"]},
    "top_level_array": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 100},
                        "minItems": 1, "maxItems": 4},
    "recursive": {"$defs": {"Node": {"type": "object", "properties": {
        "v": {"type": "integer", "minimum": 0, "maximum": 9},
        "kids": {"type": "array", "maxItems": 1, "items": {"$ref": "#/$defs/Node"}}}, "required": ["v", "kids"]}},
        "$ref": "#/$defs/Node"},
    "pydantic_friends": FriendList.model_json_schema(),
}
PROMPT = [{"role": "user", "content": "Describe a fantasy character as JSON."}]


def run_schema(client, schema, **kw):
    """As OpenAI's and Ollama's guides advise, the prompt shows the schema too; the grammar enforces it."""
    fmt = {"type": "json_schema", "json_schema": {"name": "out", "schema": schema, "strict": True}}
    kw.setdefault("max_tokens", 400)
    messages = [{"role": "user", "content": f"Reply with a short JSON document for this schema: {json.dumps(schema)}"}]
    return client.chat.completions.create(model=MODEL, messages=messages, response_format=fmt, **kw)


def test_friendlist_example_parses(client):
    completion = client.beta.chat.completions.parse(
        temperature=0, model=MODEL, messages=[{"role": "user", "content": FRIENDS}], response_format=FriendList)
    parsed = completion.choices[0].message.parsed
    assert isinstance(parsed, FriendList)


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_output_validates_against_the_schema(client, name):
    schema = SCHEMAS[name]
    # A 135M model left to itself loops inside an unbounded string or array until max_tokens; a repeat
    # penalty lets it finish, which is what this test needs to see (the grammar holds either way).
    loose = {"extra_body": {"repeat_penalty": 1.3}}
    settings = [{"temperature": 0, **loose}] + [{"temperature": 1.0, "seed": s, **loose} for s in range(3)]
    with ThreadPoolExecutor(4) as pool:
        replies = list(pool.map(lambda kw: run_schema(client, schema, **kw), settings))
    for kw, reply in zip(settings, replies):
        choice = reply.choices[0]
        assert choice.finish_reason == "stop", (kw, choice.message.content)
        jsonschema.validate(json.loads(choice.message.content), schema)


def test_json_object_mode_always_gives_an_object(client):
    for seed in range(3):
        r = client.chat.completions.create(model=MODEL, messages=PROMPT, temperature=1.0, seed=seed, max_tokens=200,
                                           response_format={"type": "json_object"})
        if r.choices[0].finish_reason == "stop":
            assert isinstance(json.loads(r.choices[0].message.content), dict)
        else:
            assert r.choices[0].message.content.lstrip().startswith("{")


def test_streamed_json_joins_to_the_same_document(client):
    schema = SCHEMAS["flat"]
    want = run_schema(client, schema, temperature=0).choices[0].message.content
    chunks = run_schema(client, schema, temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want
    jsonschema.validate(json.loads(want), schema)


def test_cut_json_finishes_with_length(client):
    r = run_schema(client, SCHEMAS["array_of_objects"], temperature=0, max_tokens=3)
    assert r.choices[0].finish_reason == "length"


def test_completions_honour_response_format(client):
    fmt = {"type": "json_schema", "json_schema": {"name": "out", "schema": SCHEMAS["enum"]}}
    r = client.completions.create(model=MODEL, prompt="Favourite colour as JSON:", max_tokens=50, temperature=0,
                                  extra_body={"response_format": fmt})
    jsonschema.validate(json.loads(r.choices[0].text), SCHEMAS["enum"])


@pytest.mark.parametrize(
    "schema,keyword",
    [
        ({"type": "object", "properties": {"a": {"not": {"type": "string"}}}}, "not"),
        ({"type": "integer", "multipleOf": 3}, "multipleOf"),
        ({"type": "object", "patternProperties": {"^x": {"type": "string"}}}, "patternProperties"),
        ({"type": "array", "items": {"type": "integer"}, "uniqueItems": True}, "uniqueItems"),
        ({"type": "string", "format": "hostname-idn"}, "format"),
    ],
)
def test_unenforceable_keywords_are_400_naming_them(client, schema, keyword):
    with pytest.raises(openai.BadRequestError) as err:
        run_schema(client, schema)
    assert keyword in err.value.message


@pytest.mark.parametrize(
    "fmt",
    [
        {"type": "sound"},
        {"type": "json_schema"},
        {"type": "json_schema", "json_schema": {"name": "x", "schema": 123}},
        {"type": "json_schema", "json_schema": {"schema": {"type": "object"}}},
        {"type": "json_object", "json_schema": {"name": "x", "schema": {}}},
    ],
)
def test_bad_response_formats_are_400(client, fmt):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL, messages=PROMPT, response_format=fmt)
    assert "response_format" in (err.value.param or "") + err.value.message
