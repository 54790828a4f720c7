"""Pull models from, and push them to, an OCI distribution registry (Ollama's registry protocol).

    GET  /v2/<namespace>/<model>/manifests/<tag>      the v2 manifest
    GET  /v2/<namespace>/<model>/blobs/<digest>       a blob (may redirect; ranged requests)
    HEAD /v2/<namespace>/<model>/blobs/<digest>       does the registry have it?
    POST /v2/<namespace>/<model>/blobs/uploads/       start an upload -> Location
    PATCH <location>, then PUT <location>?digest=...  upload a blob in chunks and commit it
    PUT  /v2/<namespace>/<model>/manifests/<tag>      publish the manifest

A 401 with a `Bearer` challenge is answered by fetching a token from the challenge's realm.

A pull downloads each blob into `blobs/sha256-<hex>-partial` with several ranged requests at once and
records each part's progress beside it in `sha256-<hex>-partial.json`, so a pull that is killed resumes
where it stopped. A blob is renamed to its final name only after its sha256 is checked, and the manifest
is written last, so a model is never listed before all of its blobs are in place.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable

import httpx

from .names import Name
from .store import MANIFEST_MEDIA_TYPE, Layer, Manifest, Store, file_digest

OCI_MANIFEST_MEDIA_TYPE = "application/vnd.oci.image.manifest.v1+json"
ProgressFn = Callable[[dict], Awaitable[None]] | None

_MAX_MANIFEST_BYTES = 4 << 20
_WRITE_BUFFER = 1 << 20  # bytes gathered from the network before each write to the partial file
_UPLOAD_READ = 1 << 20  # bytes read from a blob per upload body chunk
_UPLOAD_CHUNK = 64 << 20  # bytes per PATCH request
_PROGRESS_INTERVAL = 0.2  # seconds between progress reports for a blob
_STATE_SAVE_INTERVAL = 0.5  # seconds between saves of a partial download's state
_PART_ATTEMPTS = 3  # tries per ranged request before the pull gives up (progress is kept)


class RegistryError(Exception):
    """A pull or push that failed; the message says what and where. `status` is 404 when what was asked
    for does not exist (a missing tag or model), so the API can answer 404 rather than a failure."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class _Unreachable(RegistryError):
    """The registry could not be reached or the connection broke (worth another try mid-download)."""


def _short(digest: str) -> str:
    return digest.partition(":")[2][:12]


def _make_client(parallel: int) -> httpx.AsyncClient:
    """One HTTP client per pull or push (tests replace this to watch or shape the traffic)."""
    return httpx.AsyncClient(
        follow_redirects=True,
        timeout=httpx.Timeout(60.0, connect=30.0),
        limits=httpx.Limits(max_connections=parallel + 2, max_keepalive_connections=parallel + 2),
    )


# -- HTTP with bearer-token authentication -------------------------------------------------------

_CHALLENGE_PARAM = re.compile(r'([A-Za-z_]+)\s*=\s*(?:"([^"]*)"|([^,\s]*))')

Body = bytes | Callable[[], AsyncIterator[bytes]] | None


class _Registry:
    def __init__(self, client: httpx.AsyncClient, name: Name, insecure: bool) -> None:
        self.client = client
        self.name = name
        self.origin = f"{'http' if insecure else 'https'}://{name.host}"
        self.repo = f"{self.origin}/v2/{name.namespace}/{name.model}"
        self.token: str | None = None

    def unreachable(self, exc: Exception) -> RegistryError:
        detail = str(exc) or type(exc).__name__
        hint = ""
        if self.origin.startswith("https:") and "ssl" in detail.lower():
            hint = " (a plain-HTTP registry needs insecure=True)"
        return _Unreachable(f"registry unreachable: {self.origin}: {detail}{hint}")

    async def _authenticate(self, response: httpx.Response) -> None:
        challenge = response.headers.get("www-authenticate", "")
        scheme, _, params_text = challenge.strip().partition(" ")
        if scheme.lower() != "bearer":
            raise RegistryError(
                f"registry {self.name.host} requires authentication ({response.request.method} "
                f"{response.request.url} returned 401{', challenge ' + challenge if challenge else ''})"
            )
        params = {m.group(1).lower(): m.group(2) if m.group(2) is not None else m.group(3)
                  for m in _CHALLENGE_PARAM.finditer(params_text)}
        realm = params.get("realm")
        if not realm:
            raise RegistryError(f"registry {self.name.host} sent a bearer challenge without a realm: {challenge}")
        query = {key: params[key] for key in ("service", "scope") if params.get(key)}
        try:
            reply = await self.client.get(realm, params=query)
        except httpx.TransportError as exc:
            raise RegistryError(f"token service unreachable: {realm}: {str(exc) or type(exc).__name__}") from exc
        if reply.status_code != 200:
            raise RegistryError(f"token request to {realm} returned {reply.status_code}: {reply.text[:200]}")
        try:
            body = reply.json()
            token = body.get("token") or body.get("access_token")
        except (ValueError, AttributeError):
            token = None
        if not isinstance(token, str) or not token:
            raise RegistryError(f"token service {realm} answered without a token")
        self.token = token

    def _headers(self, headers: dict[str, str] | None) -> dict[str, str]:
        merged = dict(headers or {})
        if self.token:
            merged["Authorization"] = f"Bearer {self.token}"
        return merged

    @staticmethod
    def _content(body: Body) -> Any:
        return body() if callable(body) else body

    @asynccontextmanager
    async def stream(
        self, method: str, url: str, *, headers: dict[str, str] | None = None, body: Body = None
    ) -> AsyncIterator[httpx.Response]:
        """A streamed request; a 401 is answered with a token and the request sent once more."""
        for attempt in (1, 2):
            request = self.client.build_request(method, url, headers=self._headers(headers),
                                                content=self._content(body))
            try:
                response = await self.client.send(request, stream=True)
            except httpx.TransportError as exc:
                raise self.unreachable(exc) from exc
            try:
                if response.status_code == 401 and attempt == 1:
                    await response.aread()
                    await self._authenticate(response)
                    continue
                yield response
                return
            finally:
                await response.aclose()

    async def request(
        self, method: str, url: str, *, headers: dict[str, str] | None = None, body: Body = None
    ) -> httpx.Response:
        async with self.stream(method, url, headers=headers, body=body) as response:
            try:
                await response.aread()
            except httpx.TransportError as exc:
                raise self.unreachable(exc) from exc
            return response


def _failure(what: str, response: httpx.Response) -> RegistryError:
    text = response.text.strip().replace("\n", " ")[:300] if response.content else ""
    return RegistryError(
        f"{what} failed: {response.request.method} {response.request.url} returned "
        f"{response.status_code}{': ' + text if text else ''}"
    )


# -- pull ------------------------------------------------------------------------------------------


@dataclass
class _Part:
    offset: int
    size: int
    completed: int = 0

    @property
    def next_byte(self) -> int:
        return self.offset + self.completed

    @property
    def done(self) -> bool:
        return self.completed >= self.size


class _RangeIgnored(Exception):
    """The registry answered a ranged request for a later part with the whole blob."""


class _Download:
    """One blob's download into `<blob>-partial`, its parts' progress saved in `<blob>-partial.json`."""

    def __init__(self, store: Store, layer: Layer, chunk_size: int) -> None:
        self.layer = layer
        self.final = store.blob_path(layer.digest)
        self.partial = self.final.with_name(self.final.name + "-partial")
        self.state_path = self.final.with_name(self.final.name + "-partial.json")
        self.parts = self._load_state()
        if self.parts is None:
            size = max(1, chunk_size)
            self.parts = [_Part(offset, min(size, layer.size - offset)) for offset in range(0, layer.size, size)]
            self.partial.unlink(missing_ok=True)

    @property
    def completed(self) -> int:
        return sum(part.completed for part in self.parts)

    def _load_state(self) -> list[_Part] | None:
        try:
            state = json.loads(self.state_path.read_text())
            if state["digest"] != self.layer.digest or state["total"] != self.layer.size:
                return None
            parts = [_Part(int(p["offset"]), int(p["size"]), int(p["completed"])) for p in state["parts"]]
            on_disk = self.partial.stat().st_size
        except (OSError, ValueError, KeyError, TypeError):
            return None
        expected = 0
        for part in parts:  # the parts must tile the blob exactly and fit in the file on disk
            if part.offset != expected or part.size <= 0 or not 0 <= part.completed <= part.size:
                return None
            if part.completed and part.next_byte > on_disk:
                return None
            expected += part.size
        return parts if expected == self.layer.size else None

    def save_state(self) -> None:
        state = {
            "digest": self.layer.digest,
            "total": self.layer.size,
            "parts": [{"offset": p.offset, "size": p.size, "completed": p.completed} for p in self.parts],
        }
        Store._atomic_write(self.state_path, json.dumps(state).encode())

    def discard(self) -> None:
        self.partial.unlink(missing_ok=True)
        self.state_path.unlink(missing_ok=True)

    def fall_back_to_one_stream(self) -> None:
        """The registry ignores Range: keep the downloaded prefix, fetch the rest from one stream."""
        prefix = 0
        for part in self.parts:
            prefix += part.completed
            if not part.done:
                break
        self.parts = [_Part(0, self.layer.size, prefix)]

    async def run(self, registry: _Registry, parallel: int, report: Callable[[], Awaitable[None]]) -> None:
        url = f"{registry.repo}/blobs/{self.layer.digest}"
        fd = os.open(self.partial, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            if os.fstat(fd).st_size != self.layer.size:
                os.ftruncate(fd, self.layer.size)
            self.save_state()
            while True:
                try:
                    await self._fetch_parts(registry, url, fd, parallel, report)
                    return
                except _RangeIgnored:
                    self.fall_back_to_one_stream()
        finally:
            os.close(fd)
            if self.partial.exists():  # not discarded: remember how far each part got
                self.save_state()

    async def _fetch_parts(
        self, registry: _Registry, url: str, fd: int, parallel: int, report: Callable[[], Awaitable[None]]
    ) -> None:
        gate = asyncio.Semaphore(max(1, parallel))

        async def fetch(part: _Part) -> None:
            async with gate:
                await self._fetch_part(registry, url, fd, part)

        pending = {asyncio.create_task(fetch(part)) for part in self.parts if not part.done}
        last_save = time.monotonic()
        try:
            while pending:
                done, pending = await asyncio.wait(
                    pending, timeout=_PROGRESS_INTERVAL, return_when=asyncio.FIRST_EXCEPTION
                )
                failures = [t.exception() for t in done if not t.cancelled() and t.exception() is not None]
                if failures:
                    raise failures[0]  # `finally` stops the other parts
                if time.monotonic() - last_save >= _STATE_SAVE_INTERVAL:
                    self.save_state()
                    last_save = time.monotonic()
                if pending:
                    await report()
        finally:
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)

    async def _fetch_part(self, registry: _Registry, url: str, fd: int, part: _Part) -> None:
        """Fetch what is missing of one part, retrying broken streams; every try that brings bytes resets
        the count of failures."""
        failures = 0
        while not part.done:
            before = part.completed
            try:
                await self._stream_part(registry, url, fd, part)
                problem = f"the stream ended {part.size - part.completed} bytes short"
            except (httpx.TransportError, _Unreachable) as exc:
                problem = str(exc) or type(exc).__name__
            if part.done:
                return
            failures = 0 if part.completed > before else failures + 1
            if failures >= _PART_ATTEMPTS:
                raise RegistryError(f"download of {self.layer.digest} failed: {problem}")
            await asyncio.sleep(0.25 * failures)

    async def _stream_part(self, registry: _Registry, url: str, fd: int, part: _Part) -> None:
        start, end = part.next_byte, part.offset + part.size - 1
        headers = {"Range": f"bytes={start}-{end}", "Accept-Encoding": "identity"}
        async with registry.stream("GET", url, headers=headers) as response:
            skip = 0
            if response.status_code == 200:  # Range ignored: the body is the whole blob
                if part.offset != 0 or part.size != self.layer.size:
                    raise _RangeIgnored()
                skip = start
            elif response.status_code == 206:
                match = re.match(r"bytes\s+(\d+)-", response.headers.get("content-range", ""))
                if not match or int(match.group(1)) != start:
                    raise RegistryError(
                        f"registry answered bytes {start}-{end} of {self.layer.digest} with "
                        f"Content-Range {response.headers.get('content-range')!r}"
                    )
            elif response.status_code == 404:
                raise RegistryError(
                    f"blob {self.layer.digest} of '{registry.name}' not found in registry {registry.name.host} "
                    f"(GET {url} returned 404)",
                    status=404,
                )
            else:
                await response.aread()
                raise _failure(f"download of {self.layer.digest}", response)

            buffer = bytearray()

            def flush() -> None:
                if buffer:
                    os.pwrite(fd, buffer, part.next_byte)
                    part.completed += len(buffer)
                    buffer.clear()

            try:
                async for chunk in response.aiter_bytes():
                    if skip:
                        dropped = min(skip, len(chunk))
                        chunk, skip = chunk[dropped:], skip - dropped
                    buffer += chunk[: part.size - part.completed - len(buffer)]  # never past the part's end
                    if len(buffer) >= _WRITE_BUFFER or part.completed + len(buffer) == part.size:
                        flush()
                    if part.done:
                        break
            finally:
                flush()  # whatever arrived is kept, also when the stream breaks or the task is cancelled


def _verify(path: Path) -> str:
    return file_digest(path)


async def _emit(progress: ProgressFn, event: dict) -> None:
    if progress is not None:
        await progress(event)


async def _get_manifest(registry: _Registry, name: Name) -> bytes:
    url = f"{registry.repo}/manifests/{name.tag}"
    accept = f"{MANIFEST_MEDIA_TYPE}, {OCI_MANIFEST_MEDIA_TYPE}"
    response = await registry.request("GET", url, headers={"Accept": accept})
    if response.status_code == 404:
        raise RegistryError(
            f"model '{name}' not found in registry {name.host} (manifest {url} returned 404)",
            status=404,
        )
    if response.status_code != 200:
        raise _failure(f"fetching the manifest of '{name}'", response)
    raw = response.content
    if len(raw) > _MAX_MANIFEST_BYTES:
        raise RegistryError(f"manifest of '{name}' is too large ({len(raw)} bytes)")
    sent_digest = response.headers.get("docker-content-digest", "")
    if sent_digest.startswith("sha256:") and sent_digest != "sha256:" + hashlib.sha256(raw).hexdigest():
        raise RegistryError(f"digest mismatch: manifest of '{name}' does not match {sent_digest}")
    return raw


def _parse_manifest(raw: bytes, name: Name) -> Manifest:
    try:
        document = json.loads(raw)
        manifest = Manifest.model_validate(document)
    except ValueError as exc:
        raise RegistryError(f"registry sent an unreadable manifest for '{name}': {exc}") from exc
    if manifest.schema_version != 2 or manifest.media_type not in (MANIFEST_MEDIA_TYPE, OCI_MANIFEST_MEDIA_TYPE):
        raise RegistryError(
            f"'{name}' has an unsupported manifest (schemaVersion {manifest.schema_version}, "
            f"mediaType {manifest.media_type})"
        )
    for layer in [manifest.config, *manifest.layers]:
        if layer.size < 0:
            raise RegistryError(f"manifest of '{name}' gives {layer.digest} a negative size")
        algo, _, hexpart = layer.digest.partition(":")
        if algo != "sha256" or not re.fullmatch(r"[0-9a-f]{64}", hexpart):
            raise RegistryError(f"manifest of '{name}' has an invalid digest {layer.digest!r}")
    return manifest


def _unique_blobs(manifest: Manifest) -> list[Layer]:
    seen: set[str] = set()
    blobs = []
    for layer in [*manifest.layers, manifest.config]:
        if layer.digest not in seen:
            seen.add(layer.digest)
            blobs.append(layer)
    return blobs


_claimed: set[Path] = set()  # blobs that a pull in this process is downloading


@asynccontextmanager
async def _claim(paths: set[Path]) -> AsyncIterator[None]:
    """Wait until no other pull in this process is fetching any of these blobs, then hold them all."""
    while _claimed & paths:
        await asyncio.sleep(0.1)
    _claimed.update(paths)
    try:
        yield
    finally:
        _claimed.difference_update(paths)


async def pull(
    store: Store,
    name: Name,
    *,
    insecure: bool = False,
    progress: ProgressFn = None,
    chunk_size: int = 64 << 20,
    parallel: int = 4,
) -> Manifest:
    """Download `name` from its registry into `store`; returns the manifest once it is written."""
    await _emit(progress, {"status": "pulling manifest"})
    async with _make_client(parallel) as client:
        registry = _Registry(client, name, insecure)
        raw = await _get_manifest(registry, name)
        manifest = _parse_manifest(raw, name)
        blobs = _unique_blobs(manifest)
        async with _claim({store.blob_path(layer.digest).resolve() for layer in blobs}):
            downloads = await _download_all(store, registry, blobs, chunk_size, parallel, progress)
            await _emit(progress, {"status": "verifying sha256 digest"})
            await _verify_all(downloads, name)
            await _emit(progress, {"status": "writing manifest"})
            previous = store.find(name)
            store.write_manifest_bytes(name, raw)
    if previous is not None and previous.digest != "sha256:" + hashlib.sha256(raw).hexdigest():
        old = [previous.manifest.config.digest, *(layer.digest for layer in previous.manifest.layers)]
        try:
            store.remove_unreferenced_blobs(old)  # the replaced version's blobs that nothing else uses
        except (OSError, ValueError):
            pass
    await _emit(progress, {"status": "success"})
    return manifest


async def _download_all(
    store: Store, registry: _Registry, blobs: list[Layer], chunk_size: int, parallel: int, progress: ProgressFn
) -> list[_Download]:
    """Fetch every blob the store lacks into its partial file, one blob after another."""
    downloads = []
    for layer in blobs:
        status = f"pulling {_short(layer.digest)}"

        async def report(completed: int, layer: Layer = layer, status: str = status) -> None:
            await _emit(progress, {"status": status, "digest": layer.digest, "total": layer.size, "completed": completed})

        if store.blob_path(layer.digest).exists():
            await report(layer.size)
            continue
        download = _Download(store, layer, chunk_size)
        await report(download.completed)
        await download.run(registry, parallel, lambda d=download, r=report: r(d.completed))
        await report(download.completed)
        downloads.append(download)
    return downloads


async def _verify_all(downloads: list[_Download], name: Name) -> None:
    """Check each download's sha256 and rename it into place; a bad one is deleted (the good ones stay)."""
    mismatch: RegistryError | None = None
    for download in downloads:
        actual = await asyncio.to_thread(_verify, download.partial)
        if actual != download.layer.digest:
            download.discard()
            mismatch = mismatch or RegistryError(
                f"digest mismatch for {download.layer.digest} of '{name}': the downloaded bytes hash to "
                f"{actual}; the partial download was removed"
            )
            continue
        os.replace(download.partial, download.final)
        download.state_path.unlink(missing_ok=True)
    if mismatch is not None:
        raise mismatch


# -- push ------------------------------------------------------------------------------------------


async def _upload_blob(
    registry: _Registry, path: Path, layer: Layer, report: Callable[[int], Awaitable[None]]
) -> None:
    start_url = f"{registry.repo}/blobs/uploads/"
    response = await registry.request("POST", start_url, headers={"Content-Length": "0"})
    if response.status_code not in (201, 202):
        raise _failure(f"starting the upload of {layer.digest}", response)
    if response.status_code == 201:  # already committed (a mount), nothing to send
        return
    location = response.headers.get("location")
    if not location:
        raise RegistryError(f"registry {registry.name.host} started an upload without a Location header")
    url = response.request.url.join(location)

    sent = 0
    size = path.stat().st_size
    last_report = time.monotonic()

    async def tick(done: int) -> None:
        nonlocal last_report
        if time.monotonic() - last_report >= _PROGRESS_INTERVAL:
            last_report = time.monotonic()
            await report(done)

    while sent < size:
        length = min(_UPLOAD_CHUNK, size - sent)

        def body(offset: int = sent, length: int = length) -> AsyncIterator[bytes]:
            async def chunks() -> AsyncIterator[bytes]:
                with open(path, "rb") as fh:
                    fh.seek(offset)
                    left = length
                    while left:
                        data = await asyncio.to_thread(fh.read, min(_UPLOAD_READ, left))
                        if not data:
                            raise RegistryError(f"blob {layer.digest} shrank while it was being pushed")
                        left -= len(data)
                        yield data
                        await tick(offset + length - left)  # runs once httpx asks for the next piece

            return chunks()

        headers = {
            "Content-Type": "application/octet-stream",
            "Content-Length": str(length),
            "Content-Range": f"{sent}-{sent + length - 1}",
        }
        response = await registry.request("PATCH", str(url), headers=headers, body=body)
        if response.status_code not in (202, 204):
            raise _failure(f"uploading {layer.digest}", response)
        sent += length
        await report(sent)
        if response.headers.get("location"):
            url = response.request.url.join(response.headers["location"])

    commit = url.copy_merge_params({"digest": layer.digest})
    response = await registry.request("PUT", str(commit), headers={"Content-Length": "0"})
    if response.status_code not in (201, 204):
        raise _failure(f"committing the upload of {layer.digest}", response)


async def push(store: Store, name: Name, *, insecure: bool = False, progress: ProgressFn = None) -> None:
    """Upload `name` from `store` to its registry: the blobs it lacks, then the manifest verbatim."""
    await _emit(progress, {"status": "retrieving manifest"})
    entry = store.find(name)
    if entry is None:
        raise RegistryError(f"model '{name}' not found in the store; nothing to push", status=404)
    raw = entry.path.read_bytes()
    blobs = _unique_blobs(entry.manifest)
    for layer in blobs:
        if not store.blob_path(layer.digest).is_file():
            raise RegistryError(f"model '{name}' is incomplete: blob {layer.digest} is missing from the store")

    async with _make_client(2) as client:
        registry = _Registry(client, name, insecure)
        for layer in blobs:
            status = f"pushing {_short(layer.digest)}"

            async def report(done: int, layer: Layer = layer, status: str = status) -> None:
                await _emit(progress, {"status": status, "digest": layer.digest, "total": layer.size, "completed": done})

            head = await registry.request("HEAD", f"{registry.repo}/blobs/{layer.digest}")
            if head.status_code == 200:
                await report(layer.size)
                continue
            if head.status_code != 404:
                raise _failure(f"checking for {layer.digest}", head)
            await report(0)
            await _upload_blob(registry, store.blob_path(layer.digest), layer, report)
            await report(layer.size)

        await _emit(progress, {"status": "pushing manifest"})
        url = f"{registry.repo}/manifests/{name.tag}"
        media_type = entry.manifest.media_type or MANIFEST_MEDIA_TYPE
        response = await registry.request("PUT", url, headers={"Content-Type": media_type}, body=raw)
        if response.status_code not in (200, 201, 202):
            raise _failure(f"pushing the manifest of '{name}'", response)
    await _emit(progress, {"status": "success"})
