"""Model management behind the native /api routes and the CLI: list, show, create, copy, delete, blobs."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import tempfile
from collections.abc import AsyncIterator
from datetime import datetime, timezone
from typing import Any

from .. import __version__
from ..protocol.native import (
    CreateRequest,
    Details,
    ListedModel,
    PsResponse,
    RunningModel,
    ShowResponse,
    StatusResponse,
    TagsResponse,
    VersionResponse,
)
from ..store import manage as store_manage
from ..store.gguf_check import GGUFError, check_gguf
from ..store.gguf_import import gguf_metadata
from ..store.modelfile import Modelfile, ModelfileError, coerce_parameters, render
from ..store.names import InvalidName, Name
from ..store.store import (
    ADAPTER_MEDIA_TYPE,
    LICENSE_MEDIA_TYPE,
    MESSAGES_MEDIA_TYPE,
    MODEL_MEDIA_TYPE,
    PARAMS_MEDIA_TYPE,
    PROJECTOR_MEDIA_TYPE,
    SYSTEM_MEDIA_TYPE,
    TEMPLATE_MEDIA_TYPE,
    Entry,
)
from .errors import EngineFailure, InvalidRequest, ModelNotFound
from .models import EMBEDDING_ARCHITECTURES, ModelManager
from .templates import ChatTemplate, TemplateRenderError

# PARAMETERs Ollama knows that have no meaning on corral's CPU engine: refused rather than ignored.
NO_EFFECT_PARAMETERS = {"num_gpu": "corral runs on the CPU", "main_gpu": "corral runs on the CPU",
                        "num_keep": "corral never shifts the context"}


def parse_name(raw: str | None, param: str = "model") -> Name:
    if not raw:
        raise InvalidRequest(f"{param} is required", param=param)
    try:
        return Name.parse(raw)
    except InvalidName as exc:
        raise InvalidRequest(str(exc), param=param) from None


def _find(manager: ModelManager, raw: str | None) -> Entry:
    entry = manager.store.find(parse_name(raw))
    if entry is None:
        raise ModelNotFound(raw or "")
    return entry


def _iso(timestamp: float) -> str:
    """A time beyond what datetime can hold (a keep_alive of 1e300 seconds, or inf) is Ollama's "forever"."""
    try:
        return datetime.fromtimestamp(timestamp, tz=timezone.utc).isoformat()
    except (OverflowError, ValueError, OSError):
        return _FOREVER


def _config(manager: ModelManager, entry: Entry) -> dict[str, Any]:
    try:
        return json.loads(manager.store.read_blob(entry.manifest.config.digest))
    except (OSError, ValueError):
        return {}


def _details(manager: ModelManager, entry: Entry) -> Details:
    config = _config(manager, entry)
    model = entry.manifest.layer(MODEL_MEDIA_TYPE)
    return Details(
        parent_model=(model.from_ or "") if model else "",
        format=config.get("model_format", "gguf"),
        family=config.get("model_family", ""),
        families=config.get("model_families"),
        parameter_size=config.get("model_type", ""),
        quantization_level=config.get("file_type", ""),
    )


def list_tags(manager: ModelManager) -> TagsResponse:
    models = []
    for entry in manager.store.list():
        size = sum(layer.size for layer in entry.manifest.layers) + entry.manifest.config.size
        name = entry.name.display()
        models.append(ListedModel(name=name, model=name, modified_at=_iso(entry.modified), size=size,
                                  digest=entry.digest.removeprefix("sha256:"), details=_details(manager, entry)))
    return TagsResponse(models=models)


def _text(manager: ModelManager, entry: Entry, media_type: str) -> str | None:
    layer = entry.manifest.layer(media_type)
    return manager.store.read_blob(layer.digest).decode() if layer else None


def modelfile_of(manager: ModelManager, entry: Entry) -> Modelfile:
    """The model as a Modelfile whose FROM lines name its blobs, so it parses back to the same model."""
    store = manager.store
    layers = entry.manifest.layers
    froms = [str(store.blob_path(layer.digest)) for layer in layers
             if layer.media_type in (MODEL_MEDIA_TYPE, PROJECTOR_MEDIA_TYPE)]
    params = json.loads(_text(manager, entry, PARAMS_MEDIA_TYPE) or "{}")
    return Modelfile(
        from_=froms,
        parameters=params,
        template=_text(manager, entry, TEMPLATE_MEDIA_TYPE),
        system=_text(manager, entry, SYSTEM_MEDIA_TYPE),
        adapters=[str(store.blob_path(layer.digest)) for layer in layers if layer.media_type == ADAPTER_MEDIA_TYPE],
        licenses=[store.read_blob(layer.digest).decode() for layer in layers
                  if layer.media_type == LICENSE_MEDIA_TYPE],
        messages=json.loads(_text(manager, entry, MESSAGES_MEDIA_TYPE) or "[]"),
    )


def capabilities(manager: ModelManager, entry: Entry, meta: dict[str, Any]) -> list[str]:
    arch = str(meta.get("general.architecture", ""))
    caps = ["embedding"] if arch in EMBEDDING_ARCHITECTURES else ["completion"]
    if entry.manifest.layer(PROJECTOR_MEDIA_TYPE) is not None:
        caps.append("vision")
    if "completion" in caps:
        # Every chat model takes tools: a template without tool support gets corral's tool preamble.
        caps.append("tools")
        if any(f"tokenizer.ggml.fim_{part}_token_id" in meta for part in ("pre", "suf", "mid")):
            caps.append("insert")
    return caps


def show(manager: ModelManager, raw: str | None) -> ShowResponse:
    entry = _find(manager, raw)
    model = entry.manifest.layer(MODEL_MEDIA_TYPE)
    meta: dict[str, Any] = {}
    if model:
        path = manager.store.blob_path(model.digest)
        try:  # weights damaged on disk make the reader fail in ways that do not say so
            check_gguf(path)
        except (GGUFError, OSError) as exc:
            raise EngineFailure(f"model '{entry.name}' is damaged: {model.digest}: {exc}") from None
        meta = gguf_metadata(path)
    template = _text(manager, entry, TEMPLATE_MEDIA_TYPE) or str(meta.get("tokenizer.chat_template", ""))
    modelfile = modelfile_of(manager, entry)
    params_lines = []
    for key, value in modelfile.parameters.items():
        for item in value if isinstance(value, list) else [value]:
            params_lines.append(f"{key:<30} {json.dumps(item) if isinstance(item, str) else item}")
    info = {k: v for k, v in meta.items() if k != "tokenizer.chat_template"}
    return ShowResponse(
        license="\n".join(modelfile.licenses),
        modelfile=render(modelfile),
        parameters="\n".join(params_lines),
        template=template,
        system=modelfile.system or "",
        details=_details(manager, entry),
        model_info={k: v if isinstance(v, (str, int, float, bool, list)) else str(v) for k, v in info.items()},
        capabilities=capabilities(manager, entry, meta),
        modified_at=_iso(entry.modified),
    )


def copy(manager: ModelManager, source: str, destination: str) -> None:
    src, dst = parse_name(source, "source"), parse_name(destination, "destination")
    try:
        store_manage.copy(manager.store, src, dst)
    except store_manage.NotInStore:
        raise ModelNotFound(source) from None


def delete(manager: ModelManager, raw: str | None) -> None:
    name = parse_name(raw)
    try:
        store_manage.delete(manager.store, name)
    except store_manage.NotInStore:
        raise ModelNotFound(raw or "") from None


def _parameters(values: dict[str, Any]) -> dict[str, Any]:
    for key, reason in NO_EFFECT_PARAMETERS.items():
        if key in values:
            raise InvalidRequest(f"parameter '{key}' has no effect here ({reason}); remove it", param="parameters")
    try:
        return coerce_parameters(values)
    except ModelfileError as exc:
        raise InvalidRequest(str(exc), param="parameters") from None


def _safetensors_files(files: dict[str, str]) -> dict[str, str] | None:
    """A safetensors folder, sent file by file (relative path -> blob), as Ollama's client sends one."""
    if not any(key.endswith(".safetensors") for key in files):
        return None
    if any(key.endswith(".gguf") for key in files):
        raise InvalidRequest("'files' mixes GGUF and safetensors files; send one model", param="files")
    if "config.json" not in files:
        raise InvalidRequest("a safetensors model needs its config.json beside the .safetensors files",
                             param="files")
    return dict(files)


def _spec(request: CreateRequest) -> store_manage.ModelSpec:
    safetensors = _safetensors_files(request.files or {})
    files = [] if safetensors is not None else list((request.files or {}).values())
    if request.from_ and (files or safetensors):
        raise InvalidRequest("give either 'from' or 'files', not both", param="from")
    if len(files) > 2:
        raise InvalidRequest("'files' holds the model GGUF and at most one projector GGUF", param="files")
    if request.template is not None:
        try:
            ChatTemplate(request.template)
        except TemplateRenderError as exc:
            raise InvalidRequest(f"TEMPLATE: {exc}", param="template") from None
    licenses = [request.license] if isinstance(request.license, str) else request.license
    return store_manage.ModelSpec(
        base=request.from_,
        model_blob=files[0] if files else None,
        safetensors_files=safetensors,
        projector_blob=files[1] if len(files) > 1 else None,
        adapter_blobs=list((request.adapters or {}).values()),
        template=request.template,
        system=request.system,
        licenses=licenses,
        parameters=_parameters(request.parameters or {}),
        messages=[m.model_dump() for m in request.messages] if request.messages is not None else None,
    )


async def create(manager: ModelManager, request: CreateRequest) -> AsyncIterator[StatusResponse]:
    """Validates the whole request first (errors before any output), then streams Ollama's statuses."""
    name = parse_name(request.target())
    spec = _spec(request)
    statuses: list[str] = []
    try:
        await asyncio.to_thread(store_manage.create, manager.store, name, spec, statuses.append)
    except store_manage.NotInStore as exc:
        raise InvalidRequest(f"FROM model '{exc.name}' not found; pull it first", param="from") from None
    except store_manage.StoreError as exc:
        raise InvalidRequest(str(exc)) from None
    for status in statuses:
        yield StatusResponse(status=status)
    yield StatusResponse(status="success")


def has_blob(manager: ModelManager, digest: str) -> bool:
    try:
        return manager.store.blob_path(digest).is_file()
    except ValueError:
        raise InvalidRequest(f"invalid digest {digest!r}", param="digest") from None


async def put_blob(manager: ModelManager, digest: str, chunks: AsyncIterator[bytes]) -> None:
    """Streams an upload to a temporary file and renames it into place only if its sha256 matches."""
    try:
        target = manager.store.blob_path(digest)
    except ValueError:
        raise InvalidRequest(f"invalid digest {digest!r}", param="digest") from None
    hasher = hashlib.sha256()
    fd, tmp = tempfile.mkstemp(dir=manager.store.blobs, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as fh:
            async for chunk in chunks:
                hasher.update(chunk)
                fh.write(chunk)
        actual = "sha256:" + hasher.hexdigest()
        if actual != digest:
            raise InvalidRequest(f"digest mismatch: the upload is {actual}, not {digest}", param="digest")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def version() -> VersionResponse:
    return VersionResponse(version=__version__)


# Ollama's expires_at for a model that never unloads: a time far beyond any real one.
_FOREVER = "2318-11-26T00:00:00Z"


def running(manager: ModelManager) -> PsResponse:
    """What /api/ps lists: every loaded engine, with its memory (weights plus KV cache) and planned unload."""
    models = []
    for engine, expires_at in manager.running():
        entry = engine.entry
        name = entry.name.display()
        when = _iso(expires_at) if expires_at is not None else _FOREVER
        models.append(RunningModel(name=name, model=name, size=engine.memory_bytes(), digest=entry.digest.removeprefix(
            "sha256:"), details=_details(manager, entry), expires_at=when, context_length=engine.n_ctx))
    return PsResponse(models=models)
