"""The scheduler against servers of its own: keep-alive expiry, least-recently-used eviction past
CORRAL_MAX_LOADED_MODELS, and CORRAL_MAX_QUEUE (503 at once, nothing lost for requests already queued)."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest
from conftest import MODEL, start_server, stop_server

HI = [{"role": "user", "content": "Say hello."}]


def running(url: str) -> list[str]:
    return [m["name"] for m in httpx.get(url + "/api/ps").json()["models"]]


def chat(url: str, model: str = MODEL, **body) -> httpx.Response:
    return httpx.post(url + "/api/chat", json={"model": model, "messages": HI, "stream": False,
                                                "options": {"num_predict": 2}, **body}, timeout=120)


@pytest.fixture
def scheduled(tmp_path, request):
    server = start_server(tmp_path / "models", tmp_path / "server.log", **request.param)
    yield server
    stop_server(server)


@pytest.mark.parametrize("scheduled", [{"CORRAL_KEEP_ALIVE": "1s"}], indirect=True)
def test_an_idle_model_unloads_after_its_keep_alive(scheduled):
    url = scheduled.url
    assert chat(url).status_code == 200
    assert running(url) == [MODEL]
    deadline = time.monotonic() + 15
    while running(url) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert running(url) == []
    # A request's keep_alive outlasts the server's default, and shows in expires_at.
    assert chat(url, keep_alive="1h").status_code == 200
    expires = httpx.get(url + "/api/ps").json()["models"][0]["expires_at"]
    assert expires > time.strftime("%Y-%m-%dT%H", time.gmtime(time.time() + 3000))
    time.sleep(2.5)
    assert running(url) == [MODEL]
    # Negative keeps it forever; 0 unloads it right after the request.
    assert chat(url, keep_alive=-1).status_code == 200
    assert httpx.get(url + "/api/ps").json()["models"][0]["expires_at"].startswith("2318")
    assert chat(url, keep_alive=0).status_code == 200
    deadline = time.monotonic() + 10
    while running(url) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert running(url) == []


@pytest.mark.parametrize("scheduled", [{"CORRAL_MAX_LOADED_MODELS": "1"}], indirect=True)
def test_loading_past_the_limit_evicts_the_least_recently_used(scheduled):
    url = scheduled.url
    # A different system prompt makes a different model (its own engine), on the same weights.
    r = httpx.post(url + "/api/create", json={"model": "other", "from": MODEL, "system": "Be terse.", "stream": False})
    assert r.status_code == 200, r.text
    assert chat(url).status_code == 200
    assert running(url) == [MODEL]
    assert chat(url, "other").status_code == 200
    assert running(url) == ["other:latest"]
    assert chat(url).status_code == 200
    assert running(url) == [MODEL]
    # /v1 requests are scheduled the same way.
    r = httpx.post(url + "/v1/chat/completions", json={"model": "other", "messages": HI, "max_tokens": 2}, timeout=60)
    assert r.status_code == 200 and running(url) == ["other:latest"]


@pytest.mark.parametrize("scheduled", [{"CORRAL_NUM_PARALLEL": "1", "CORRAL_MAX_QUEUE": "2"}], indirect=True)
def test_past_the_queue_limit_requests_get_503_at_once(scheduled):
    url = scheduled.url
    assert chat(url).status_code == 200  # loaded
    results: dict[str, object] = {}

    def long_stream(key: str) -> None:  # counting goes on until num_predict, a few seconds each
        body = {"model": MODEL, "prompt": "Count from 1 to 1000: 1, 2, 3, 4,", "raw": True,
                "options": {"num_predict": 300, "temperature": 0}}
        with httpx.stream("POST", url + "/api/generate", json=body, timeout=300) as r:
            lines = [json.loads(line) for line in r.iter_lines() if line.strip()]
        results[key] = (r.status_code, lines[-1])

    running_one = threading.Thread(target=long_stream, args=("running",))
    running_one.start()
    time.sleep(1.0)  # it holds the only slot
    queued = [threading.Thread(target=long_stream, args=(f"queued{i}",)) for i in range(2)]
    for t in queued:
        t.start()
        time.sleep(0.5)
    started = time.monotonic()
    native = chat(url)
    openai = httpx.post(url + "/v1/chat/completions", json={"model": MODEL, "messages": HI}, timeout=60)
    assert time.monotonic() - started < 5  # refused at once, not after waiting
    assert native.status_code == 503
    assert native.json() == {"error": "server busy, please try again.  maximum pending requests exceeded"}
    assert openai.status_code == 503 and openai.json()["error"]["message"].startswith("server busy")
    for t in [running_one, *queued]:
        t.join(timeout=300)
    for key in ("running", "queued0", "queued1"):
        status, last = results[key]
        assert status == 200 and last["done"] and last["eval_count"] == 300, (key, last)
