"""Tool-call parsing on outputs recorded from each model family, whole and split at every point."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from corral.service.tool_calls import (
    BARE_JSON,
    HERMES,
    LLAMA3,
    MISTRAL,
    CallArguments,
    CallStart,
    Content,
    ToolCallParser,
    gather,
    parse,
)

FUNCTIONS = {"get_current_weather", "get_time", "python"}

# (format, model output as the model wrote it, expected content, expected [(name, arguments object)])
RECORDED = [
    # Qwen 2.5 / Hermes 2 Pro: one call per tag, newline inside the tags.
    (HERMES, '<tool_call>\n{"name": "get_current_weather", "arguments": {"location": "Paris, France", '
             '"unit": "celsius"}}\n</tool_call>', None, [("get_current_weather", {"location": "Paris, France",
                                                                                   "unit": "celsius"})]),
    (HERMES, '<tool_call>\n{"name": "get_current_weather", "arguments": {"location": "Paris"}}\n</tool_call>\n'
             '<tool_call>\n{"name": "get_time", "arguments": {"timezone": "Europe/Paris"}}\n</tool_call>', None,
     [("get_current_weather", {"location": "Paris"}), ("get_time", {"timezone": "Europe/Paris"})]),
    (HERMES, "I'll look that up.\n<tool_call>\n{\"name\": \"python\", \"arguments\": {\"code\": "
             "\"print(\\\"Hello, World!\\\")\"}}\n</tool_call>", "I'll look that up.\n",
     [("python", {"code": 'print("Hello, World!")'})]),
    (HERMES, "The weather in Paris is 18 degrees and sunny.", "The weather in Paris is 18 degrees and sunny.", []),
    # Keys in the other order, and nested braces inside strings.
    (HERMES, '<tool_call>{"arguments": {"code": "d = {\\"a\\": [1, 2]}"}, "name": "python"}</tool_call>', None,
     [("python", {"code": 'd = {"a": [1, 2]}'})]),
    # Mistral / Mistral Nemo.
    (MISTRAL, '[TOOL_CALLS][{"name": "get_current_weather", "arguments": {"location": "Paris", "unit": '
              '"celsius"}}]', None, [("get_current_weather", {"location": "Paris", "unit": "celsius"})]),
    (MISTRAL, '[TOOL_CALLS] [{"name": "get_time", "arguments": {"timezone": "UTC"}}, {"name": "python", '
              '"arguments": {"code": "1+1"}}]', None,
     [("get_time", {"timezone": "UTC"}), ("python", {"code": "1+1"})]),
    # Llama 3.1 / 3.2 / 3.3: a bare object with "parameters", optionally after <|python_tag|>.
    (LLAMA3, '{"name": "get_current_weather", "parameters": {"location": "Paris, France"}}', None,
     [("get_current_weather", {"location": "Paris, France"})]),
    (LLAMA3, '<|python_tag|>{"name": "python", "parameters": {"code": "print(1)"}}', None,
     [("python", {"code": "print(1)"})]),
    (LLAMA3, '{"name": "get_time", "parameters": {"timezone": "UTC"}}; {"name": "python", "parameters": '
             '{"code": "2"}}', None, [("get_time", {"timezone": "UTC"}), ("python", {"code": "2"})]),
    (LLAMA3, "It is sunny in Paris today.", "It is sunny in Paris today.", []),
    # Generic JSON: an object, or an array of them; arguments sometimes as an encoded string.
    (BARE_JSON, '{"name": "get_time", "arguments": {"timezone": "UTC"}}', None, [("get_time", {"timezone": "UTC"})]),
    (BARE_JSON, '\n[{"name": "get_time", "arguments": {}}, {"name": "python", "arguments": "{\\"code\\": \\"x\\"}"}]',
     None, [("get_time", {}), ("python", {"code": "x"})]),
    (BARE_JSON, '{"name": "get_time"}', None, [("get_time", {})]),
]


def expected_pieces(fmt, text):
    parser = ToolCallParser(fmt, FUNCTIONS)
    return gather(parser.feed(text) + parser.finish())


@pytest.mark.parametrize("fmt,text,content,calls", RECORDED)
def test_recorded_outputs_parse(fmt, text, content, calls):
    parsed = parse(text, fmt, FUNCTIONS)
    got = [(c.name, json.loads(c.arguments)) for c in parsed.calls]
    assert got == calls
    if content is None:
        assert parsed.content.strip() == ""
    else:
        assert parsed.content == content
    for marker in ("<tool_call>", "</tool_call>", "[TOOL_CALLS]", "<|python_tag|>"):
        assert marker not in parsed.content
    assert len({c.id for c in parsed.calls}) == len(parsed.calls)
    assert all(c.id.startswith("call_") for c in parsed.calls)


@pytest.mark.parametrize("fmt,text,content,calls", RECORDED)
def test_every_split_gives_the_same_message(fmt, text, content, calls):
    whole = expected_pieces(fmt, text)
    for cut in range(1, len(text)):
        parser = ToolCallParser(fmt, FUNCTIONS)
        parsed = gather(parser.feed(text[:cut]) + parser.feed(text[cut:]) + parser.finish())
        assert parsed.content == whole.content
        assert [(c.name, c.arguments) for c in parsed.calls] == [(c.name, c.arguments) for c in whole.calls]


@settings(max_examples=200, deadline=None)
@given(case=st.sampled_from(RECORDED), sizes=st.lists(st.integers(1, 7), min_size=1, max_size=200))
def test_streamed_character_runs_add_up(case, sizes):
    fmt, text, _, _ = case
    whole = expected_pieces(fmt, text)
    parser = ToolCallParser(fmt, FUNCTIONS)
    pieces, at, k = [], 0, 0
    while at < len(text):
        n = sizes[k % len(sizes)]
        pieces += parser.feed(text[at:at + n])
        at, k = at + n, k + 1
    pieces += parser.finish()
    parsed = gather(pieces)
    assert parsed.content == whole.content
    assert [(c.name, c.arguments) for c in parsed.calls] == [(c.name, c.arguments) for c in whole.calls]


def test_a_call_is_announced_before_its_arguments_and_only_once():
    parser = ToolCallParser(HERMES, FUNCTIONS)
    text = '<tool_call>{"name": "get_time", "arguments": {"timezone": "UTC"}}</tool_call>'
    pieces = [p for ch in text for p in parser.feed(ch)] + parser.finish()
    starts = [p for p in pieces if isinstance(p, CallStart)]
    assert len(starts) == 1 and starts[0].name == "get_time"
    first_args = next(i for i, p in enumerate(pieces) if isinstance(p, CallArguments))
    assert pieces.index(starts[0]) < first_args
    assert "".join(p.text for p in pieces if isinstance(p, CallArguments)) == '{"timezone": "UTC"}'
    assert not any(isinstance(p, Content) for p in pieces)


def test_arguments_stream_before_the_call_ends():
    parser = ToolCallParser(HERMES, FUNCTIONS)
    pieces = parser.feed('<tool_call>{"name": "python", "arguments": {"code": "print(')
    assert [type(p) for p in pieces] == [CallStart, CallArguments]
    assert pieces[1].text == '{"code": "print('


def test_a_partial_marker_is_held_back_and_released_when_it_is_not_one():
    parser = ToolCallParser(HERMES, FUNCTIONS)
    assert gather(parser.feed("a < b and <tool")).content == "a < b and "
    assert gather(parser.feed("s are great") + parser.finish()).content == "<tools are great"


def test_unknown_function_and_non_json_regions_stay_text():
    text = '<tool_call>{"name": "rm_rf", "arguments": {}}</tool_call>'
    parsed = parse(text, HERMES, FUNCTIONS)
    assert parsed.calls == [] and parsed.content == text
    assert parse("[1, 2, 3]", BARE_JSON, FUNCTIONS).content == "[1, 2, 3]"
    assert parse("{not json", BARE_JSON, FUNCTIONS).content == "{not json"


def test_a_call_cut_short_keeps_what_was_written():
    parsed = parse('<tool_call>{"name": "python", "arguments": {"code": "pri', HERMES, FUNCTIONS)
    assert [(c.name, c.arguments) for c in parsed.calls] == [("python", '{"code": "pri')]


def test_text_after_a_call_is_content_and_blanks_between_calls_are_not():
    text = '<tool_call>{"name": "get_time", "arguments": {}}</tool_call>\n\n<tool_call>{"name": "python", ' \
           '"arguments": {"code": "1"}}</tool_call>\nDone.'
    parsed = parse(text, HERMES, FUNCTIONS)
    assert len(parsed.calls) == 2 and parsed.content == "\nDone."


def test_a_call_cut_before_its_name_is_dropped_not_shown():
    text = '<tool_call>{"name": "get_time", "arguments": {}}</tool_call>\n\n<tool_call>{"name":'
    parsed = parse(text, HERMES, FUNCTIONS)
    assert [c.name for c in parsed.calls] == ["get_time"] and parsed.content == ""
    assert parse("Let me see. <tool_call>{", HERMES, FUNCTIONS).content == "Let me see. "
