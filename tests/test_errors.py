"""Error bodies under /v1, checked raw with httpx: status, OpenAI's shape, and the field named."""

from __future__ import annotations

import pytest

from conftest import CONTEXT_LENGTH, MODEL

CHAT = "/v1/chat/completions"
OK_MESSAGES = [{"role": "user", "content": "hi"}]


def error_of(response, status):
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    return body["error"]


def test_malformed_json_is_400(http):
    err = error_of(http.post(CHAT, content=b'{"model": ', headers={"content-type": "application/json"}), 400)
    assert err["type"] == "invalid_request_error"
    assert "JSON" in err["message"]


def test_empty_body_and_non_object_body_are_400(http):
    error_of(http.post(CHAT, content=b"", headers={"content-type": "application/json"}), 400)
    error_of(http.post(CHAT, json=[1, 2]), 400)


@pytest.mark.parametrize(
    "body,param",
    [
        ({"messages": OK_MESSAGES}, "model"),
        ({"model": MODEL}, "messages"),
        ({"model": MODEL, "messages": []}, "messages"),
        ({"model": MODEL, "messages": "hi"}, "messages"),
        ({"model": MODEL, "messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
        ({"model": MODEL, "messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
        ({"model": MODEL, "messages": [{"role": "user"}]}, "messages[0].content"),
        ({"model": MODEL, "messages": OK_MESSAGES, "temperature": "hot"}, "temperature"),
        ({"model": MODEL, "messages": OK_MESSAGES, "temperature": 2.5}, "temperature"),
        ({"model": MODEL, "messages": OK_MESSAGES, "temperature": -0.1}, "temperature"),
        ({"model": MODEL, "messages": OK_MESSAGES, "top_p": 1.5}, "top_p"),
        ({"model": MODEL, "messages": OK_MESSAGES, "frequency_penalty": 3}, "frequency_penalty"),
        ({"model": MODEL, "messages": OK_MESSAGES, "presence_penalty": -2.5}, "presence_penalty"),
        ({"model": MODEL, "messages": OK_MESSAGES, "max_tokens": 0}, "max_tokens"),
        ({"model": MODEL, "messages": OK_MESSAGES, "max_completion_tokens": 0}, "max_completion_tokens"),
        ({"model": MODEL, "messages": OK_MESSAGES, "n": 0}, "n"),
        ({"model": MODEL, "messages": OK_MESSAGES, "logit_bias": {"42": 101}}, "logit_bias"),
        ({"model": MODEL, "messages": OK_MESSAGES, "logit_bias": {"abc": 1}}, "logit_bias"),
        ({"model": MODEL, "messages": OK_MESSAGES, "logit_bias": {"99999999": 1}}, "logit_bias"),
        ({"model": MODEL, "messages": OK_MESSAGES, "stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"model": MODEL, "messages": OK_MESSAGES, "stop": [""]}, "stop"),
        ({"model": MODEL, "messages": OK_MESSAGES, "stream_options": {"include_usage": True}}, "stream_options"),
        ({"model": MODEL, "messages": OK_MESSAGES, "logprobs": "yes"}, "logprobs"),
        ({"model": MODEL, "messages": OK_MESSAGES, "tools": [{"type": "function"}]}, "tools[0].function"),
        ({"model": MODEL, "messages": OK_MESSAGES, "response_format": {"type": "sound"}}, "response_format.type"),
        ({"model": MODEL, "messages": OK_MESSAGES, "frobnicate": 1}, "frobnicate"),
        ({"model": "../../etc/passwd", "messages": OK_MESSAGES}, "model"),
    ],
)
def test_bad_fields_are_400_naming_the_field(http, body, param):
    err = error_of(http.post(CHAT, json=body), 400)
    assert err["param"] == param
    assert param.split(".")[0].split("[")[0] in err["message"]


def test_unknown_model_is_404(http):
    err = error_of(http.post(CHAT, json={"model": "nope:1b", "messages": OK_MESSAGES}), 404)
    assert "nope:1b" in err["message"] and err["code"] == "model_not_found"


def test_prompt_longer_than_the_context_is_400_with_both_numbers(http):
    long = "hello " * (CONTEXT_LENGTH + 100)
    for stream in (False, True):
        body = {"model": MODEL, "messages": [{"role": "user", "content": long}], "stream": stream}
        response = http.post(CHAT, json=body)
        assert response.headers["content-type"].startswith("application/json")
        err = error_of(response, 400)
        assert err["code"] == "context_length_exceeded"
        assert str(CONTEXT_LENGTH) in err["message"]
        numbers = [int(w) for w in err["message"].replace(".", " ").split() if w.isdigit()]
        assert any(n > CONTEXT_LENGTH for n in numbers)


def test_max_tokens_beyond_the_context_is_400(http):
    body = {"model": MODEL, "messages": OK_MESSAGES, "max_tokens": CONTEXT_LENGTH}
    err = error_of(http.post(CHAT, json=body), 400)
    assert err["code"] == "context_length_exceeded" and err["param"] == "max_tokens"


def test_completions_errors_share_the_shape(http):
    err = error_of(http.post("/v1/completions", json={"model": MODEL, "prompt": "x", "best_of": 0}), 400)
    assert err["param"] == "best_of"
    err = error_of(http.post("/v1/completions", json={"model": MODEL}), 400)
    assert err["param"] == "prompt"


def test_unknown_route_and_wrong_method(http):
    error_of(http.get("/v1/nothing-here"), 404)
    error_of(http.get(CHAT), 405)


def test_health(http):
    r = http.get("/")
    assert r.status_code == 200 and r.text == "corral is running"
    assert http.head("/").status_code == 200


@pytest.mark.parametrize(
    "field,value",
    [("stream", "yes"), ("max_tokens", True), ("n", "2"), ("temperature", "0.5"), ("seed", 1.5)],
)
def test_values_are_not_coerced(http, field, value):
    err = error_of(http.post(CHAT, json={"model": MODEL, "messages": OK_MESSAGES, field: value}), 400)
    assert err["param"] == field


def test_num_ctx_beyond_the_training_context_is_400(http):
    err = error_of(http.post(CHAT, json={"model": MODEL, "messages": OK_MESSAGES, "num_ctx": 10**9}), 400)
    assert err["param"] == "num_ctx" and "8192" in err["message"]
