"""Ollama's on-disk layout, and the bundled model import."""

import json

from corral.store.bundled import import_bundled
from corral.store.names import Name
from corral.store.store import CONFIG_MEDIA_TYPE, MODEL_MEDIA_TYPE, Manifest, Store


def test_blobs_are_content_addressed_and_deduplicated(tmp_path):
    store = Store(tmp_path)
    a = store.put_bytes(b"hello", "application/vnd.ollama.image.system")
    b = store.put_bytes(b"hello", "application/vnd.ollama.image.system")
    assert a.digest == b.digest and a.size == 5
    assert [p.name for p in store.blobs.iterdir()] == ["sha256-" + a.digest.split(":")[1]]


def test_manifest_round_trip_and_case_insensitive_find(tmp_path):
    store = Store(tmp_path)
    layer = store.put_bytes(b"weights", MODEL_MEDIA_TYPE)
    config = store.put_json({"model_format": "gguf"}, CONFIG_MEDIA_TYPE)
    store.write_manifest(Name.parse("Team/Model:V1"), Manifest(config=config, layers=[layer]))
    path = tmp_path / "manifests" / "registry.ollama.ai" / "Team" / "Model" / "V1"
    raw = json.loads(path.read_text())
    assert raw["schemaVersion"] == 2
    assert raw["mediaType"] == "application/vnd.docker.distribution.manifest.v2+json"
    assert raw["layers"][0] == {"mediaType": MODEL_MEDIA_TYPE, "digest": layer.digest, "size": 7}
    found = store.find(Name.parse("team/model:v1"))
    assert found is not None and found.name.display() == "Team/Model:V1"
    assert [e.name.display() for e in store.list()] == ["Team/Model:V1"]


def test_damaged_manifest_is_skipped_by_list(tmp_path):
    store = Store(tmp_path)
    bad = tmp_path / "manifests" / "registry.ollama.ai" / "library" / "broken" / "latest"
    bad.parent.mkdir(parents=True)
    bad.write_text("{not json")
    assert store.list() == []


def test_bundled_models_are_imported_once(tmp_path, gguf_path):
    store = Store(tmp_path)
    assert import_bundled(store) == ["smollm2:135m", "all-minilm"]
    assert import_bundled(store) == []
    entry = store.find(Name.parse("smollm2:135m"))
    assert entry is not None
    model = entry.manifest.layer(MODEL_MEDIA_TYPE)
    assert model.size == gguf_path.stat().st_size
    assert store.blob_path(model.digest).read_bytes()[:4] == b"GGUF"
    config = json.loads(store.read_blob(entry.manifest.config.digest))
    assert config["model_format"] == "gguf" and config["model_family"] == "llama"
    assert config["model_type"] == "135M" and config["file_type"] == "Q4_1"
    assert config["context_length"] == 8192
    minilm = store.find(Name.parse("all-minilm:latest"))  # converted from the package's safetensors
    assert minilm is not None
    assert store.blob_path(minilm.manifest.layer(MODEL_MEDIA_TYPE).digest).read_bytes()[:4] == b"GGUF"
    config = json.loads(store.read_blob(minilm.manifest.config.digest))
    assert config["model_family"] == "bert" and config["embedding_length"] == 384
    assert config["context_length"] == 512 and config["file_type"] == "F32" and config["model_type"] == "23M"
    assert not list(store.blobs.glob(".tmp-*"))  # the converter's temporary file became the blob
