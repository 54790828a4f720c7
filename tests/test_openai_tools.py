"""Tool calling end to end with the official client: the tool loop, every tool_choice mode, streamed
tool-call deltas, argument validity over many seeds, a template that takes tools, and bad input."""

from __future__ import annotations

import json

import jsonschema
import pytest
from conftest import MODEL
from test_service_tools import HERMES_TEMPLATE

WEATHER_PARAMETERS = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 30}, "unit": {"enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"],
}
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Get the current weather in a city",
                                            "parameters": WEATHER_PARAMETERS}}
TIME_PARAMETERS = {"type": "object", "properties": {"timezone": {"type": "string", "pattern": "^[A-Z][a-z]+/[A-Z][a-z]+$"}},
                   "required": ["timezone"]}
TIME = {"type": "function", "function": {"name": "get_time", "description": "Get the time in a timezone",
                                         "parameters": TIME_PARAMETERS}}
SCHEMAS = {"get_weather": WEATHER_PARAMETERS, "get_time": TIME_PARAMETERS}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
MARKUP = ("<tool_call>", "</tool_call>")


def weather(city: str, unit: str) -> str:
    return json.dumps({"city": city, "temperature": 18 if unit == "celsius" else 64, "unit": unit})


def check_calls(message, allowed=("get_weather", "get_time")):
    assert message.tool_calls
    for call in message.tool_calls:
        assert call.type == "function" and call.id.startswith("call_")
        assert call.function.name in allowed
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])
    assert len({c.id for c in message.tool_calls}) == len(message.tool_calls)


def stream_message(client, **kw):
    """Runs a streamed request; returns (content, calls by index, finish_reason), checking delta framing."""
    content, calls, finish = "", {}, None
    for chunk in client.chat.completions.create(stream=True, **kw):
        for choice in chunk.choices:
            delta = choice.delta
            content += delta.content or ""
            for tc in delta.tool_calls or []:
                if tc.index not in calls:  # the first delta of a call names it
                    assert tc.id and tc.id.startswith("call_") and tc.type == "function" and tc.function.name
                    calls[tc.index] = {"id": tc.id, "name": tc.function.name, "arguments": ""}
                else:  # later deltas only add arguments
                    assert tc.id is None and tc.function.name is None
                calls[tc.index]["arguments"] += tc.function.arguments or ""
            finish = choice.finish_reason or finish
    return content, calls, finish


def test_the_tool_loop(client):
    messages = list(ASK)
    first = client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER], tool_choice="required",
                                           parallel_tool_calls=False, seed=1)
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    check_calls(choice.message, allowed=("get_weather",))
    assert len(choice.message.tool_calls) == 1
    messages.append(choice.message)  # the client's own object goes back as history
    for call in choice.message.tool_calls:
        result = weather(**json.loads(call.function.arguments))
        messages.append({"role": "tool", "tool_call_id": call.id, "content": result})
    answer = client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER], tool_choice="none",
                                            seed=1, max_tokens=40)
    assert answer.choices[0].message.content and answer.choices[0].message.tool_calls is None
    again = client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER], seed=1, max_tokens=40)
    message = again.choices[0].message
    assert message.content or message.tool_calls


def test_the_tool_loop_streamed_matches_the_plain_one(client):
    kw = {"model": MODEL, "messages": ASK, "tools": [WEATHER, TIME], "tool_choice": "required", "parallel_tool_calls": False,
              "seed": 7, "temperature": 1.0}
    plain = client.chat.completions.create(**kw)
    content, calls, finish = stream_message(client, **kw)
    assert finish == "tool_calls" and content == ""
    assert [(c["name"], c["arguments"]) for c in calls.values()] == \
        [(c.function.name, c.function.arguments) for c in plain.choices[0].message.tool_calls]
    messages = [*ASK, {"role": "assistant", "content": None, "tool_calls": [
        {"id": c["id"], "type": "function", "function": {"name": c["name"], "arguments": c["arguments"]}}
        for c in calls.values()]}]
    messages += [{"role": "tool", "tool_call_id": c["id"], "content": "18 degrees"} for c in calls.values()]
    content, calls, finish = stream_message(client, model=MODEL, messages=messages, tools=[WEATHER], seed=1,
                                            max_tokens=30, tool_choice="none")
    assert content and not calls and finish in ("stop", "length")


@pytest.mark.parametrize("seed", range(12))
def test_required_calls_are_always_valid(client, seed):
    r = client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER, TIME], tool_choice="required",
                                       parallel_tool_calls=False, seed=seed, temperature=1.0)
    assert r.choices[0].finish_reason == "tool_calls"
    check_calls(r.choices[0].message)
    assert len(r.choices[0].message.tool_calls) == 1


def test_parallel_calls_are_each_valid(client):
    r = client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER, TIME], tool_choice="required",
                                       seed=0, max_tokens=300, n=2)
    for choice in r.choices:
        complete = choice.message.tool_calls if choice.finish_reason == "tool_calls" else choice.message.tool_calls[:-1]
        for call in complete:
            jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


def test_a_named_function_is_the_one_called(client):
    choice = {"type": "function", "function": {"name": "get_time"}}
    for seed in range(3):
        r = client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER, TIME], tool_choice=choice,
                                           parallel_tool_calls=False, seed=seed)
        check_calls(r.choices[0].message, allowed=("get_time",))


def test_none_never_calls(client):
    ask = [{"role": "user", "content": "Call get_weather for Paris."}]
    for seed in range(3):
        r = client.chat.completions.create(model=MODEL, messages=ask, tools=[WEATHER], tool_choice="none", seed=seed,
                                           max_tokens=40)
        assert r.choices[0].message.tool_calls is None and r.choices[0].finish_reason in ("stop", "length")


def test_auto_answers_or_calls_validly(client):
    called = answered = 0
    for prompt in ("Call get_weather for Paris.", "Hi! How are you?"):
        for seed in range(8):
            r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": prompt}],
                                               tools=[WEATHER], seed=seed, temperature=0.8, max_tokens=60)
            choice = r.choices[0]
            if choice.message.tool_calls:
                called += 1
                assert choice.finish_reason in ("tool_calls", "length")
                if choice.finish_reason == "length":  # a second call may be cut short; the first is whole
                    choice.message.tool_calls = choice.message.tool_calls[:1]
                check_calls(choice.message, allowed=("get_weather",))
            else:
                answered += 1
                assert choice.message.content and choice.finish_reason in ("stop", "length")
            assert not any(m in (choice.message.content or "") for m in MARKUP)
    assert called and answered


def test_auto_with_a_response_format_gives_json_or_a_call(client):
    for seed in range(3):
        r = client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER], seed=seed, max_tokens=120,
                                           response_format={"type": "json_object"},
                                           extra_body={"repeat_penalty": 1.3})
        message = r.choices[0].message
        if message.tool_calls:
            check_calls(message, allowed=("get_weather",))
        elif r.choices[0].finish_reason == "stop":
            assert isinstance(json.loads(message.content), dict)


def test_a_template_that_takes_tools_gets_them(client, http):
    assert http.post("/api/create", json={"model": "hermes-tools", "from": MODEL, "template": HERMES_TEMPLATE,
                                          "stream": False}).status_code == 200
    try:
        r = client.chat.completions.create(model="hermes-tools", messages=ASK, tools=[WEATHER],
                                           tool_choice="required", parallel_tool_calls=False, seed=3)
        check_calls(r.choices[0].message, allowed=("get_weather",))
        call = r.choices[0].message.tool_calls[0]
        history = [*ASK, r.choices[0].message, {"role": "tool", "tool_call_id": call.id, "content": "18 degrees"}]
        answer = client.chat.completions.create(model="hermes-tools", messages=history, tools=[WEATHER],
                                                tool_choice="none", max_tokens=20, seed=3)
        assert answer.choices[0].message.content
        # The template wrote the tools into the prompt itself: far more prompt tokens than without tools.
        bare = client.chat.completions.create(model="hermes-tools", messages=ASK, max_tokens=1)
        assert r.usage.prompt_tokens > bare.usage.prompt_tokens + 40
    finally:
        http.request("DELETE", "/api/delete", json={"model": "hermes-tools"})


BAD = [
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice.function.name"),
    ({"tools": [], "tool_choice": "required"}, "tools"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"description": "no name"}}]}, "tools[0].function.name"),
    ({"tools": [{"type": "function", "function": {"name": "has space"}}]}, "tools[0].function.name"),
    ({"tools": [WEATHER, WEATHER]}, "tools"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
        "x": {"type": "string", "format": "zip-code"}}}}}]}, "tools[0].function.parameters"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}]},
     "tools[0].function.parameters"),
    ({"tool_choice": "sometimes", "tools": [WEATHER]}, "tool_choice"),
    ({"functions": [WEATHER["function"]]}, "functions"),
    ({"messages": [*ASK, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{"}}]}]},
     "messages[1].tool_calls[0].function.arguments"),
    ({"messages": [*ASK, {"role": "tool", "content": "18"}]}, "messages[1]"),
    ({"messages": [*ASK, {"role": "tool", "tool_call_id": "zzz", "content": "18"}]}, "messages[1].tool_call_id"),
    ({"messages": [{"role": "user", "content": None}]}, "messages[0].content"),
]


@pytest.mark.parametrize("fields,param", BAD)
def test_bad_tool_input_is_400_naming_it(http, fields, param):
    body = {"model": MODEL, "messages": ASK, **fields}
    r = http.post("/v1/chat/completions", json=body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == param, err


def test_logprobs_cover_the_call_tokens(client):
    r = client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER], tool_choice="required",
                                       parallel_tool_calls=False, seed=1, logprobs=True, top_logprobs=2)
    choice = r.choices[0]
    assert choice.message.tool_calls and choice.logprobs.content
    text = "".join(e.token for e in choice.logprobs.content)
    assert choice.message.tool_calls[0].function.arguments in text and "<tool_call>" in text
    assert len(choice.logprobs.content) == r.usage.completion_tokens
