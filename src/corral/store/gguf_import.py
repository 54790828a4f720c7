"""Turn a GGUF file into a stored model: a model layer plus an Ollama-style config blob."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gguf import GGUFReader, LlamaFileType

from .names import Name
from .store import CONFIG_MEDIA_TYPE, MODEL_MEDIA_TYPE, Layer, Manifest, Store


def gguf_metadata(path: Path) -> dict[str, Any]:
    """The scalar and string key/values of a GGUF header (token tables are skipped: they are large)."""
    reader = GGUFReader(str(path))
    meta: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if key.startswith("tokenizer.ggml.") and key.endswith(("tokens", "merges", "token_type", "scores")):
            continue
        try:
            meta[key] = field.contents()
        except Exception:  # an exotic field type is not needed for the config
            continue
    return meta


def model_config(meta: dict[str, Any]) -> dict[str, Any]:
    """The config blob Ollama writes beside a GGUF model layer (ConfigV2)."""
    arch = str(meta.get("general.architecture", ""))
    file_type = meta.get("general.file_type")
    try:
        file_type_name = (LlamaFileType(int(file_type)).name.removeprefix("MOSTLY_").removeprefix("ALL_")
                          if file_type is not None else "")
    except ValueError:
        file_type_name = str(file_type)
    config: dict[str, Any] = {
        "model_format": "gguf",
        "model_family": arch,
        "model_families": [arch] if arch else [],
        "model_type": str(meta.get("general.size_label", "")),
        "file_type": file_type_name,
        "architecture": "amd64",
        "os": "linux",
    }
    if (ctx := meta.get(f"{arch}.context_length")) is not None:
        config["context_length"] = int(ctx)
    if (embd := meta.get(f"{arch}.embedding_length")) is not None:
        config["embedding_length"] = int(embd)
    return config


def import_gguf(store: Store, name: Name, path: Path, extra_layers: list[Layer] | None = None) -> Manifest:
    model_layer = store.put_file(path, MODEL_MEDIA_TYPE)
    config_layer = store.put_json(model_config(gguf_metadata(path)), CONFIG_MEDIA_TYPE)
    manifest = Manifest(config=config_layer, layers=[model_layer, *(extra_layers or [])])
    store.write_manifest(name, manifest)
    return manifest
