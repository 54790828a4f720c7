"""Ollama's on-disk layout: content-addressed blobs plus v2 manifests, one file per name.

    <root>/blobs/sha256-<hex>
    <root>/manifests/<host>/<namespace>/<model>/<tag>

Every write goes to a temporary file first and is renamed into place, so a crash never leaves a
half-written blob or manifest behind under its final name.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

from pydantic import BaseModel, ConfigDict, Field

from .names import Name

MANIFEST_MEDIA_TYPE = "application/vnd.docker.distribution.manifest.v2+json"
CONFIG_MEDIA_TYPE = "application/vnd.docker.container.image.v1+json"
MODEL_MEDIA_TYPE = "application/vnd.ollama.image.model"
PARAMS_MEDIA_TYPE = "application/vnd.ollama.image.params"
TEMPLATE_MEDIA_TYPE = "application/vnd.ollama.image.template"
SYSTEM_MEDIA_TYPE = "application/vnd.ollama.image.system"
MESSAGES_MEDIA_TYPE = "application/vnd.ollama.image.messages"
LICENSE_MEDIA_TYPE = "application/vnd.ollama.image.license"
ADAPTER_MEDIA_TYPE = "application/vnd.ollama.image.adapter"
PROJECTOR_MEDIA_TYPE = "application/vnd.ollama.image.projector"


class Layer(BaseModel):
    model_config = ConfigDict(populate_by_name=True, extra="allow")
    media_type: str = Field(alias="mediaType")
    digest: str
    size: int
    from_: str | None = Field(default=None, alias="from")


class Manifest(BaseModel):
    model_config = ConfigDict(populate_by_name=True, extra="allow")
    schema_version: int = Field(default=2, alias="schemaVersion")
    media_type: str = Field(default=MANIFEST_MEDIA_TYPE, alias="mediaType")
    config: Layer
    layers: list[Layer]

    def layer(self, media_type: str) -> Layer | None:
        return next((layer for layer in self.layers if layer.media_type == media_type), None)

    def to_bytes(self) -> bytes:
        return self.model_dump_json(by_alias=True, exclude_none=True).encode()


@dataclass(frozen=True)
class Entry:
    """One listed model: its name as stored on disk, its manifest, and the manifest's mtime."""

    name: Name
    manifest: Manifest
    digest: str
    modified: float
    path: Path


def _digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def file_digest(path: Path) -> str:
    """The `sha256:<hex>` digest of a file, read in chunks (model files are large)."""
    hasher = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            hasher.update(chunk)
    return "sha256:" + hasher.hexdigest()


class Store:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.blobs = self.root / "blobs"
        self.manifests = self.root / "manifests"
        self.blobs.mkdir(parents=True, exist_ok=True)
        self.manifests.mkdir(parents=True, exist_ok=True)

    # -- blobs -----------------------------------------------------------------
    def blob_path(self, digest: str) -> Path:
        algo, _, hexpart = digest.partition(":")
        if algo != "sha256" or len(hexpart) != 64 or not all(c in "0123456789abcdef" for c in hexpart):
            raise ValueError(f"invalid digest {digest!r}")
        return self.blobs / f"sha256-{hexpart}"

    def put_bytes(self, data: bytes, media_type: str) -> Layer:
        digest = _digest_of(data)
        path = self.blob_path(digest)
        if not path.exists():
            self._atomic_write(path, data)
        return Layer(media_type=media_type, digest=digest, size=len(data))

    def put_json(self, value: Any, media_type: str) -> Layer:
        return self.put_bytes(json.dumps(value, separators=(",", ":")).encode(), media_type)

    def put_file(self, source: Path, media_type: str, move: bool = False) -> Layer:
        """Copy a file in while hashing it; a blob already present is not copied again.

        `move` renames the file into place instead (it must be in the store's folder, as the converter's
        temporary files are) and removes it when the blob already exists."""
        digest = file_digest(source)
        path = self.blob_path(digest)
        if move:
            if path.exists():
                os.unlink(source)
            else:
                os.replace(source, path)
        elif not path.exists():
            fd, tmp = tempfile.mkstemp(dir=self.blobs, prefix=".tmp-")
            os.close(fd)
            try:
                shutil.copyfile(source, tmp)
                os.replace(tmp, path)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        return Layer(media_type=media_type, digest=digest, size=path.stat().st_size)

    def read_blob(self, digest: str) -> bytes:
        return self.blob_path(digest).read_bytes()

    # -- manifests ---------------------------------------------------------------
    def manifest_path(self, name: Name) -> Path:
        return self.manifests.joinpath(*name.parts)

    def write_manifest(self, name: Name, manifest: Manifest) -> None:
        self.write_manifest_bytes(name, manifest.to_bytes())

    def write_manifest_bytes(self, name: Name, data: bytes) -> None:
        """Replaces the manifest of a name, keeping the on-disk casing of an existing one."""
        existing = self.find(name)
        target = existing.path if existing else self.manifest_path(name)
        target.parent.mkdir(parents=True, exist_ok=True)
        self._atomic_write(target, data)

    def referenced_blobs(self) -> set[str]:
        """Digests of every config and layer that some manifest refers to.

        An unreadable manifest raises: its blobs cannot be told apart from garbage.
        """
        digests: set[str] = set()
        for path in self._manifest_files():
            manifest = self._entry(path).manifest
            digests.add(manifest.config.digest)
            digests.update(layer.digest for layer in manifest.layers)
        return digests

    def remove_unreferenced_blobs(self, candidates: Iterable[str] | None = None) -> list[str]:
        """Delete the blobs (only among `candidates`, when given) that no manifest refers to.

        Partial downloads and temporary files are left alone. A pull that is still downloading has not
        written its manifest yet, so a full sweep (no candidates) must not run beside one.
        """
        referenced = self.referenced_blobs()
        if candidates is None:
            candidates = ["sha256:" + p.name[7:] for p in self.blobs.glob("sha256-*") if len(p.name) == 71]
        removed = []
        for digest in candidates:
            if digest in referenced:
                continue
            try:
                self.blob_path(digest).unlink()
            except (ValueError, FileNotFoundError):
                continue
            removed.append(digest)
        return removed

    def claim(self) -> int:
        """Marks the store as used by this process until it exits (a shared lock on `<root>/.lock`) and removes
        the temporary files of writes a crash interrupted: all of them when no other process uses the store,
        else only those older than an hour (the younger ones may be another server's writes in progress).
        Returns how many were removed."""
        fd = os.open(self.root / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            alone = True
        except BlockingIOError:
            alone = False
        try:
            return self.remove_stale_temp_files(older_than=0.0 if alone else 3600.0)
        finally:
            fcntl.flock(fd, fcntl.LOCK_SH)  # kept (the descriptor stays open) for the life of the process
            self._claim = fd

    def remove_stale_temp_files(self, older_than: float = 3600.0) -> int:
        """Delete `.tmp-*` files left by writes that were killed, if older than `older_than` seconds."""
        cutoff = time.time() - older_than if older_than > 0 else float("inf")
        removed = 0
        for path in [*self.blobs.glob(".tmp-*"), *self.manifests.rglob(".tmp-*")]:
            try:
                if path.is_file() and path.stat().st_mtime < cutoff:
                    path.unlink()
                    removed += 1
            except FileNotFoundError:
                continue
        return removed

    def find(self, name: Name) -> Entry | None:
        """Look a name up case-insensitively; the returned entry carries the on-disk casing."""
        exact = self.manifest_path(name)
        if exact.is_file():
            return self._entry(exact)
        wanted = name.key()
        for path in self._manifest_files():
            if tuple(p.lower() for p in path.relative_to(self.manifests).parts) == wanted:
                return self._entry(path)
        return None

    def list(self) -> list[Entry]:
        """Every readable manifest, most recently modified first (as Ollama lists them)."""
        entries = []
        for path in self._manifest_files():
            try:
                entries.append(self._entry(path))
            except (OSError, ValueError):
                continue  # a foreign or damaged file is skipped, never fatal to listing
        entries.sort(key=lambda e: e.modified, reverse=True)
        return entries

    def _manifest_files(self) -> Iterator[Path]:
        for path in self.manifests.glob("*/*/*/*"):
            if path.is_file() and not path.name.startswith(".tmp-"):
                yield path

    def _entry(self, path: Path) -> Entry:
        raw = path.read_bytes()
        manifest = Manifest.model_validate_json(raw)
        host, namespace, model, tag = path.relative_to(self.manifests).parts
        return Entry(
            name=Name(host, namespace, model, tag),
            manifest=manifest,
            digest=_digest_of(raw),
            modified=path.stat().st_mtime,
            path=path,
        )

    @staticmethod
    def _atomic_write(path: Path, data: bytes) -> None:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
