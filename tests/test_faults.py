"""Faults (issue 9, item 6): streams abandoned mid-generation, a server killed with SIGKILL in the middle of a
pull, a create and a copy, and model files damaged on disk.

Every server here is a real `corral serve` on its own port and store. Kills are SIGKILL, so nothing in the
server gets to clean up: what the next start finds is what a crash would leave.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from conftest import MODEL, NUM_PARALLEL, Server, start_server, stop_server
from registry_fixture import registry, registry_storage  # noqa: F401
from vision_fixture import write_language_model, write_projector

from corral.store.gguf_check import GGUFError, check_gguf
from corral.store.store import Store

NO_EOS = {"0": -100, "2": -100}  # SmolLM2's <|endoftext|> and <|im_end|>: a stream runs until it is stopped


# -- helpers ---------------------------------------------------------------------------------------------


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def temp_files(models: Path) -> list[Path]:
    return list(models.rglob(".tmp-*"))


def temp_bytes(models: Path) -> int:
    """The most bytes any one temporary file holds now (they come and go while a server writes)."""
    sizes = [0]
    for path in temp_files(models):
        try:
            sizes.append(path.stat().st_size)
        except FileNotFoundError:
            pass
    return max(sizes)


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def upload(url: str, data: bytes) -> str:
    digest = digest_of(data)
    r = httpx.post(f"{url}/api/blobs/{digest}", content=data, timeout=120)
    assert r.status_code == 201, r.text
    return digest


def create(url: str, name: str, digest: str) -> httpx.Response:
    return httpx.post(url + "/api/create", json={"model": name, "files": {"model.gguf": digest}, "stream": False},
                      timeout=120)


def tags(url: str) -> list[str]:
    return sorted(m["name"] for m in httpx.get(url + "/api/tags", timeout=30).json()["models"])


def kill(server: Server) -> None:
    server.process.send_signal(signal.SIGKILL)
    server.process.wait()


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory, gguf_path) -> bytes:
    """A small, valid llama GGUF (random weights, SmolLM2's tokenizer and template): 15 MB to copy around."""
    return write_language_model(tmp_path_factory.mktemp("tiny") / "tiny.gguf", gguf_path).read_bytes()


def variant(data: bytes, k: int) -> bytes:
    """The same model with one low-order weight byte changed: a different blob, still a valid file."""
    changed = bytearray(data)
    changed[-4] ^= k
    return bytes(changed)


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    # One decode thread: two would spin against each other and the test clients on a small shared machine.
    server = start_server(root / "models", root / "server.log", CORRAL_STREAM_INTERVAL_MS="0", CORRAL_NUM_THREADS="1")
    yield server
    stop_server(server)


# -- abandoned streams -----------------------------------------------------------------------------------


def abandon(client: httpx.Client, i: int, chunks: int = 3) -> None:
    """One stream that the client drops after `chunks` content chunks, mid-generation."""
    if i % 2:
        path, body = "/v1/chat/completions", {
            "model": MODEL, "stream": True, "logit_bias": NO_EOS,
            "messages": [{"role": "user", "content": f"Tell me a long story about dragon number {i}."}]}
    else:
        path, body = "/api/chat", {
            "model": MODEL, "options": {"seed": i},
            "messages": [{"role": "user", "content": f"Write the numbers from {i} to {i + 500}, one per line."}]}
    with client.stream("POST", path, json=body) as r:
        assert r.status_code == 200, r.read()
        seen = 0
        for line in r.iter_lines():
            if not line.strip() or line == "data: [DONE]":
                continue
            chunk = json.loads(line.removeprefix("data: "))
            assert "error" not in chunk, chunk
            assert not chunk.get("done") and not (chunk.get("choices") or [{}])[0].get("finish_reason"), \
                "the stream ended before it was abandoned"
            content = chunk["message"]["content"] if "message" in chunk else chunk["choices"][0]["delta"].get("content")
            seen += bool(content)
            if seen >= chunks:
                return  # leaving the block mid-body closes the connection with the generation under way


def abandon_many(url: str, count: int, clients: int = 8) -> None:
    todo = list(range(count))
    errors: list[BaseException] = []
    lock = threading.Lock()

    def worker() -> None:
        with httpx.Client(base_url=url, timeout=30) as client:
            while True:
                with lock:
                    if not todo or errors:
                        return
                    i = todo.pop()
                try:
                    abandon(client, i)
                except BaseException as exc:  # noqa: BLE001 - reported below
                    with lock:
                        errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


def stream_times(url: str, i: int, max_tokens: int, results: list, start: threading.Barrier) -> None:
    body = {"model": MODEL, "stream": True, "max_tokens": max_tokens, "logit_bias": NO_EOS,
            "messages": [{"role": "user", "content": f"Tell me about the number {i}."}]}
    start.wait()
    first = last = None
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=120) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if first is None and line.startswith("data: {") and json.loads(line[6:])["choices"][0]["delta"].get(
                    "content"):
                first = time.monotonic()
            last = line or last
        assert last == "data: [DONE]"
    results.append((first, time.monotonic()))


def test_abandoned_streams_leave_no_busy_slot_and_no_memory_growth(srv):
    pid = srv.process.pid
    abandon_many(srv.url, 16)  # warm-up: the model loads, buffers and caches reach their working size
    time.sleep(0.5)
    before = rss_bytes(pid)
    abandon_many(srv.url, 100)
    time.sleep(0.5)
    after = rss_bytes(pid)

    # The engine stopped generating for all of them: an idle server burns (almost) no CPU, while one slot
    # still decoding would take most of a core.
    time.sleep(0.5)
    cpu = cpu_seconds(pid)
    time.sleep(1.0)
    assert cpu_seconds(pid) - cpu < 0.25, "the server kept working after every client had gone"

    r = httpx.get(srv.url + "/api/ps", timeout=10)
    assert r.status_code == 200 and [m["name"] for m in r.json()["models"]] == [MODEL]

    # Every slot is free: as many streams as there are slots all start before any of them ends.
    results: list[tuple[float, float]] = []
    barrier = threading.Barrier(NUM_PARALLEL)
    threads = [threading.Thread(target=stream_times, args=(srv.url, i, 48, results, barrier))
               for i in range(NUM_PARALLEL)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == NUM_PARALLEL
    assert max(first for first, _ in results) < min(end for _, end in results), results

    # Memory: the 100 abandoned streams left nothing behind (tolerance: 8 MiB of allocator noise).
    print(f"server RSS {before / 2**20:.1f} MiB before 100 abandoned streams, {after / 2**20:.1f} MiB after")
    assert after - before < 8 << 20, f"RSS grew by {(after - before) / 2**20:.1f} MiB over 100 abandoned streams"
    log = srv.log.read_text()
    assert "Traceback" not in log and " ERROR " not in log


# -- SIGKILL during a create -----------------------------------------------------------------------------

# Runs the store's own create or copy in a child process that SIGKILLs itself at the worst moment: the new
# manifest's temporary file is written in full and about to be renamed into place.
_KILLED_AT_RENAME = r"""
import os, signal, sys
from pathlib import Path
from corral.store import manage
from corral.store.names import Name
from corral.store.store import Store

store = Store(Path(sys.argv[1]))
rename = os.replace

def replace(src, dst, *args, **kwargs):
    if Path(dst).is_relative_to(store.manifests):
        os.kill(os.getpid(), signal.SIGKILL)
    return rename(src, dst, *args, **kwargs)

os.replace = replace
action, name, source = sys.argv[2:5]
if action == "create":
    manage.create(store, Name.parse(name), manage.ModelSpec(model_blob=source, system="Be brief."))
else:
    manage.copy(store, Name.parse(source), Name.parse(name))
"""


def killed_at_rename(models: Path, action: str, name: str, source: str) -> None:
    out = subprocess.run([sys.executable, "-c", _KILLED_AT_RENAME, str(models), action, name, source],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == -signal.SIGKILL, out.stderr


def test_server_killed_during_a_create_restarts_into_a_consistent_store(tmp_path, tiny_gguf):
    models = tmp_path / "models"
    server = start_server(models, tmp_path / "s1.log", CORRAL_NO_BUNDLED="1")
    data = variant(tiny_gguf, 1)
    digest = digest_of(data)
    blob = models / "blobs" / ("sha256-" + digest[7:])

    def slowly():  # the upload of the model file, the bulk of a create, throttled so it can be interrupted
        for start in range(0, len(data), 256 << 10):
            yield data[start : start + (256 << 10)]
            time.sleep(0.02)

    def send() -> None:
        try:
            httpx.post(f"{server.url}/api/blobs/{digest}", content=slowly(), timeout=60)
        except httpx.HTTPError:
            pass

    sender = threading.Thread(target=send)
    try:
        sender.start()
        deadline = time.monotonic() + 60
        while temp_bytes(models) < 1 << 20:
            assert time.monotonic() < deadline and sender.is_alive(), "the upload never got under way"
            time.sleep(0.005)
        kill(server)
    finally:
        sender.join()
        stop_server(server)
    assert temp_files(models) and not blob.exists()  # killed mid-copy: only a temporary file holds the bytes

    # The create itself, killed with its manifest written but not yet renamed into place.
    with_blob = models / "blobs" / ("sha256-" + digest_of(tiny_gguf)[7:])
    with_blob.write_bytes(tiny_gguf)
    killed_at_rename(models, "create", "victim", digest_of(tiny_gguf))
    assert temp_files(models) and not (models / "manifests/registry.ollama.ai/library/victim/latest").exists()

    server = start_server(models, tmp_path / "s2.log", CORRAL_NO_BUNDLED="1")
    try:
        assert tags(server.url) == []  # nothing half-created is listed
        assert temp_files(models) == []  # the crash's temporary files are gone
        assert httpx.head(f"{server.url}/api/blobs/{digest}").status_code == 404
        # The same create, done again, completes and serves.
        upload(server.url, data)
        r = create(server.url, "victim", digest)
        assert r.status_code == 200 and r.json() == {"status": "success"}, r.text
        assert tags(server.url) == ["victim:latest"]
        r = httpx.post(server.url + "/v1/chat/completions", timeout=120, json={
            "model": "victim", "max_tokens": 4, "messages": [{"role": "user", "content": "Hi"}]})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] > 0
    finally:
        stop_server(server)


# -- SIGKILL during a copy -------------------------------------------------------------------------------


def test_server_killed_during_copies_never_lists_a_half_written_manifest(tmp_path, tiny_gguf):
    models = tmp_path / "models"
    server = start_server(models, tmp_path / "s1.log", CORRAL_NO_BUNDLED="1")
    copied: list[str] = []
    try:
        assert create(server.url, "base", upload(server.url, tiny_gguf)).status_code == 200
        base = (models / "manifests/registry.ollama.ai/library/base/latest").read_bytes()

        def copier(k: int) -> None:  # copies one after another until the server dies under them
            for i in range(10_000):
                name = f"copy-{k}-{i}"
                try:
                    r = httpx.post(server.url + "/api/copy", json={"source": "base", "destination": name}, timeout=10)
                except httpx.HTTPError:
                    return
                assert r.status_code == 200
                copied.append(name)

        threads = [threading.Thread(target=copier, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 60
        while len(copied) < 40:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        kill(server)
        for t in threads:
            t.join()
    finally:
        stop_server(server)
    # A copy killed after writing its manifest's temporary file, before the rename.
    killed_at_rename(models, "copy", "victim", "base")
    assert temp_files(models)

    server = start_server(models, tmp_path / "s2.log", CORRAL_NO_BUNDLED="1")
    try:
        listed = tags(server.url)
        assert "victim:latest" not in listed
        acknowledged = {f"{name}:latest" for name in copied}
        assert acknowledged <= set(listed)  # every copy the server confirmed survived the kill
        assert len(listed) <= 1 + len(acknowledged) + 4  # at most the 4 copies in flight besides
        for name in listed:  # and each listed manifest is whole: byte for byte the source's
            assert (models / "manifests/registry.ollama.ai/library" / name.replace(":", "/")).read_bytes() == base
        assert temp_files(models) == []
    finally:
        stop_server(server)


# -- SIGKILL during a pull -------------------------------------------------------------------------------


class ThrottledRelay:
    """A TCP relay to a local port whose replies flow at `rate` bytes/s per connection (None: full speed)."""

    def __init__(self, upstream: int) -> None:
        self.upstream = upstream
        self.rate: float | None = None
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
                upstream = socket.create_connection(("127.0.0.1", self.upstream))
            except OSError:
                return
            threading.Thread(target=self._pump, args=(client, upstream, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, True), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, throttled: bool) -> None:
        try:
            while data := source.recv(16384):
                sink.sendall(data)
                if throttled and self.rate:
                    time.sleep(len(data) / self.rate)
        except OSError:
            pass
        finally:
            for s in (source, sink):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()

    def close(self) -> None:
        self.listener.close()


def test_server_killed_mid_pull_lists_nothing_and_the_next_pull_resumes(tmp_path, srv, registry, tiny_gguf):
    # Pushed straight to the registry; pulled through a relay that slows the download enough to kill it.
    relay = ThrottledRelay(int(registry.split(":")[1]))
    pushed = f"{registry}/faults/tiny:v1"
    pulled = f"127.0.0.1:{relay.port}/faults/tiny:v1"
    layer = upload(srv.url, variant(tiny_gguf, 2))
    assert create(srv.url, pushed, layer).status_code == 200
    r = httpx.post(srv.url + "/api/push", json={"model": pushed, "insecure": True, "stream": False}, timeout=300)
    assert r.json() == {"status": "success"}, r.text
    httpx.request("DELETE", srv.url + "/api/delete", json={"model": pushed}, timeout=30)

    models = tmp_path / "models"
    state = models / "blobs" / f"sha256-{layer[7:]}-partial.json"
    relay.rate = 2 << 20
    server = start_server(models, tmp_path / "s1.log", CORRAL_NO_BUNDLED="1")

    def pull() -> None:
        try:
            httpx.post(server.url + "/api/pull", json={"model": pulled, "insecure": True}, timeout=120)
        except httpx.HTTPError:
            pass

    puller = threading.Thread(target=pull)
    try:
        puller.start()
        deadline = time.monotonic() + 60
        saved = 0
        while saved == 0:  # until the download has saved some progress
            assert time.monotonic() < deadline and puller.is_alive(), "the pull never saved progress"
            time.sleep(0.01)
            try:
                saved = sum(p["completed"] for p in json.loads(state.read_text())["parts"])
            except (OSError, ValueError):
                pass
        kill(server)
    finally:
        puller.join()
        stop_server(server)
    assert saved < len(tiny_gguf)

    relay.rate = None
    server = start_server(models, tmp_path / "s2.log", CORRAL_NO_BUNDLED="1")
    try:
        assert tags(server.url) == []  # nothing half-pulled is listed
        assert temp_files(models) == []
        r = httpx.post(server.url + "/api/pull", json={"model": pulled, "insecure": True}, timeout=300)
        statuses = [json.loads(line) for line in r.text.splitlines()]
        assert statuses[-1] == {"status": "success"}, statuses[-3:]
        first = next(s for s in statuses if s.get("digest") == layer)
        assert first["completed"] >= saved > 0  # it went on from the saved progress instead of starting over
        assert tags(server.url) == [pulled]
        blob = models / "blobs" / f"sha256-{layer[7:]}"
        assert digest_of(blob.read_bytes()) == layer
        assert not [p for p in (models / "blobs").iterdir() if "-partial" in p.name]
    finally:
        stop_server(server)
        relay.close()


# -- damaged model files ---------------------------------------------------------------------------------


def _value_offset(data: bytes, key: str) -> int:
    """Where a GGUF key's value type field is (the value follows it)."""
    at = data.index(key.encode())
    return at + len(key)


def test_a_damaged_gguf_is_a_clear_error_naming_the_model_and_others_keep_serving(srv, tiny_gguf):
    def broken(k: int, name: str, damage) -> None:
        data = variant(tiny_gguf, k)
        assert create(srv.url, name, upload(srv.url, data)).status_code == 200
        blob = srv.models_dir / "blobs" / ("sha256-" + digest_of(data)[7:])
        blob.write_bytes(damage(data))  # the disk changes under the store's feet

    def truncated(data: bytes) -> bytes:
        return data[: len(data) * 2 // 3]

    def too_many_layers(data: bytes) -> bytes:  # a value llama.cpp asserts on: it would abort the process
        at = _value_offset(data, "llama.block_count") + 4
        return data[:at] + (1000).to_bytes(4, "little") + data[at + 4 :]

    def garbled_header(data: bytes) -> bytes:
        at = _value_offset(data, "general.architecture")
        return data[:at] + (99).to_bytes(4, "little") + data[at + 4 :]

    cases = [("damaged-short", truncated, "truncated"), ("damaged-layers", too_many_layers, "block_count is 1000"),
             ("damaged-header", garbled_header, "unknown value type 99")]
    try:
        for k, (name, damage, _) in enumerate(cases, start=3):
            broken(k, name, damage)
        for name, _, reason in cases:
            r = httpx.post(srv.url + "/v1/chat/completions", timeout=120, json={
                "model": name, "max_tokens": 4, "messages": [{"role": "user", "content": "Hi"}]})
            assert r.status_code == 500, r.text
            message = r.json()["error"]["message"]
            assert f"model '{name}:latest' could not be loaded" in message and reason in message, message
        r = httpx.post(srv.url + "/api/chat", timeout=120, json={
            "model": "damaged-layers", "stream": False, "messages": [{"role": "user", "content": "Hi"}]})
        assert r.status_code == 500 and "damaged-layers" in r.json()["error"], r.text
        r = httpx.post(srv.url + "/api/show", json={"model": "damaged-short"}, timeout=30)
        assert r.status_code == 500 and "model 'damaged-short:latest' is damaged" in r.json()["error"], r.text
        assert "truncated" in r.json()["error"]
        assert srv.process.poll() is None

        # The server still serves its good model, and lists the damaged ones for `corral rm`.
        r = httpx.post(srv.url + "/v1/chat/completions", timeout=120, json={
            "model": MODEL, "max_tokens": 4, "messages": [{"role": "user", "content": "Hi"}]})
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"]
        assert {f"{name}:latest" for name, _, _ in cases} <= set(tags(srv.url))
    finally:
        for name, _, _ in cases:
            httpx.request("DELETE", srv.url + "/api/delete", json={"model": name}, timeout=30)


def test_create_refuses_a_truncated_gguf_naming_what_is_wrong(srv, tiny_gguf):
    digest = upload(srv.url, tiny_gguf[: len(tiny_gguf) // 2])
    r = create(srv.url, "half", digest)
    assert r.status_code == 400, r.text
    assert "damaged" in r.json()["error"] and "truncated" in r.json()["error"]
    assert "half:latest" not in tags(srv.url)


def test_the_gguf_check_passes_whole_files_and_names_the_damage(tmp_path, tiny_gguf):
    path = tmp_path / "m.gguf"
    eps = _value_offset(tiny_gguf, "llama.attention.layer_norm_rms_epsilon") + 4
    check_gguf(write_projector(tmp_path / "projector.gguf"))  # a projector has no block_count: not required
    for data, reason in [
        (tiny_gguf[:-1], "truncated"),
        (tiny_gguf[:20], "too short"),
        (b"GGML" + tiny_gguf[4:], "not a GGUF file"),
        (tiny_gguf[:4] + (1).to_bytes(4, "little") + tiny_gguf[8:], "version 1"),
        (tiny_gguf[:8] + (10**9).to_bytes(8, "little") + tiny_gguf[16:], "past the end"),  # tensor count
        (tiny_gguf.replace(b"llama.block_count\x04\x00\x00\x00\x02", b"llama.block_count\x04\x00\x00\x00\x00"),
         "block_count is 0"),
        (tiny_gguf[:eps] + b"\xff\xff\xff\xff" + tiny_gguf[eps + 4 :], "layer_norm_rms_epsilon is nan"),  # NaN
    ]:
        path.write_bytes(data)
        with pytest.raises(GGUFError, match=reason):
            check_gguf(path)
    path.write_bytes(tiny_gguf)
    assert check_gguf(path)["general.architecture"] == "llama"


def test_a_store_in_use_by_another_server_keeps_its_young_temporary_files(tmp_path):
    first, second = Store(tmp_path), Store(tmp_path)
    young, old = tmp_path / "blobs" / ".tmp-young", tmp_path / "manifests" / ".tmp-old"
    young.write_bytes(b"x")
    assert first.claim() == 1 and not young.exists()  # alone: every temporary file is a crash's
    young.write_bytes(b"x")
    old.write_bytes(b"x")
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    try:
        assert second.claim() == 1  # the first still uses the store: only the hour-old file goes
        assert young.exists() and not old.exists()
    finally:
        os.close(first._claim)
        os.close(second._claim)
    third = Store(tmp_path)
    assert third.claim() == 1 and not young.exists()
    os.close(third._claim)
