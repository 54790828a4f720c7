"""Fuzzing every route with schemathesis, from corral's own OpenAPI schema (/openapi.json), against a live server.

Two properties hold for every generated request, valid or not: the server never answers 5xx, and every error is
in its route's documented shape (OpenAI's `{"error": {message, type, param, code}}` under /v1, Ollama's
`{"error": "..."}` under /api). The run is bounded (a few fuzzed examples per operation, derandomized so CI is
reproducible, generations capped at a few tokens) so it fits in about a minute on two cores; set
CORRAL_FUZZ_EXAMPLES to fuzz harder locally.

Pulls and pushes of generated names (and image URLs) would reach out to the network; the server is started with every
proxy variable pointing at a loopback port that refuses connections, so no request leaves this machine and
those routes answer 502 "registry unreachable": a gateway error about the upstream, documented, not a bug.
"""

from __future__ import annotations

import json
import os
import socket
import time
import zlib
from collections import Counter, defaultdict
from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from schemathesis import Case

from conftest import EMBED_MODEL, MODEL, Server, start_server, stop_server
from corral.config import Settings
from corral.server.app import create_app

MAX_EXAMPLES = int(os.environ.get("CORRAL_FUZZ_EXAMPLES", "15"))  # fuzzed examples per operation
REQUEST_TIMEOUT = 60.0
TOKEN_CAP = 4  # generated tokens per sequence: the fuzzer tests input handling, not generation
N_CAP = 2  # parallel sequences (n, best_of)

# Upstream failures that are the answer, not a bug: the registry cannot be reached (see the module docstring).
ALLOWED_5XX = {("POST", "/api/pull"): {502}, ("POST", "/api/push"): {502}}

# operation label -> status code -> count, filled by the fuzz test and read by the coverage test after it.
SEEN: dict[str, Counter[int]] = defaultdict(Counter)
SECONDS: dict[str, float] = defaultdict(float)  # operation label -> time spent waiting for its answers
RUN: dict[str, float] = {}
SLOWEST: list[tuple[float, str]] = []  # the three slowest requests, to see where the run's time goes


@pytest.fixture(scope="module")
def refusing_port() -> Iterator[int]:
    """A loopback port that is bound but never listens: connecting to it is refused at once."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory: pytest.TempPathFactory, refusing_port: int) -> Iterator[Server]:
    """A server of its own: the fuzzer creates, copies and deletes models, which other tests must not see."""
    root = tmp_path_factory.mktemp("fuzz")
    proxy = f"http://127.0.0.1:{refusing_port}"
    proxies = {name: proxy for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy",
                                        "all_proxy")}
    srv = start_server(root / "models", root / "server.log", NO_PROXY="", no_proxy="", **proxies)
    yield srv
    stop_server(srv)


def _cap(value: Any, cap: int, unbounded: tuple[int, ...] = ()) -> Any:
    """`cap` for a too-large integer (or one meaning "no limit"); anything else, valid or not, as it was."""
    if isinstance(value, int) and not isinstance(value, bool) and (value > cap or value in unbounded):
        return cap
    return value


# Fields that name a model, per route, and the installed model that half the cases name instead of a generated
# one: random names are refused early (404), so without this the fuzzer would rarely get past the model lookup.
STEER: dict[str, tuple[str, str]] = {
    "/v1/chat/completions": ("model", MODEL), "/v1/completions": ("model", MODEL),
    "/api/generate": ("model", MODEL), "/api/chat": ("model", MODEL), "/api/show": ("model", MODEL),
    "/api/copy": ("source", MODEL), "/api/create": ("from", MODEL), "/api/push": ("model", MODEL),
    "/v1/embeddings": ("model", EMBED_MODEL), "/api/embed": ("model", EMBED_MODEL),
    "/api/embeddings": ("model", EMBED_MODEL),
}


def steer_to_installed_models(case: Case) -> None:
    """Names an installed model in about half the cases, chosen by the case's content so a replay (or a
    shrink) makes the same choice. Only a field that is already a string is replaced: a wrongly typed one is
    the invalid input under test."""
    body = case.body
    if case.operation.path == "/v1/models/{name}" and isinstance(case.path_parameters, dict):
        if zlib.crc32(repr(case.path_parameters).encode()) % 2:
            case.path_parameters["name"] = MODEL
        return
    field, model = STEER.get(case.operation.path, ("", ""))
    if isinstance(body, dict) and isinstance(body.get(field), str):
        if zlib.crc32(json.dumps(body, sort_keys=True, default=repr).encode()) % 2:
            body[field] = model
            if case.operation.path == "/api/create" and body.get("model") is None and body.get("name") is None:
                body["model"] = "fuzz-created"  # a create needs a name to create


def bound_generation(case: Case) -> None:
    """Caps what a valid request could make the model generate, leaving every invalid value to be rejected."""
    body = case.body
    if not isinstance(body, dict):
        return
    path = case.operation.path
    if path in ("/v1/chat/completions", "/v1/completions"):
        keys = [k for k in ("max_tokens", "max_completion_tokens") if k in body] or ["max_tokens"]
        for key in keys:
            body[key] = _cap(body.get(key, TOKEN_CAP), TOKEN_CAP)
        for key in ("n", "best_of"):
            if key in body:
                body[key] = _cap(body[key], N_CAP)
    elif path in ("/api/generate", "/api/chat"):
        options = body.get("options")
        if options is None:
            body["options"] = {"num_predict": TOKEN_CAP}
        elif isinstance(options, dict):
            # Ollama's num_predict: -1 is "no limit" and -2 "fill the context".
            options["num_predict"] = _cap(options.get("num_predict", TOKEN_CAP), TOKEN_CAP, unbounded=(-1, -2))


def check_error_shape(case: Case, body: Any) -> None:
    """The documented envelope of the route's API, with a message a person can act on."""
    curl = case.as_curl_command()
    if case.operation.path.startswith("/v1"):
        assert isinstance(body, dict) and set(body) == {"error"}, f"not an OpenAI error envelope: {body!r}\n{curl}"
        error = body["error"]
        assert isinstance(error, dict) and set(error) == {"message", "type", "param", "code"}, f"{body!r}\n{curl}"
        assert isinstance(error["message"], str) and error["message"], f"{body!r}\n{curl}"
        assert isinstance(error["type"], str) and error["type"], f"{body!r}\n{curl}"
        assert error["param"] is None or isinstance(error["param"], str), f"{body!r}\n{curl}"
        assert error["code"] is None or isinstance(error["code"], str), f"{body!r}\n{curl}"
    else:
        assert isinstance(body, dict) and set(body) == {"error"}, f"not an Ollama error envelope: {body!r}\n{curl}"
        assert isinstance(body["error"], str) and body["error"], f"{body!r}\n{curl}"


def check_stream(case: Case, content_type: str, text: str) -> None:
    """A streamed answer is whole lines or events, and an error in it is the last one, in the documented shape."""
    curl = case.as_curl_command()
    if content_type.startswith("application/x-ndjson"):
        assert text.endswith("\n"), f"the stream ended inside a line: {text[-300:]!r}\n{curl}"
        items = [json.loads(line) for line in text.removesuffix("\n").split("\n")]
    elif content_type.startswith("text/event-stream"):
        assert text.endswith("\n\n"), f"the stream ended inside an event: {text[-300:]!r}\n{curl}"
        events = text.removesuffix("\n\n").split("\n\n")
        assert all(e.startswith("data: ") for e in events), f"{text[:300]!r}\n{curl}"
        if events[-1] == "data: [DONE]":
            events.pop()
        items = [json.loads(e.removeprefix("data: ")) for e in events]
    else:
        return
    errors = [i for i, item in enumerate(items) if isinstance(item, dict) and "error" in item]
    assert errors in ([], [len(items) - 1]), f"an error that is not the last item: {text[:500]!r}\n{curl}"
    if errors:
        check_error_shape(case, items[-1])
        assert not text.endswith("data: [DONE]\n\n"), f"[DONE] after an error\n{curl}"


def _openapi() -> dict[str, Any]:
    """The schema the server serves, built in-process: pytest parametrizes at collection, before any server runs
    (schemathesis's fixture-based loader does not work with pytest 9). A test below checks it is the served one."""
    return create_app(Settings.from_env({})).openapi()


schema = schemathesis.openapi.from_dict(_openapi())
schema.config.update(request_timeout=REQUEST_TIMEOUT)
schema.config.generation.update(max_examples=MAX_EXAMPLES, deterministic=True, database="none")
schema.config.phases.update(phases=["examples", "coverage", "fuzzing"])


def test_the_fuzzed_schema_is_the_served_one(fuzz_server: Server) -> None:
    import httpx

    assert httpx.get(fuzz_server.url + "/openapi.json").json() == _openapi()


BIG = "9" * 5000  # more digits than int() converts from text
MESSAGES = [{"role": "user", "content": "hi"}]


def _schema_format(schema: dict[str, Any]) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}


# Requests that answered 500 ("internal error: ValueError") until the fix each one led to; now each is a 400
# whose message says what is wrong.
FOUND_BY_FUZZING = [
    ("/api/generate", {"model": MODEL, "prompt": "hi", "options": {"seed": BIG}}, "5000 digits"),
    ("/api/create", {"model": "fuzz-big", "from": MODEL, "parameters": {"seed": BIG}}, "5000 digits"),
    ("/api/embed", {"model": EMBED_MODEL, "input": "x", "options": {"num_ctx": BIG}}, "5000 digits"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 1, "logit_bias": {BIG: 1}}, "token ids"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 1, "logit_bias": {"²": 1}}, "token ids"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 1, "logit_bias": {"--5": 1}}, "token ids"),
    ("/v1/chat/completions", {"model": MODEL, "messages": MESSAGES, "max_tokens": 1,
                              "response_format": _schema_format({"type": "string", "pattern": "a{" + BIG + "}"})},
     "unsupported repetition count"),
    ("/v1/chat/completions", {"model": MODEL, "messages": MESSAGES, "max_tokens": 1, "response_format": _schema_format(
        {"type": "array", "prefixItems": [{"type": "string"}], "items": {"$ref": "#/prefixItems/²"}})},
     "points at nothing"),
]


@pytest.mark.parametrize(("path", "body", "message"), FOUND_BY_FUZZING)
def test_inputs_that_once_crashed_are_refused(fuzz_server: Server, path: str, body: dict[str, Any],
                                              message: str) -> None:
    import httpx

    response = httpx.post(fuzz_server.url + path, json=body, timeout=REQUEST_TIMEOUT)
    assert response.status_code == 400, response.text[:300]
    error = response.json()["error"]
    assert message in (error["message"] if path.startswith("/v1") else error), error


def test_a_keep_alive_beyond_the_calendar_lists_as_forever(fuzz_server: Server) -> None:
    """/api/ps answered 500 for good once any request had set a keep_alive past year 9999 (1e300 seconds)."""
    import httpx

    with httpx.Client(base_url=fuzz_server.url, timeout=REQUEST_TIMEOUT) as http:
        assert http.post("/api/embed", json={"model": EMBED_MODEL, "input": "x", "keep_alive": 1e300}).status_code == 200
        response = http.get("/api/ps")
        assert response.status_code == 200, response.text
        expiry = {m["name"]: m["expires_at"] for m in response.json()["models"]}
        assert expiry[f"{EMBED_MODEL}:latest"] == "2318-11-26T00:00:00Z"  # Ollama's "never"
        assert http.post("/api/embed", json={"model": EMBED_MODEL, "keep_alive": 0}).status_code == 200


@schema.parametrize()
def test_fuzz_no_server_errors_and_documented_error_shapes(case: Case, fuzz_server: Server) -> None:
    RUN.setdefault("start", time.monotonic())
    steer_to_installed_models(case)
    bound_generation(case)
    started = time.monotonic()
    response = case.call(base_url=fuzz_server.url, timeout=REQUEST_TIMEOUT)
    RUN["end"] = time.monotonic()
    status = response.status_code
    op = case.operation
    SEEN[f"{op.method.upper()} {op.path}"][status] += 1
    SECONDS[f"{op.method.upper()} {op.path}"] += RUN["end"] - started
    SLOWEST.append((RUN["end"] - started, f"{case.method.upper()} {case.formatted_path} {case.body!r:.200}"))
    SLOWEST.sort(reverse=True)
    del SLOWEST[3:]
    curl = case.as_curl_command()
    if status >= 500:
        assert status in ALLOWED_5XX.get((op.method.upper(), op.path), ()), (
            f"{status} from {op.method.upper()} {op.path}: {response.text[:500]}\n{curl}")
        assert "registry" in response.json()["error"], response.text
    if status >= 400 and case.method.upper() != "HEAD":
        try:
            body = response.json()
        except ValueError:
            raise AssertionError(f"{status} with a body that is not JSON: {response.text[:300]!r}\n{curl}") from None
        check_error_shape(case, body)
    elif status == 200:
        content_type = response.headers.get("content-type") or [""]  # schemathesis keeps every value, in a list
        check_stream(case, content_type[0], response.text)


def test_fuzz_left_a_working_server(fuzz_server: Server) -> None:
    """Whatever the fuzzer left behind (odd keep-alives, copies, failed pulls) does not break the listings, and
    the bundled model still answers."""
    import httpx

    with httpx.Client(base_url=fuzz_server.url, timeout=REQUEST_TIMEOUT) as http:
        for path in ("/api/ps", "/api/tags", "/v1/models", "/api/version"):
            response = http.get(path)
            assert response.status_code == 200, f"{path}: {response.status_code} {response.text[:300]}"
        names = [m["name"] for m in http.get("/api/tags").json()["models"]]
        assert f"{MODEL}" in names or f"{MODEL}:latest" in names, names
        reply = http.post("/api/generate", json={"model": MODEL, "prompt": "Hi", "stream": False,
                                                 "options": {"num_predict": 2}})
        assert reply.status_code == 200 and reply.json()["done"] is True, reply.text


def test_fuzz_reached_every_route_with_bad_input() -> None:
    """Every operation was called, and every one that takes input also refused some of it with a 4xx."""
    spec = _openapi()
    operations = {f"{method.upper()} {path}": op for path, ops in spec["paths"].items() for method, op in ops.items()}
    total = sum(sum(c.values()) for c in SEEN.values())
    print(f"\nfuzzed {total} requests over {len(SEEN)} operations in {RUN['end'] - RUN['start']:.1f}s")
    for label in sorted(SEEN):
        print(f"  {label}: {SECONDS[label]:.1f}s {dict(sorted(SEEN[label].items()))}")
    for seconds, request in SLOWEST:
        print(f"  slow: {seconds:.1f}s {request}")
    assert set(SEEN) == set(operations), f"never called: {sorted(set(operations) - set(SEEN))}"
    for label, op in operations.items():
        assert set(SEEN[label]) - {405}, f"{label} was only called with other methods: {dict(SEEN[label])}"
        takes_input = "requestBody" in op or any(p["in"] == "path" for p in op.get("parameters", []))
        if takes_input:
            assert set(SEEN[label]) & {400, 404, 422}, f"{label} never refused input: {dict(SEEN[label])}"
