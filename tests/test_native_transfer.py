"""push and pull through the server and the CLI against a real registry (Debian's docker-registry)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import httpx
import pytest
from openai import OpenAI

from conftest import MODEL, start_server, stop_server
from registry_fixture import registry, registry_storage  # noqa: F401


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """Two servers with separate stores: one pushes, the other starts empty (no bundled model) and pulls."""
    root = tmp_path_factory.mktemp("transfer")
    source = start_server(root / "a", root / "a.log")
    empty = start_server(root / "b", root / "b.log", CORRAL_NO_BUNDLED="1")
    yield source, empty
    stop_server(source)
    stop_server(empty)


def corral(server, *args, check=True):
    env = {**os.environ, "CORRAL_HOST": server.url.removeprefix("http://")}
    out = subprocess.run([sys.executable, "-m", "corral", *args], env=env, capture_output=True, text=True,
                         timeout=300)
    if check:
        assert out.returncode == 0, out.stderr
    return out


def manifest_bytes(server, name_parts):
    return (server.models_dir / "manifests").joinpath(*name_parts).read_bytes()


def test_push_then_pull_into_an_empty_store_serves_chat(pair, registry):
    source, empty = pair
    target = f"{registry}/team/smol:v1"
    corral(source, "cp", MODEL, target)
    corral(source, "push", target, "--insecure")
    assert httpx.get(empty.url + "/api/tags").json()["models"] == []

    r = httpx.post(empty.url + "/api/pull", json={"model": target, "insecure": True}, timeout=300)
    statuses = [json.loads(line) for line in r.text.splitlines()]
    assert statuses[0] == {"status": "pulling manifest"}
    assert [s["status"] for s in statuses[-3:]] == ["verifying sha256 digest", "writing manifest", "success"]
    layer = next(s for s in statuses if s.get("digest") and s.get("total", 0) > 10**7)
    assert layer["status"].startswith("pulling ")

    parts = (registry, "team", "smol", "v1")
    assert manifest_bytes(empty, parts) == manifest_bytes(source, parts)
    for blob in (empty.models_dir / "blobs").iterdir():
        assert (source.models_dir / "blobs" / blob.name).read_bytes() == blob.read_bytes()

    client = OpenAI(base_url=empty.url + "/v1/", api_key="x", max_retries=0)
    reply = client.chat.completions.create(model=target, messages=[{"role": "user", "content": "Hi"}],
                                           temperature=0, max_tokens=5)
    assert reply.choices[0].message.content


def test_cli_pull_shows_progress_and_missing_things_are_clear(pair, registry):
    source, empty = pair
    out = corral(empty, "pull", f"{registry}/team/smol:v1", "--insecure")
    assert "success" in out.stdout
    out = corral(empty, "pull", f"{registry}/team/nothing:here", "--insecure", check=False)
    assert out.returncode == 1 and "not found" in out.stderr
    out = corral(source, "push", f"{registry}/team/never-created:v1", "--insecure", check=False)
    assert out.returncode == 1 and "not found" in out.stderr
    r = httpx.post(empty.url + "/api/pull", json={"model": f"{registry}/team/nothing:here", "insecure": True,
                                                   "stream": False}, timeout=60)
    assert r.status_code == 404 and "not found" in r.json()["error"]


def test_server_killed_mid_pull_lists_nothing_and_a_second_pull_resumes(tmp_path, pair, registry):
    source, _ = pair
    target = f"{registry}/team/resume:v1"
    corral(source, "cp", MODEL, target)
    corral(source, "push", target, "--insecure")
    models = tmp_path / "models"
    server = start_server(models, tmp_path / "s.log", CORRAL_NO_BUNDLED="1")
    try:
        with httpx.stream("POST", server.url + "/api/pull", json={"model": target, "insecure": True},
                          timeout=60) as r:
            for line in r.iter_lines():
                update = json.loads(line)
                if update.get("completed", 0) > 0 and update.get("total", 0) > 10**7:
                    break
        server.process.send_signal(signal.SIGKILL)
        server.process.wait()
    finally:
        stop_server(server)
    assert any(p.name.endswith("-partial") for p in (models / "blobs").iterdir())
    server = start_server(models, tmp_path / "s2.log", CORRAL_NO_BUNDLED="1")
    try:
        assert httpx.get(server.url + "/api/tags").json()["models"] == []  # nothing half-pulled is listed
        r = httpx.post(server.url + "/api/pull", json={"model": target, "insecure": True, "stream": False},
                       timeout=300)
        assert r.json() == {"status": "success"}
        assert [m["name"] for m in httpx.get(server.url + "/api/tags").json()["models"]] == [
            "127.0.0.1:" + registry.split(":")[1] + "/team/resume:v1"]
        assert not any(p.name.endswith("-partial") for p in (models / "blobs").iterdir())
    finally:
        stop_server(server)
