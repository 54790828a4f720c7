"""Creating, copying and deleting models: manifests built from layers, blobs collected when unused.

A create validates everything it is given before it writes the manifest, and the manifest is the last
thing written, so a failed create leaves the store listing exactly what it listed before.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from .gguf_check import GGUFError, check_gguf
from .gguf_import import gguf_metadata, model_config
from .names import Name
from .safetensors_convert import ConvertError, convert_to_layers
from .store import (
    ADAPTER_MEDIA_TYPE,
    CONFIG_MEDIA_TYPE,
    LICENSE_MEDIA_TYPE,
    MESSAGES_MEDIA_TYPE,
    MODEL_MEDIA_TYPE,
    PARAMS_MEDIA_TYPE,
    PROJECTOR_MEDIA_TYPE,
    SYSTEM_MEDIA_TYPE,
    TEMPLATE_MEDIA_TYPE,
    Layer,
    Manifest,
    Store,
)

# The order Ollama writes layers in; `show` and `push` see the same order.
LAYER_ORDER = [
    MODEL_MEDIA_TYPE,
    PROJECTOR_MEDIA_TYPE,
    ADAPTER_MEDIA_TYPE,
    TEMPLATE_MEDIA_TYPE,
    SYSTEM_MEDIA_TYPE,
    PARAMS_MEDIA_TYPE,
    MESSAGES_MEDIA_TYPE,
    LICENSE_MEDIA_TYPE,
]
GGUF_MAGIC = b"GGUF"


class StoreError(ValueError):
    """The request cannot be carried out on this store; the message says why."""


class NotInStore(LookupError):
    def __init__(self, name: str) -> None:
        super().__init__(f"model '{name}' not found")
        self.name = name


@dataclass
class ModelSpec:
    """What a create asks for: a base (an existing model or uploaded GGUF blobs) and what to change."""

    base: str | None = None  # FROM an existing model, by name
    model_blob: str | None = None  # FROM a GGUF file, uploaded as this blob
    safetensors_files: dict[str, str] | None = None  # FROM a safetensors folder: relative path -> blob
    projector_blob: str | None = None  # a second FROM: a vision projector GGUF
    adapter_blobs: list[str] = field(default_factory=list)
    template: str | None = None
    system: str | None = None
    licenses: list[str] | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
    messages: list[dict[str, str]] | None = None


def _uploaded(store: Store, digest: str, what: str) -> Path:
    """The path of a blob the client says it uploaded; a bad digest or a missing blob is the request's fault."""
    try:
        path = store.blob_path(digest)
    except ValueError as exc:
        raise StoreError(str(exc)) from None
    if not path.is_file():
        raise StoreError(f"{what} blob {digest} has not been uploaded")
    return path


def _require_gguf(store: Store, digest: str, what: str) -> Path:
    path = _uploaded(store, digest, what)
    with open(path, "rb") as fh:
        if fh.read(4) != GGUF_MAGIC:
            raise StoreError(f"{what} is not a GGUF file ({digest})")
    try:
        check_gguf(path)
    except GGUFError as exc:
        raise StoreError(f"{what} is damaged ({digest}): {exc}") from None
    return path


def _convert_folder(store: Store, files: dict[str, str], name: Name) -> tuple[Layer, Layer]:
    """Lays the uploaded files out as the folder they came from (links to the blobs) and converts it."""
    with tempfile.TemporaryDirectory(prefix="corral-convert-") as tmp:
        folder = Path(tmp)
        for relative, digest in files.items():
            parts = PurePosixPath(relative.replace("\\", "/")).parts
            if not parts or any(p in ("", ".", "..") for p in parts) or relative.startswith(("/", "\\")):
                raise StoreError(f"file name {relative!r} is not a relative path inside the model folder")
            target = folder.joinpath(*parts)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(_uploaded(store, digest, f"{relative}:"), target)
        try:
            return convert_to_layers(store, folder, name.model)
        except ConvertError as exc:
            raise StoreError(f"cannot convert the safetensors model: {exc}") from None


def create(store: Store, name: Name, spec: ModelSpec, progress: Callable[[str], None] = lambda _: None) -> Manifest:
    layers: dict[str, list[Layer]] = {}
    if spec.safetensors_files is not None:
        progress("converting model")
        model_layer, config = _convert_folder(store, spec.safetensors_files, name)
        layers[MODEL_MEDIA_TYPE] = [model_layer]
        progress(f"using model layer {model_layer.digest}")
    elif spec.base is not None:
        try:
            base_name = Name.parse(spec.base)
        except ValueError as exc:
            raise StoreError(str(exc)) from None
        base = store.find(base_name)
        if base is None:
            raise NotInStore(spec.base)
        for layer in base.manifest.layers:
            layers.setdefault(layer.media_type, []).append(layer)
        model = layers.get(MODEL_MEDIA_TYPE)
        if model:
            model[0] = model[0].model_copy(update={"from_": base.name.display()})
        config = base.manifest.config
        progress(f"using existing model {base.name.display()}")
    elif spec.model_blob is not None:
        path = _require_gguf(store, spec.model_blob, "the model file")
        meta = gguf_metadata(path)
        if meta.get("general.architecture") == "clip":
            raise StoreError("the first FROM is a vision projector; FROM the model first, then the projector")
        layers[MODEL_MEDIA_TYPE] = [Layer(media_type=MODEL_MEDIA_TYPE, digest=spec.model_blob, size=path.stat().st_size)]
        config = store.put_json(model_config(meta), CONFIG_MEDIA_TYPE)
        progress(f"using model layer {spec.model_blob}")
    else:
        raise StoreError("a model needs a FROM: an existing model or a GGUF file")

    if spec.projector_blob is not None:
        path = _require_gguf(store, spec.projector_blob, "the projector file")
        if gguf_metadata(path).get("general.architecture") != "clip":
            raise StoreError("the second FROM is not a vision projector GGUF (general.architecture is not 'clip')")
        layers[PROJECTOR_MEDIA_TYPE] = [
            Layer(media_type=PROJECTOR_MEDIA_TYPE, digest=spec.projector_blob, size=path.stat().st_size)
        ]
    for digest in spec.adapter_blobs:
        path = _require_gguf(store, digest, "the adapter file")
        layers.setdefault(ADAPTER_MEDIA_TYPE, []).append(
            Layer(media_type=ADAPTER_MEDIA_TYPE, digest=digest, size=path.stat().st_size)
        )

    def text_layer(media_type: str, text: str) -> list[Layer]:
        layer = store.put_bytes(text.encode(), media_type)
        progress(f"writing layer {layer.digest}")
        return [layer]

    if spec.template is not None:
        layers[TEMPLATE_MEDIA_TYPE] = text_layer(TEMPLATE_MEDIA_TYPE, spec.template)
    if spec.system is not None:
        layers[SYSTEM_MEDIA_TYPE] = text_layer(SYSTEM_MEDIA_TYPE, spec.system)
    if spec.parameters:
        inherited = {}
        if PARAMS_MEDIA_TYPE in layers:
            inherited = json.loads(store.read_blob(layers[PARAMS_MEDIA_TYPE][0].digest))
        layers[PARAMS_MEDIA_TYPE] = [store.put_json({**inherited, **spec.parameters}, PARAMS_MEDIA_TYPE)]
    if spec.messages is not None:
        layers[MESSAGES_MEDIA_TYPE] = [store.put_json(spec.messages, MESSAGES_MEDIA_TYPE)] if spec.messages else []
    if spec.licenses is not None:
        layers[LICENSE_MEDIA_TYPE] = [store.put_bytes(t.encode(), LICENSE_MEDIA_TYPE) for t in spec.licenses]

    ordered = [layer for media_type in LAYER_ORDER for layer in layers.get(media_type, [])]
    ordered += [layer for media_type, group in layers.items() if media_type not in LAYER_ORDER for layer in group]
    manifest = Manifest(config=config, layers=ordered)
    progress("writing manifest")
    store.write_manifest(name, manifest)
    return manifest


def copy(store: Store, source: Name, destination: Name) -> None:
    """Writes a second manifest (the same bytes); the blobs are shared."""
    entry = store.find(source)
    if entry is None:
        raise NotInStore(source.display())
    if entry.name.key() == destination.key():
        return
    store.write_manifest_bytes(destination, entry.path.read_bytes())


def delete(store: Store, name: Name) -> list[str]:
    """Removes the manifest, then every blob of it no remaining manifest uses; returns the removed digests."""
    entry = store.find(name)
    if entry is None:
        raise NotInStore(name.display())
    entry.path.unlink()
    for parent in list(entry.path.parents)[:3]:  # tag's model/namespace/host folders, when empty
        try:
            parent.rmdir()
        except OSError:
            break
    own = [entry.manifest.config.digest, *(layer.digest for layer in entry.manifest.layers)]
    return store.remove_unreferenced_blobs(own)
