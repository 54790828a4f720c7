"""Ollama's native generation API through the official `ollama` Python client: chat and generate
(streamed and not), options, format, tools, logprobs, context, load and unload, timings, and errors;
plus the management verbs through the same client."""

from __future__ import annotations

import json

import jsonschema
import ollama
import pytest

from conftest import MODEL, unload_models
from registry_fixture import registry, registry_storage  # noqa: F401

HI = [{"role": "user", "content": "Say hello to the world."}]
GREEDY = {"temperature": 0, "num_predict": 12}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30}},
                   "required": ["city"]}}}


@pytest.fixture(scope="module")
def oll(server):
    return ollama.Client(host=server.url, timeout=120)


def test_chat_whole_and_streamed_agree(oll):
    whole = oll.chat(model=MODEL, messages=HI, options=GREEDY)
    assert whole.done and whole.done_reason == "length" and whole.message.role == "assistant"
    assert whole.eval_count == 12 and whole.prompt_eval_count > 5
    assert whole.total_duration >= whole.prompt_eval_duration + whole.eval_duration > 0
    assert whole.load_duration >= 0 and whole.created_at
    chunks = list(oll.chat(model=MODEL, messages=HI, options=GREEDY, stream=True))
    assert all(not c.done for c in chunks[:-1]) and chunks[-1].done and chunks[-1].message.content == ""
    assert "".join(c.message.content for c in chunks) == whole.message.content
    assert chunks[-1].eval_count == 12 and chunks[-1].done_reason == "length"


def test_generate_templates_the_prompt_and_returns_context(oll):
    first = oll.generate(model=MODEL, prompt="Why is the sky blue?", options=GREEDY)
    assert first.response and first.done and len(first.context) == first.prompt_eval_count + first.eval_count
    again = oll.generate(model=MODEL, prompt="Say more.", options=GREEDY, context=first.context)
    assert again.prompt_eval_count > len(first.context)
    streamed = "".join(c.response for c in oll.generate(model=MODEL, prompt="Why is the sky blue?", options=GREEDY,
                                                           stream=True))
    assert streamed == first.response


def test_generate_raw_and_system(oll):
    raw = oll.generate(model=MODEL, prompt="The capital of France is", raw=True, options=GREEDY)
    templated = oll.generate(model=MODEL, prompt="The capital of France is", options=GREEDY)
    assert raw.prompt_eval_count < templated.prompt_eval_count  # no chat markup around the prompt
    system = oll.generate(model=MODEL, prompt="Hi", system="You are a pirate. Always answer like a pirate.",
                          options=GREEDY)
    assert system.prompt_eval_count > oll.generate(model=MODEL, prompt="Hi", options=GREEDY).prompt_eval_count - 20


def test_options_are_honoured(oll):
    seeded = [oll.chat(model=MODEL, messages=HI, options={"seed": 42, "temperature": 1.0, "num_predict": 16}).message.content
              for _ in range(2)]
    assert seeded[0] == seeded[1]
    stopped = oll.chat(model=MODEL, messages=HI, options={**GREEDY, "num_predict": 40, "stop": ["o"]})
    assert "o" not in stopped.message.content and stopped.done_reason == "stop"
    short = oll.generate(model=MODEL, prompt="Count to twenty:", options={"num_predict": 3, "temperature": 0})
    assert short.eval_count == 3 and short.done_reason == "length"


def test_format_json_and_schema(oll):
    r = oll.chat(model=MODEL, messages=[{"role": "user", "content": "Give a JSON object describing a cat."}],
                 format="json", options={"num_predict": 80, "temperature": 0, "repeat_penalty": 1.3})
    if r.done_reason == "stop":
        assert isinstance(json.loads(r.message.content), dict)
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                               "age": {"type": "integer", "minimum": 0, "maximum": 30}},
              "required": ["name", "age"]}
    r = oll.generate(model=MODEL, prompt="A cat named Tom, 4 years old, as JSON with name and age.", format=schema,
                     options={"num_predict": 60, "temperature": 0})
    assert r.done_reason == "stop"
    jsonschema.validate(json.loads(r.response), schema)


def test_tool_calls_come_as_objects_and_history_goes_back(oll):
    called = None
    for seed in range(8):
        r = oll.chat(model=MODEL, messages=[{"role": "user", "content": "Call get_weather for Paris."}], tools=[WEATHER],
                     options={"seed": seed, "temperature": 0.8, "num_predict": 80})
        if r.message.tool_calls:
            called = r
            break
    assert called is not None, "no seed made the model call the tool"
    call = called.message.tool_calls[0]
    assert call.function.name == "get_weather" and isinstance(call.function.arguments, dict)
    assert "<tool_call>" not in (called.message.content or ""), called.message.content
    history = [{"role": "user", "content": "Call get_weather for Paris."}, called.message,
               {"role": "tool", "content": "18 degrees and sunny", "tool_name": "get_weather"}]
    answer = oll.chat(model=MODEL, messages=history, tools=[WEATHER], options={"num_predict": 20, "temperature": 0})
    assert answer.done


def test_logprobs(http):
    r = http.post("/api/chat", json={"model": MODEL, "messages": HI, "stream": False, "options": GREEDY,
                                     "logprobs": True, "top_logprobs": 3}).json()
    assert len(r["logprobs"]) == r["eval_count"]
    assert "".join(e["token"] for e in r["logprobs"]) == r["message"]["content"]
    for entry in r["logprobs"]:
        assert len(entry["top_logprobs"]) == 3 and entry["top_logprobs"][0]["token"] == entry["token"]
        assert entry["logprob"] <= 0 and bytes(entry["bytes"]).decode() == entry["token"]


def test_load_and_unload(oll):
    loaded = oll.chat(model=MODEL, messages=[])
    assert loaded.done and loaded.done_reason == "load"
    running = oll.ps()
    assert [m.name for m in running.models] == [MODEL]
    assert running.models[0].context_length > 0 and running.models[0].size > 0
    assert oll.generate(model=MODEL, prompt="", keep_alive=0).done_reason == "unload"
    assert oll.ps().models == []
    assert oll.generate(model=MODEL, prompt="").done_reason == "load"
    assert oll.ps().models[0].name == MODEL


@pytest.mark.parametrize("path,body,fragment", [
    ("/api/chat", {"messages": HI, "think": True}, "thinking"),
    ("/api/chat", {"messages": HI, "shift": True}, "shift"),
    ("/api/chat", {"messages": HI, "options": {"temperature": "hot"}}, "temperature"),
    ("/api/chat", {"messages": HI, "options": {"mirostat": 1}}, "mirostat"),
    ("/api/chat", {"messages": HI, "options": {"num_thread": 2}}, "num_thread"),
    ("/api/chat", {"messages": HI, "options": {"bogus": 1}}, "bogus"),
    ("/api/chat", {"messages": HI, "keep_alive": "soon"}, "keep_alive"),
    ("/api/chat", {"messages": HI, "format": "yaml"}, "format"),
    ("/api/chat", {"messages": [{"role": "tool", "content": "x"}]}, "tool"),
    ("/api/chat", {"messages": [{"role": "user", "content": "x", "images": ["not base64!"]}]}, "base64"),
    ("/api/generate", {"prompt": "x", "raw": True, "system": "s"}, "raw"),
    ("/api/generate", {"prompt": "x", "suffix": "y"}, "insert"),
    ("/api/generate", {"prompt": "x", "context": [99999999]}, "context"),
])
def test_bad_requests_are_400_in_ollamas_shape(http, path, body, fragment):
    r = http.post(path, json={"model": MODEL, "stream": False, **body})
    assert r.status_code == 400, r.text
    assert set(r.json()) == {"error"} and fragment in r.json()["error"]


def test_unknown_model_is_404(http):
    r = http.post("/api/chat", json={"model": "nope:1b", "messages": HI})
    assert r.status_code == 404 and "nope:1b" in r.json()["error"]


def test_a_long_chat_loses_its_oldest_turns(http):
    filler = "The quick brown fox jumps over the lazy dog. " * 60
    messages = [{"role": "system", "content": "Be brief."}]
    for i in range(6):
        messages += [{"role": "user", "content": f"{i}: {filler}"}, {"role": "assistant", "content": "Noted."}]
    messages.append({"role": "user", "content": "What did I say?"})
    body = {"model": MODEL, "messages": messages, "stream": False, "options": {"num_ctx": 1024, "num_predict": 4}}
    r = http.post("/api/chat", json=body)
    assert r.status_code == 200, r.text
    assert r.json()["prompt_eval_count"] < 1024
    r = http.post("/api/chat", json={**body, "truncate": False})
    assert r.status_code == 400 and "context" in r.json()["error"]


def test_embed_through_the_ollama_client(oll, http):
    r = oll.embed(model="all-minilm", input=["why is the sky blue?", "why is the grass green?"])
    assert len(r.embeddings) == 2 and len(r.embeddings[0]) == 384 and r.prompt_eval_count > 0
    assert abs(sum(x * x for x in r.embeddings[0]) - 1) < 1e-3
    unload_models(http, "all-minilm")


def test_management_through_the_ollama_client(oll, registry):
    names = [m.model for m in oll.list().models]
    assert MODEL in names
    info = oll.show(MODEL)
    assert {"completion", "tools"} <= set(info.capabilities) and info.modelinfo["general.architecture"] == "llama"
    oll.copy(MODEL, "ollama-copy:1")
    assert "ollama-copy:1" in [m.model for m in oll.list().models]
    target = f"{registry}/team/ollama-client:v1"
    oll.copy(MODEL, target)
    pushed = [p.status for p in oll.push(target, insecure=True, stream=True)]
    assert pushed[-1] == "success"
    oll.delete(target)
    progress = list(oll.pull(target, insecure=True, stream=True))
    assert progress[0].status == "pulling manifest" and progress[-1].status == "success"
    assert any(p.total and p.completed == p.total for p in progress)
    assert oll.chat(model=target, messages=HI, options={"num_predict": 2}).done
    for name in ("ollama-copy:1", target):
        oll.delete(name)
    with pytest.raises(ollama.ResponseError) as info:
        oll.delete("ollama-copy:1")
    assert info.value.status_code == 404
