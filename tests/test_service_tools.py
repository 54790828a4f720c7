"""Tool plans: the format a template implies, the prompt the tools go into, and the call grammar,
checked with llama.cpp's own grammar sampler on the bundled vocabulary."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from test_service_grammar import llama_accepts

from corral.protocol.openai import ChatCompletionRequest
from corral.service.chat import template_messages
from corral.service.errors import InvalidRequest
from corral.service.templates import CHATML, ChatTemplate
from corral.service.tool_calls import BARE_JSON, HERMES, LLAMA3, MISTRAL
from corral.service.tools import plan, template_format

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                                    "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"]}}}
TIME = {"type": "function", "function": {"name": "get_time"}}

# An HF-style template that takes tools, written the way Qwen's and Hermes' templates are.
HERMES_TEMPLATE = """\
{%- if tools %}<|im_start|>system
{% if messages[0].role == 'system' %}{{ messages[0].content }}

{% endif %}# Tools
<tools>
{% for tool in tools %}{{ tool.function | tojson }}
{% endfor %}</tools>
Call a function with <tool_call>{"name": <name>, "arguments": <object>}</tool_call><|im_end|>
{% endif %}
{%- for message in messages %}
{%- if message.role == 'system' and tools %}
{%- elif message.role == 'tool' %}<|im_start|>user
<tool_response>
{{ message.name }}: {{ message.content }}
</tool_response><|im_end|>
{% elif message.tool_calls %}<|im_start|>assistant
{% for call in message.tool_calls %}<tool_call>
{"name": "{{ call.function.name }}", "arguments": {{ call.function.arguments | tojson }}}
</tool_call>{% endfor %}<|im_end|>
{% else %}<|im_start|>{{ message.role }}
{{ message.content }}<|im_end|>
{% endif %}
{%- endfor %}{% if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""


def loaded(vocab, template: str | None = None):
    return SimpleNamespace(template=ChatTemplate(template), model=vocab, system=None, messages=[],
                           has_projector=False)


def request(**fields):
    body = {"model": "m", "messages": [{"role": "user", "content": "Weather in Paris?"}], **fields}
    return ChatCompletionRequest.model_validate(body)


@pytest.mark.parametrize("source,fmt", [
    (CHATML, None),
    (HERMES_TEMPLATE, HERMES),
    (("{% for m in messages %}{% if tools %}[AVAILABLE_TOOLS]{{ tools|tojson }}[/AVAILABLE_TOOLS]{% endif %}"
     "{{ m.content }}{% endfor %}[TOOL_CALLS]"), MISTRAL),
    ('{% if tools %}Respond with {"name": function name, "parameters": dictionary}{% endif %}<|python_tag|>', LLAMA3),
    ("{% if tools %}{{ tools | tojson }}{% endif %}{% for m in messages %}{{ m.content }}{% endfor %}", BARE_JSON),
])
def test_the_template_decides_the_format(source, fmt):
    assert template_format(source) == fmt


def test_no_tools_or_none_means_no_plan(vocab):
    assert plan(request(), loaded(vocab)) is None
    assert plan(request(tools=[WEATHER], tool_choice="none"), loaded(vocab)) is None


@pytest.mark.parametrize("fields,param", [
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice.function.name"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]},
     "tools[0].function.parameters"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"x": {"not": {}}}}}}]}, "tools[0].function.parameters"),
])
def test_bad_tool_requests_are_400(vocab, fields, param):
    with pytest.raises(InvalidRequest) as info:
        plan(request(**fields), loaded(vocab))
    assert info.value.param == param


def test_a_template_without_tools_gets_a_preamble(vocab):
    p = plan(request(tools=[WEATHER, TIME]), loaded(vocab))
    assert p.fmt is HERMES and p.template_tools is None
    assert '"name": "get_weather"' in p.preamble and "<tool_call>" in p.preamble
    messages = template_messages(request(tools=[WEATHER]), loaded(vocab), p.preamble)
    assert messages[0]["role"] == "system" and p.preamble in messages[0]["content"]


def test_a_template_with_tools_gets_them(vocab):
    p = plan(request(tools=[WEATHER]), loaded(vocab, HERMES_TEMPLATE))
    assert p.preamble is None and p.template_tools[0]["function"]["name"] == "get_weather"
    text = ChatTemplate(HERMES_TEMPLATE).render(template_messages(request(tools=[WEATHER]), loaded(vocab)),
                                                tools=p.template_tools)
    assert '"name": "get_weather"' in text and "<tools>" in text


HISTORY = [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather",
                                                          "arguments": '{"city": "Paris", "unit": "celsius"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 18}'},
]


def test_history_goes_to_a_tool_template_as_objects(vocab):
    messages = template_messages(request(messages=HISTORY), loaded(vocab, HERMES_TEMPLATE))
    assert messages[1]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris", "unit": "celsius"}
    assert messages[2] == {"role": "tool", "content": '{"temp": 18}', "tool_call_id": "call_1", "name": "get_weather"}
    text = ChatTemplate(HERMES_TEMPLATE).render(messages)
    assert '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}' in text
    assert 'get_weather: {"temp": 18}' in text


def test_history_is_written_out_for_a_template_without_tools(vocab):
    two_results = [*HISTORY, {"role": "tool", "tool_call_id": "call_1", "content": "more"}]
    messages = template_messages(request(messages=two_results), loaded(vocab))
    assert "<tool_call>" in messages[1]["content"] and "Paris" in messages[1]["content"]
    assert messages[2]["role"] == "user" and messages[2]["content"].count("<tool_response>") == 2
    assert len(messages) == 3


@pytest.mark.parametrize("bad,param", [
    ({**HISTORY[1], "tool_calls": [{**HISTORY[1]["tool_calls"][0], "function": {"name": "get_weather",
                                                                              "arguments": "{"}}]},
     "messages[1].tool_calls[0].function.arguments"),
    ({**HISTORY[1], "tool_calls": [{**HISTORY[1]["tool_calls"][0], "function": {"name": "get_weather",
                                                                              "arguments": "[1]"}}]},
     "messages[1].tool_calls[0].function.arguments"),
])
def test_malformed_history_is_400(vocab, bad, param):
    with pytest.raises(InvalidRequest) as info:
        template_messages(request(messages=[HISTORY[0], bad, HISTORY[2]]), loaded(vocab))
    assert info.value.param == param


def test_a_result_for_an_unknown_call_is_400(vocab):
    orphan = [HISTORY[0], {"role": "tool", "tool_call_id": "call_9", "content": "x"}]
    with pytest.raises(InvalidRequest) as info:
        template_messages(request(messages=orphan), loaded(vocab))
    assert info.value.param == "messages[1].tool_call_id"


GOOD = '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}</tool_call>'


@pytest.mark.parametrize("fields,text,ok", [
    ({"tool_choice": "required"}, GOOD, True),
    ({"tool_choice": "required"}, GOOD + "\n" + GOOD, True),
    ({"tool_choice": "required", "parallel_tool_calls": False}, GOOD + "\n" + GOOD, False),
    ({"tool_choice": "required"}, '<tool_call>{"name": "get_time", "arguments": {}}</tool_call>', True),
    ({"tool_choice": "required"}, "Sunny.", False),
    ({"tool_choice": "required"}, GOOD.replace("celsius", "kelvin"), False),
    ({"tool_choice": "required"}, GOOD.replace('"Paris", ', '"Paris"').replace(' "unit": "celsius"', ""), False),
    ({"tool_choice": "required"}, '<tool_call>{"name": "get_time", "arguments": {"x": 1}}</tool_call>', False),
    ({"tool_choice": {"type": "function", "function": {"name": "get_time"}}}, GOOD, False),
    ({"tool_choice": {"type": "function", "function": {"name": "get_time"}}},
     '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>', True),
])
def test_the_call_grammar(vocab, fields, text, ok):
    p = plan(request(tools=[WEATHER, TIME], **fields), loaded(vocab))
    assert p.trigger is None
    assert llama_accepts(vocab, p.grammar, text) is ok


def test_auto_is_lazy_and_a_json_answer_can_stand_beside_calls(vocab):
    p = plan(request(tools=[WEATHER]), loaded(vocab))
    assert p.trigger is not None and p.trigger.markers == (b"<tool_call>",)
    both = plan(request(tools=[WEATHER], response_format={"type": "json_object"}), loaded(vocab))
    assert both.trigger is None
    assert llama_accepts(vocab, both.grammar, '{"answer": 42}')
    assert llama_accepts(vocab, both.grammar, GOOD)
    assert not llama_accepts(vocab, both.grammar, "plain text")


@pytest.mark.parametrize("source,text", [
    ("{% if tools %}[TOOL_CALLS]{% endif %}",
     '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "celsius"}}]'),
    ('{% if tools %}"parameters" <|python_tag|>{% endif %}',
     '{"name": "get_weather", "parameters": {"city": "Oslo", "unit": "celsius"}}'),
    ("{% if tools %}{{ tools }}{% endif %}",
     '[{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "celsius"}}]'),
])
def test_each_family_grammar_accepts_its_own_calls(vocab, source, text):
    p = plan(request(tools=[WEATHER], tool_choice="required"), loaded(vocab, source))
    assert llama_accepts(vocab, p.grammar, text)
    assert json.loads(text.removeprefix("[TOOL_CALLS]"))
