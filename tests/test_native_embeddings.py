"""Ollama's /api/embed and /api/embeddings, and embedding models made from safetensors folders."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
from safetensors.numpy import save_file

from conftest import EMBED_MODEL, unload_models
from corral.store.names import Name
from corral.store.store import MODEL_MEDIA_TYPE, Store

LONG = "word " * 600  # 602 tokens with [CLS] and [SEP]; all-minilm holds 512


@pytest.fixture(scope="module", autouse=True)
def _leave_nothing_loaded(http):
    yield
    unload_models(http, EMBED_MODEL)


def _embed(http, **body):
    return http.post("/api/embed", json={"model": EMBED_MODEL, **body})


def test_embed_answers_in_ollamas_shape(http, client):
    r = _embed(http, input=["why is the sky blue?", "why is the grass green?"])
    assert r.status_code == 200
    body = r.json()
    assert set(body) == {"model", "embeddings", "total_duration", "load_duration", "prompt_eval_count"}
    assert body["model"] == EMBED_MODEL and body["prompt_eval_count"] == 16
    vectors = np.array(body["embeddings"])
    assert vectors.shape == (2, 384) and np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert body["total_duration"] >= body["load_duration"] >= 0 and body["total_duration"] > 0
    same = client.embeddings.create(model=EMBED_MODEL, input="why is the sky blue?").data[0].embedding
    assert np.allclose(vectors[0], same, atol=1e-6)
    single = _embed(http, input="why is the sky blue?").json()
    assert np.allclose(single["embeddings"][0], vectors[0], atol=1e-6)


def test_embed_truncates_unless_told_not_to(http):
    body = _embed(http, input=LONG).json()
    assert body["prompt_eval_count"] == 512 and len(body["embeddings"][0]) == 384
    r = _embed(http, input=["short", LONG], truncate=False)
    assert r.status_code == 400
    assert "input[1] has 602 tokens" in r.json()["error"] and "512" in r.json()["error"]


def test_embed_dimensions_and_empty_input(http):
    body = _embed(http, input="hello", dimensions=10).json()
    assert len(body["embeddings"][0]) == 10 and abs(np.linalg.norm(body["embeddings"][0]) - 1) < 1e-5
    for empty in ({}, {"input": ""}, {"input": []}):  # Ollama's preload: the model loads, nothing is embedded
        r = _embed(http, **empty)
        assert r.status_code == 200 and r.json()["embeddings"] == [] and r.json()["prompt_eval_count"] == 0
    assert _embed(http, input=["a", ""]).status_code == 400
    assert _embed(http, input="x", dimensions=999).status_code == 400


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        ({"keep_alive": "5 minutes"}, "keep_alive"),
        ({"options": {"temperature": 0.1}}, "temperature"),
        ({"options": {"num_ctx": 4096}}, "512"),
        ({"input": [1, 2]}, "input"),
        ({"prompt": "x"}, "prompt"),
    ],
)
def test_embed_refuses_what_it_cannot_honour(http, extra, needle):
    r = _embed(http, **{"input": "x", **extra})
    assert r.status_code == 400 and needle in r.json()["error"], r.text


def test_embed_honours_keep_alive(http, server):
    assert _embed(http, input="x", keep_alive="1h").status_code == 200
    assert _embed(http, input="x", keep_alive=0).status_code == 200  # unloaded once the request is done
    deadline = time.monotonic() + 10
    while "all-minilm:latest" in [m["name"] for m in http.get("/api/ps").json()["models"]]:
        assert time.monotonic() < deadline, "keep_alive 0 did not unload the model"
        time.sleep(0.1)
    body = _embed(http, input="x", keep_alive=-1).json()  # loads again, and stays
    assert len(body["embeddings"]) == 1 and body["load_duration"] > 0


def test_legacy_embeddings_are_not_normalised(http):
    r = http.post("/api/embeddings", json={"model": EMBED_MODEL, "prompt": "why is the sky blue?"})
    assert r.status_code == 200 and set(r.json()) == {"embedding"}
    raw = np.array(r.json()["embedding"])
    assert raw.shape == (384,) and abs(np.linalg.norm(raw) - 1) > 0.1  # as Ollama's legacy route answers
    unit = _embed(http, input="why is the sky blue?").json()["embeddings"][0]
    assert np.allclose(raw / np.linalg.norm(raw), unit, atol=1e-5)
    assert http.post("/api/embeddings", json={"model": EMBED_MODEL, "prompt": ""}).json() == {"embedding": []}
    assert http.post("/api/embeddings", json={"model": "nope", "prompt": "x"}).status_code == 404


def test_show_lists_the_embedding_capability(http):
    body = http.post("/api/show", json={"model": EMBED_MODEL}).json()
    assert body["capabilities"] == ["embedding"]
    assert body["details"]["family"] == "bert" and body["details"]["parameter_size"] == "23M"
    assert body["model_info"]["bert.pooling_type"] == 1


def _corral(server, *args, cwd=None):
    env = {**os.environ, "CORRAL_HOST": server.url.removeprefix("http://")}
    return subprocess.run([sys.executable, "-m", "corral", *args], env=env, cwd=cwd, capture_output=True,
                          check=False, text=True, timeout=300)


def test_create_from_a_safetensors_folder(server, http, minilm_dir, tmp_path):
    """The CLI uploads the folder's files; the server converts them. The converter is deterministic, so
    the result is the very blob the bundled import made."""
    (tmp_path / "Modelfile").write_text(f"FROM {minilm_dir}\nPARAMETER num_ctx 256\n")
    out = _corral(server, "create", "team/all-minilm:v1", "-f", str(tmp_path / "Modelfile"))
    assert out.returncode == 0, out.stderr
    assert "converting model" in out.stdout and "success" in out.stdout
    store = Store(server.models_dir)
    made = store.find(Name.parse("team/all-minilm:v1")).manifest.layer(MODEL_MEDIA_TYPE)
    assert made.digest == store.find(Name.parse(EMBED_MODEL)).manifest.layer(MODEL_MEDIA_TYPE).digest
    r = http.post("/v1/embeddings", json={"model": "team/all-minilm:v1", "input": "word " * 300})
    assert r.status_code == 400 and "256" in r.json()["error"]["message"]  # the model's num_ctx is honoured
    a = http.post("/v1/embeddings", json={"model": "team/all-minilm:v1", "input": "hello"}).json()["data"][0]
    b = http.post("/v1/embeddings", json={"model": EMBED_MODEL, "input": "hello"}).json()["data"][0]
    assert np.allclose(a["embedding"], b["embedding"], atol=1e-6)
    unload_models(http, "team/all-minilm:v1")
    assert http.request("DELETE", "/api/delete", json={"model": "team/all-minilm:v1"}).status_code == 200


def test_create_refuses_architectures_it_cannot_convert(server, http, tmp_path):
    folder = tmp_path / "llama"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}))
    save_file({"model.embed_tokens.weight": np.zeros((4, 2), dtype=np.float32)}, str(folder / "model.safetensors"))
    (tmp_path / "Modelfile").write_text(f"FROM {folder}\n")
    out = _corral(server, "create", "llama-from-folder", "-f", str(tmp_path / "Modelfile"))
    assert out.returncode != 0 and "LlamaForCausalLM" in out.stderr
    # the same through the API: a 400 naming the architecture, and nothing listed
    digests = {}
    for name in ("config.json", "model.safetensors"):
        data = (folder / name).read_bytes()
        digests[name] = "sha256:" + hashlib.sha256(data).hexdigest()
        assert http.post(f"/api/blobs/{digests[name]}", content=data).status_code in (200, 201)
    r = http.post("/api/create", json={"model": "llama-from-folder", "files": digests, "stream": False})
    assert r.status_code == 400 and "cannot convert architecture 'LlamaForCausalLM'" in r.json()["error"]
    assert "llama-from-folder:latest" not in [m["name"] for m in http.get("/api/tags").json()["models"]]
