"""Pull and push against a real registry (Debian's docker-registry), plus a mock one for token auth and Range."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import httpx
import pytest
from registry_fixture import registry, registry_storage  # noqa: F401

from corral.store import registry as reg
from corral.store.names import Name
from corral.store.registry import RegistryError, pull, push
from corral.store.store import (
    CONFIG_MEDIA_TYPE,
    MODEL_MEDIA_TYPE,
    PARAMS_MEDIA_TYPE,
    Manifest,
    Store,
)

MiB = 1 << 20


def make_model(store: Store, name: Name, size: int = 4 * MiB) -> Manifest:
    """A fake model: random weights, a params layer and a config blob, all unique to this call."""
    salt = os.urandom(8).hex()
    model = store.put_bytes(os.urandom(size), MODEL_MEDIA_TYPE)
    params = store.put_json({"temperature": 0.5, "salt": salt}, PARAMS_MEDIA_TYPE)
    config = store.put_json({"model_format": "gguf", "model_family": "test", "salt": salt}, CONFIG_MEDIA_TYPE)
    manifest = Manifest(config=config, layers=[model, params])
    store.write_manifest(name, manifest)
    return manifest


class Events:
    def __init__(self) -> None:
        self.items: list[dict] = []

    async def __call__(self, event: dict) -> None:
        self.items.append(dict(event))

    def statuses(self) -> list[str]:
        return [e["status"] for e in self.items]


def check_layer_events(events: list[dict], manifest: Manifest, verb: str) -> None:
    """Each blob's events name it, never go backwards, and end complete."""
    blobs = {layer.digest: layer.size for layer in [*manifest.layers, manifest.config]}
    seen: dict[str, int] = {}
    for event in events:
        digest = event["digest"]
        assert event["status"] == f"{verb} {digest[7:19]}"
        assert event["total"] == blobs[digest]
        assert seen.get(digest, 0) <= event["completed"] <= event["total"]
        seen[digest] = event["completed"]
    assert seen == blobs


def leftovers(store: Store) -> list[str]:
    return sorted(p.name for p in store.blobs.iterdir() if "partial" in p.name or p.name.startswith(".tmp-"))


def registry_blob(storage: Path, digest: str) -> Path:
    hexpart = digest.partition(":")[2]
    return storage / "docker/registry/v2/blobs/sha256" / hexpart[:2] / hexpart / "data"


class ShapedTransport(httpx.AsyncBaseTransport):
    """The real network, with blob downloads counted and optionally slowed down."""

    def __init__(self, delay: float = 0.0) -> None:
        self.inner = httpx.AsyncHTTPTransport()
        self.delay = delay
        self.blob_bytes = 0
        self.ranges: list[str] = []
        self.methods: list[str] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.methods.append(request.method)
        response = await self.inner.handle_async_request(request)
        if request.method != "GET" or "/blobs/" not in request.url.path:
            return response
        self.ranges.append(request.headers.get("range", ""))
        outer, inner = self, response.stream

        class Counted(httpx.AsyncByteStream):
            async def __aiter__(self):
                async for chunk in inner:
                    if outer.delay:
                        await asyncio.sleep(outer.delay)
                    outer.blob_bytes += len(chunk)
                    yield chunk

            async def aclose(self) -> None:
                await inner.aclose()

        return httpx.Response(response.status_code, headers=response.headers, stream=Counted(),
                              extensions=response.extensions)

    async def aclose(self) -> None:
        await self.inner.aclose()


def use_transport(monkeypatch: pytest.MonkeyPatch, transport: httpx.AsyncBaseTransport) -> None:
    monkeypatch.setattr(reg, "_make_client", lambda parallel: httpx.AsyncClient(
        transport=transport, follow_redirects=True, timeout=30))


@pytest.fixture
def stores(tmp_path: Path) -> tuple[Store, Store]:
    return Store(tmp_path / "source"), Store(tmp_path / "target")


def test_push_then_pull_round_trip(registry: str, stores: tuple[Store, Store]) -> None:
    source, target = stores
    name = Name.parse(f"{registry}/team/roundtrip:v1")
    manifest = make_model(source, name, size=5 * MiB + 123)

    pushed = Events()
    asyncio.run(push(source, name, insecure=True, progress=pushed))
    statuses = pushed.statuses()
    assert statuses[0] == "retrieving manifest" and statuses[-2:] == ["pushing manifest", "success"]
    check_layer_events(pushed.items[1:-2], manifest, "pushing")

    pulled = Events()
    result = asyncio.run(pull(target, name, insecure=True, progress=pulled, chunk_size=MiB, parallel=3))
    assert result == manifest
    statuses = pulled.statuses()
    assert statuses[0] == "pulling manifest"
    assert statuses[-3:] == ["verifying sha256 digest", "writing manifest", "success"]
    check_layer_events(pulled.items[1:-3], manifest, "pulling")

    assert target.find(name).path.read_bytes() == source.find(name).path.read_bytes()
    for layer in [*manifest.layers, manifest.config]:
        data = target.read_blob(layer.digest)
        assert "sha256:" + hashlib.sha256(data).hexdigest() == layer.digest
        assert data == source.read_blob(layer.digest)
    assert leftovers(target) == []
    assert [e.name.key() for e in target.list()] == [name.key()]

    # Again: nothing is fetched, every blob is reported complete; a second push uploads nothing.
    again = Events()
    asyncio.run(pull(target, name, insecure=True, progress=again))
    assert all(e["completed"] == e["total"] for e in again.items if "digest" in e)
    repush = Events()
    asyncio.run(push(source, name, insecure=True, progress=repush))
    layer_events = [e for e in repush.items if "digest" in e]
    assert len(layer_events) == 3 and all(e["completed"] == e["total"] for e in layer_events)


def test_pull_uses_parallel_ranges(registry: str, stores: tuple[Store, Store], monkeypatch) -> None:
    source, target = stores
    name = Name.parse(f"{registry}/team/ranged:latest")
    manifest = make_model(source, name, size=3 * MiB + 5)
    asyncio.run(push(source, name, insecure=True))
    transport = ShapedTransport()
    use_transport(monkeypatch, transport)
    asyncio.run(pull(target, name, insecure=True, chunk_size=MiB, parallel=4))
    assert target.read_blob(manifest.layers[0].digest) == source.read_blob(manifest.layers[0].digest)
    size = manifest.layers[0].size
    assert {f"bytes={i * MiB}-{min(size, (i + 1) * MiB) - 1}" for i in range(4)} <= set(transport.ranges)
    assert transport.blob_bytes == sum(layer.size for layer in [*manifest.layers, manifest.config])


def test_cancelled_pull_resumes(registry: str, stores: tuple[Store, Store], monkeypatch) -> None:
    source, target = stores
    name = Name.parse(f"{registry}/team/resume:latest")
    manifest = make_model(source, name, size=4 * MiB)
    model = manifest.layers[0]
    asyncio.run(push(source, name, insecure=True))

    slow = ShapedTransport(delay=0.05)
    use_transport(monkeypatch, slow)

    async def interrupted() -> None:
        started = asyncio.Event()

        async def watch(event: dict) -> None:
            if event.get("digest") == model.digest and event["completed"] >= MiB:
                started.set()

        task = asyncio.create_task(pull(target, name, insecure=True, progress=watch, chunk_size=MiB, parallel=2))
        await asyncio.wait_for(started.wait(), 30)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(interrupted())
    assert target.find(name) is None and target.list() == []
    partial = target.blob_path(model.digest).with_name(target.blob_path(model.digest).name + "-partial")
    state = json.loads(partial.with_name(partial.name + ".json").read_text())
    done = sum(part["completed"] for part in state["parts"])
    assert MiB <= done < model.size
    assert not target.blob_path(model.digest).exists()

    counting = ShapedTransport()
    use_transport(monkeypatch, counting)
    events = Events()
    asyncio.run(pull(target, name, insecure=True, progress=events, chunk_size=MiB, parallel=2))
    first = next(e for e in events.items if e.get("digest") == model.digest)
    assert first["completed"] == done  # the resumed pull starts from what was saved
    model_bytes = counting.blob_bytes - sum(layer.size for layer in manifest.layers[1:] + [manifest.config])
    assert model_bytes <= model.size - done
    assert target.read_blob(model.digest) == source.read_blob(model.digest)
    assert target.find(name) is not None and leftovers(target) == []


KILLED_PULL = textwrap.dedent(
    """
    import asyncio, sys
    import httpx
    from corral.store import registry as reg
    from corral.store.names import Name
    from corral.store.store import Store

    class Slow(httpx.AsyncBaseTransport):
        def __init__(self):
            self.inner = httpx.AsyncHTTPTransport()
        async def handle_async_request(self, request):
            response = await self.inner.handle_async_request(request)
            inner = response.stream
            class Trickle(httpx.AsyncByteStream):
                async def __aiter__(self):
                    async for chunk in inner:
                        for i in range(0, len(chunk), 16384):
                            await asyncio.sleep(0.03)
                            yield chunk[i:i + 16384]
                async def aclose(self):
                    await inner.aclose()
            return httpx.Response(response.status_code, headers=response.headers, stream=Trickle(),
                                  extensions=response.extensions)

    reg._make_client = lambda parallel: httpx.AsyncClient(transport=Slow(), follow_redirects=True)
    asyncio.run(reg.pull(Store(sys.argv[1]), Name.parse(sys.argv[2]), insecure=True, chunk_size=1 << 20, parallel=2))
    """
)


def test_killed_pull_resumes(registry: str, stores: tuple[Store, Store], monkeypatch) -> None:
    source, target = stores
    name = Name.parse(f"{registry}/team/killed:latest")
    manifest = make_model(source, name, size=4 * MiB)
    model = manifest.layers[0]
    asyncio.run(push(source, name, insecure=True))

    final = target.blob_path(model.digest)
    state_path = final.with_name(final.name + "-partial.json")
    child = subprocess.Popen([sys.executable, "-c", KILLED_PULL, str(target.root), str(name)])
    try:
        deadline = time.monotonic() + 60
        done = 0
        while done < MiB // 2:
            assert child.poll() is None, "the pull finished before it could be killed"
            assert time.monotonic() < deadline
            time.sleep(0.05)
            try:
                done = sum(part["completed"] for part in json.loads(state_path.read_text())["parts"])
            except (OSError, ValueError):
                pass
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
    assert target.list() == [] and not final.exists()

    counting = ShapedTransport()
    use_transport(monkeypatch, counting)
    events = Events()
    asyncio.run(pull(target, name, insecure=True, progress=events, chunk_size=MiB, parallel=2))
    first = next(e for e in events.items if e.get("digest") == model.digest)
    assert first["completed"] >= done
    assert counting.blob_bytes <= model.size - done + sum(layer.size for layer in manifest.layers[1:] + [manifest.config])
    assert target.read_blob(model.digest) == source.read_blob(model.digest)
    assert leftovers(target) == []


def test_corrupted_blob_is_refused(registry: str, registry_storage: Path, stores: tuple[Store, Store]) -> None:
    source, target = stores
    name = Name.parse(f"{registry}/team/corrupt:latest")
    manifest = make_model(source, name, size=2 * MiB)
    model = manifest.layers[0]
    asyncio.run(push(source, name, insecure=True))
    stored = registry_blob(registry_storage, model.digest)
    data = bytearray(stored.read_bytes())
    data[12345] ^= 0xFF  # same size, one byte flipped: only the digest can tell
    stored.write_bytes(bytes(data))

    events = Events()
    with pytest.raises(RegistryError, match="digest mismatch") as caught:
        asyncio.run(pull(target, name, insecure=True, progress=events, chunk_size=MiB))
    assert model.digest in str(caught.value)
    assert "writing manifest" not in events.statuses()
    assert target.find(name) is None and target.list() == []
    assert not target.blob_path(model.digest).exists()
    assert leftovers(target) == []


def test_missing_tag_and_missing_model(registry: str, stores: tuple[Store, Store]) -> None:
    source, target = stores
    name = Name.parse(f"{registry}/team/nothing-here:v9")
    with pytest.raises(RegistryError, match=r"model '.*team/nothing-here:v9' not found in registry .*404"):
        asyncio.run(pull(target, name, insecure=True))
    assert target.list() == []
    with pytest.raises(RegistryError, match=r"model '.*nothing-here:v9' not found in the store"):
        asyncio.run(push(source, name, insecure=True))


def test_unreachable_registry(stores: tuple[Store, Store]) -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(RegistryError, match=f"registry unreachable: http://127.0.0.1:{port}"):
        asyncio.run(pull(stores[1], Name.parse(f"127.0.0.1:{port}/team/model"), insecure=True))


def test_pull_of_new_version_prunes_replaced_layers(registry: str, stores: tuple[Store, Store]) -> None:
    source, target = stores
    name = Name.parse(f"{registry}/team/versions:latest")
    other = Name.parse(f"{registry}/team/other:latest")
    first = make_model(source, name, size=MiB)
    asyncio.run(push(source, name, insecure=True))
    asyncio.run(pull(target, name, insecure=True))
    target.write_manifest(other, Manifest(config=first.config, layers=first.layers[1:]))  # shares params+config

    second = make_model(source, name, size=MiB)
    asyncio.run(push(source, name, insecure=True))
    asyncio.run(pull(target, name, insecure=True))
    assert not target.blob_path(first.layers[0].digest).exists()  # only the old version used it
    assert target.blob_path(first.layers[1].digest).exists() and target.blob_path(first.config.digest).exists()
    for layer in [*second.layers, second.config]:
        assert target.blob_path(layer.digest).exists()


def test_store_gc_and_stale_temp_files(stores: tuple[Store, Store]) -> None:
    store = stores[0]
    manifest = make_model(store, Name.parse("kept"), size=1000)
    orphan = store.put_bytes(b"orphan", MODEL_MEDIA_TYPE)
    partial = store.blobs / ("sha256-" + "0" * 64 + "-partial")
    partial.write_bytes(b"x")
    assert store.referenced_blobs() == {manifest.config.digest, *(layer.digest for layer in manifest.layers)}
    assert store.remove_unreferenced_blobs() == [orphan.digest]
    assert partial.exists() and all(store.blob_path(d).exists() for d in store.referenced_blobs())

    old, new = store.blobs / ".tmp-old", store.manifests / ".tmp-new"
    old.write_bytes(b"")
    new.write_bytes(b"")
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    assert store.remove_stale_temp_files() == 1
    assert not old.exists() and new.exists()


# -- a mock registry: bearer tokens, relative upload locations, a server that ignores Range ------------------


class MockRegistry:
    def __init__(self, *, require_token: bool = True, honour_range: bool = True) -> None:
        self.require_token = require_token
        self.honour_range = honour_range
        self.blobs: dict[str, bytes] = {}
        self.manifests: dict[str, bytes] = {}
        self.uploads: dict[str, bytearray] = {}
        self.token_requests: list[dict[str, str]] = []
        self.log: list[tuple[str, str, str | None]] = []

    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self.handle)

    async def handle(self, request: httpx.Request) -> httpx.Response:
        body = await request.aread()
        path = request.url.path
        self.log.append((request.method, path, request.headers.get("authorization")))
        if request.url.host == "auth.test":
            self.token_requests.append(dict(request.url.params))
            return httpx.Response(200, json={"access_token": "token-for-" + request.url.params["scope"]})
        action = "pull" if request.method in ("GET", "HEAD") else "pull,push"
        allowed = {f"Bearer token-for-repository:team/model:{a}" for a in ("pull,push", action)}
        if self.require_token and request.headers.get("authorization") not in allowed:
            challenge = f'Bearer realm="https://auth.test/token",service="registry.test",scope="repository:team/model:{action}"'
            return httpx.Response(401, headers={"WWW-Authenticate": challenge}, json={"errors": []})
        prefix = "/v2/team/model/"
        assert path.startswith(prefix), path
        rest = path[len(prefix):]
        if rest.startswith("manifests/"):
            tag = rest.split("/", 1)[1]
            if request.method == "PUT":
                self.manifests[tag] = body
                return httpx.Response(201)
            if tag not in self.manifests:
                return httpx.Response(404, json={"errors": [{"code": "MANIFEST_UNKNOWN"}]})
            return httpx.Response(200, content=self.manifests[tag],
                                  headers={"Content-Type": "application/vnd.docker.distribution.manifest.v2+json"})
        if rest == "blobs/uploads/" and request.method == "POST":
            upload = f"u{len(self.uploads)}"
            self.uploads[upload] = bytearray()
            return httpx.Response(202, headers={"Location": f"/v2/team/model/blobs/uploads/{upload}?_state=a%3Db"})
        if rest.startswith("blobs/uploads/"):
            upload = rest.rsplit("/", 1)[1]
            assert request.url.params["_state"] == "a=b"
            self.uploads[upload] += body
            if request.method == "PATCH":
                return httpx.Response(202, headers={"Location": f"/v2/team/model/blobs/uploads/{upload}?_state=a%3Db"})
            digest = request.url.params["digest"]
            data = bytes(self.uploads.pop(upload))
            assert "sha256:" + hashlib.sha256(data).hexdigest() == digest
            self.blobs[digest] = data
            return httpx.Response(201)
        if rest.startswith("blobs/"):
            digest = rest.split("/", 1)[1]
            if digest not in self.blobs:
                return httpx.Response(404)
            data = self.blobs[digest]
            if request.method == "HEAD":
                return httpx.Response(200, headers={"Content-Length": str(len(data))})
            wanted = request.headers.get("range")
            if wanted and self.honour_range:
                start, end = (int(x) for x in wanted.removeprefix("bytes=").split("-"))
                return httpx.Response(206, content=data[start:end + 1],
                                      headers={"Content-Range": f"bytes {start}-{end}/{len(data)}"})
            return httpx.Response(200, content=data)
        return httpx.Response(400)


def test_bearer_token_challenge(stores: tuple[Store, Store], monkeypatch) -> None:
    source, target = stores
    name = Name.parse("registry.test/team/model:v1")
    manifest = make_model(source, name, size=300_000)
    mock = MockRegistry(require_token=True)
    use_transport(monkeypatch, mock.transport())

    asyncio.run(push(source, name))
    assert mock.manifests["v1"] == source.find(name).path.read_bytes()
    assert {"service": "registry.test", "scope": "repository:team/model:pull"} in mock.token_requests
    assert {"service": "registry.test", "scope": "repository:team/model:pull,push"} in mock.token_requests
    registry_log = [entry for entry in mock.log if entry[1].startswith("/v2/")]
    assert registry_log[0][2] is None  # the first request goes out bare and is answered with the challenge
    assert registry_log[1][2] == "Bearer token-for-repository:team/model:pull"
    assert registry_log[-1] == ("PUT", "/v2/team/model/manifests/v1", "Bearer token-for-repository:team/model:pull,push")

    mock.token_requests.clear()
    asyncio.run(pull(target, name, chunk_size=100_000))
    assert mock.token_requests == [{"service": "registry.test", "scope": "repository:team/model:pull"}]
    assert target.find(name).path.read_bytes() == mock.manifests["v1"]
    assert target.read_blob(manifest.layers[0].digest) == source.read_blob(manifest.layers[0].digest)


def test_server_ignoring_range_falls_back_to_one_stream(stores: tuple[Store, Store], monkeypatch) -> None:
    source, target = stores
    name = Name.parse("registry.test/team/model:latest")
    manifest = make_model(source, name, size=500_000)
    mock = MockRegistry(require_token=False, honour_range=False)
    use_transport(monkeypatch, mock.transport())
    asyncio.run(push(source, name))
    asyncio.run(pull(target, name, chunk_size=64_000, parallel=4))
    assert target.read_blob(manifest.layers[0].digest) == source.read_blob(manifest.layers[0].digest)
    assert leftovers(target) == []


def test_bad_token_response_is_a_clear_error(stores: tuple[Store, Store], monkeypatch) -> None:
    async def handler(request: httpx.Request) -> httpx.Response:
        if request.url.host == "auth.test":
            return httpx.Response(403, text="denied")
        return httpx.Response(401, headers={"WWW-Authenticate": 'Bearer realm="https://auth.test/token",service="x"'})

    use_transport(monkeypatch, httpx.MockTransport(handler))
    with pytest.raises(RegistryError, match="token request to https://auth.test/token returned 403"):
        asyncio.run(pull(stores[1], Name.parse("registry.test/team/model")))


def test_push_in_several_chunks(registry: str, stores: tuple[Store, Store], monkeypatch) -> None:
    source, target = stores
    name = Name.parse(f"{registry}/team/chunked:latest")
    manifest = make_model(source, name, size=3 * MiB + 17)
    monkeypatch.setattr(reg, "_UPLOAD_CHUNK", MiB)  # four PATCH requests for the model layer
    transport = ShapedTransport()
    use_transport(monkeypatch, transport)
    asyncio.run(push(source, name, insecure=True))
    assert transport.methods.count("PATCH") == 4 + 2 and transport.methods.count("POST") == 3
    asyncio.run(pull(target, name, insecure=True))
    assert target.read_blob(manifest.layers[0].digest) == source.read_blob(manifest.layers[0].digest)


def test_concurrent_pulls_of_one_model_share_the_download(registry: str, stores: tuple[Store, Store],
                                                          monkeypatch) -> None:
    source, target = stores
    name = Name.parse(f"{registry}/team/together:latest")
    manifest = make_model(source, name, size=2 * MiB)
    asyncio.run(push(source, name, insecure=True))
    counting = ShapedTransport(delay=0.005)
    use_transport(monkeypatch, counting)

    async def both() -> list[Manifest]:
        return await asyncio.gather(*(pull(target, name, insecure=True, chunk_size=MiB // 2) for _ in range(2)))

    assert asyncio.run(both()) == [manifest, manifest]
    assert counting.blob_bytes == sum(layer.size for layer in [*manifest.layers, manifest.config])
    assert target.read_blob(manifest.layers[0].digest) == source.read_blob(manifest.layers[0].digest)
    assert leftovers(target) == []
