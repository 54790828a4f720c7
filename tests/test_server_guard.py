"""The guard in front of every route: API keys, rate limits, browser origins, body and request limits,
and the one structured log line per request (with no prompt text in it)."""

from __future__ import annotations

import json
import logging
import time

import httpx
import pytest
from conftest import MODEL, start_server, stop_server
from openai import AuthenticationError, OpenAI

from corral.config import Settings
from corral.server.app import create_app
from corral.server.guard import RateLimiter, origin_allowed

SECRET_PROMPT = "the purple giraffe password is 8812"


@pytest.fixture(scope="module")
def keyed(tmp_path_factory):
    root = tmp_path_factory.mktemp("guard")
    (root / "keys").write_text("# team keys\nalpha-key\n\nbeta-key\n")
    server = start_server(root / "models", root / "server.log", CORRAL_API_KEYS=f"@{root / 'keys'}",
                          CORRAL_RATE_LIMIT="30", CORRAL_MAX_BODY_BYTES="20000", CORRAL_MAX_MESSAGES="4",
                          CORRAL_MAX_IMAGES="1")
    yield server
    stop_server(server)


def test_keys_are_needed_on_every_api_route_in_its_error_shape(keyed):
    url = keyed.url
    assert httpx.get(url + "/").status_code == 200  # health checks need no key
    for path in ("/v1/models", "/api/tags", "/api/ps", "/api/version"):
        assert httpx.get(url + path).status_code == 401
    r = httpx.get(url + "/v1/models", headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    r = httpx.post(url + "/api/chat", json={"model": MODEL, "messages": []}, headers={"Authorization": "Basic x"})
    assert r.status_code == 401 and set(r.json()) == {"error"}
    with pytest.raises(AuthenticationError):
        OpenAI(base_url=url + "/v1", api_key="nope", max_retries=0).models.list()
    good = OpenAI(base_url=url + "/v1", api_key="beta-key", max_retries=0)
    assert MODEL in [m.id for m in good.models.list()]
    log = keyed.log.read_text()
    assert "beta-key" not in log and "alpha-key" not in log


def test_limits_name_themselves(keyed):
    h = {"Authorization": "Bearer alpha-key"}
    url = keyed.url + "/v1/chat/completions"
    big = httpx.post(url, headers=h, json={"model": MODEL, "messages": [{"role": "user", "content": "x" * 30000}]})
    assert big.status_code == 413 and "20000" in big.json()["error"]["message"]
    many = httpx.post(url, headers=h, json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}] * 5})
    assert many.status_code == 400 and "CORRAL_MAX_MESSAGES" in many.json()["error"]["message"]
    dot = "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg=="
    parts = [{"type": "image_url", "image_url": {"url": dot}}] * 2
    images = httpx.post(url, headers=h, json={"model": MODEL, "messages": [{"role": "user", "content": parts}]})
    assert images.status_code == 400 and "CORRAL_MAX_IMAGES" in images.json()["error"]["message"]
    upload = httpx.post(keyed.url + "/api/blobs/sha256:" + "0" * 64, headers=h, content=b"x" * 30000)
    assert upload.status_code == 400  # not 413: model uploads are not held to the body limit


def test_one_log_line_per_request_without_the_prompt(keyed):
    h = {"Authorization": "Bearer alpha-key"}
    r = httpx.post(keyed.url + "/v1/chat/completions", headers=h, timeout=60,
                   json={"model": MODEL, "messages": [{"role": "user", "content": SECRET_PROMPT}], "max_tokens": 3})
    assert r.status_code == 200
    time.sleep(0.3)
    lines = [json.loads(line.split("corral.access: ", 1)[1]) for line in keyed.log.read_text().splitlines()
             if "corral.access: " in line]
    mine = [entry for entry in lines if entry["route"] == "/v1/chat/completions" and entry["status"] == 200][-1]
    assert mine["model"] == MODEL and mine["completion_tokens"] == 3 and mine["prompt_tokens"] > 5
    assert mine["method"] == "POST" and mine["duration_ms"] > 0
    assert SECRET_PROMPT not in keyed.log.read_text()


def test_rate_limit_answers_429_with_retry_after(tmp_path):
    server = start_server(tmp_path / "models", tmp_path / "server.log", CORRAL_RATE_LIMIT="3")
    try:
        statuses = [httpx.get(server.url + "/api/tags") for _ in range(4)]
        assert [r.status_code for r in statuses] == [200, 200, 200, 429]
        assert 1 <= int(statuses[-1].headers["retry-after"]) <= 60
        r = httpx.get(server.url + "/v1/models")
        assert r.status_code == 429 and r.json()["error"]["type"] == "rate_limit_error"
        assert httpx.get(server.url + "/").status_code == 200  # health checks are not limited
    finally:
        stop_server(server)


def test_browser_origins(http):
    ok = http.options("/v1/chat/completions", headers={"Origin": "http://localhost:5173",
                                                       "Access-Control-Request-Method": "POST",
                                                       "Access-Control-Request-Headers": "authorization,content-type"})
    assert ok.status_code == 204
    assert ok.headers["access-control-allow-origin"] == "http://localhost:5173"
    assert "authorization" in ok.headers["access-control-allow-headers"]
    r = http.get("/v1/models", headers={"Origin": "http://127.0.0.1:8080"})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://127.0.0.1:8080"
    evil = http.get("/v1/models", headers={"Origin": "https://evil.example"})
    assert evil.status_code == 403 and "CORRAL_ORIGINS" in evil.json()["error"]["message"]
    assert "access-control-allow-origin" not in evil.headers
    assert http.get("/v1/models").status_code == 200  # no Origin: not a browser, nothing to check


def test_origin_patterns_and_the_limiter():
    defaults = Settings().origins
    assert origin_allowed("http://localhost:3000", defaults) and origin_allowed("http://127.0.0.1", defaults)
    assert not origin_allowed("http://localhost.evil.example", defaults)
    assert not origin_allowed("https://example.com", defaults)
    assert origin_allowed("https://example.com", ("*",))
    limiter = RateLimiter(2)
    assert [limiter.retry_after("a", t) for t in (0.0, 1.0, 2.0)] == [0, 0, 58]
    assert limiter.retry_after("b", 2.0) == 0 and limiter.retry_after("a", 60.5) == 0


def test_a_warning_when_listening_beyond_loopback_without_keys(tmp_path):
    server = start_server(tmp_path / "models", tmp_path / "server.log", CORRAL_NO_BUNDLED="1")
    stop_server(server)
    assert "no API keys" not in (tmp_path / "server.log").read_text()
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logging.getLogger("corral.server").addHandler(handler)
    try:
        create_app(Settings(host="0.0.0.0", models_dir=tmp_path / "m2"))
        create_app(Settings(host="0.0.0.0", models_dir=tmp_path / "m3", api_keys=("k",)))
    finally:
        logging.getLogger("corral.server").removeHandler(handler)
    warnings = [r.getMessage() for r in records if "no API keys" in r.getMessage()]
    assert len(warnings) == 1 and "0.0.0.0" in warnings[0]


def test_bodies_are_json_whatever_their_label(http):
    # Ollama's README examples: curl -d '{...}' sends application/x-www-form-urlencoded.
    body = '{"model": "smollm2:135m", "prompt": "Hi", "stream": false, "options": {"num_predict": 2}}'
    r = http.post("/api/generate", content=body, headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert r.status_code == 200 and r.json()["done"]
    r = http.post("/api/show", content='{"model": "smollm2:135m"}', headers={"Content-Type": ""})
    assert r.status_code == 200
