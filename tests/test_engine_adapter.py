"""A LoRA ADAPTER layer changes what the model says; the adapter GGUF is written here with `gguf`."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from gguf import GGUFWriter
from openai import OpenAI

from conftest import MODEL, start_server, stop_server


def write_lora(path, magnitude: float, rank: int = 4, layers: int = 30, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    writer = GGUFWriter(str(path), "llama")
    writer.add_string("general.type", "adapter")
    writer.add_string("adapter.type", "lora")
    writer.add_float32("adapter.lora.alpha", float(rank))
    for layer in range(layers):
        base = f"blk.{layer}.attn_q.weight"
        writer.add_tensor(base + ".lora_a", (rng.standard_normal((rank, 576)) * magnitude).astype(np.float32))
        writer.add_tensor(base + ".lora_b", (rng.standard_normal((576, rank)) * magnitude).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapter")
    server = start_server(root / "models", root / "server.log")
    yield server
    stop_server(server)


def create(srv, name, modelfile, folder):
    (folder / "Modelfile").write_text(modelfile)
    env = {**os.environ, "CORRAL_HOST": srv.url.removeprefix("http://")}
    return subprocess.run([sys.executable, "-m", "corral", "create", name, "-f", str(folder / "Modelfile")],
                          env=env, capture_output=True, text=True, timeout=300)


def test_adapter_changes_the_output_and_a_zero_adapter_does_not(srv, tmp_path):
    write_lora(tmp_path / "strong.gguf", magnitude=0.5)
    write_lora(tmp_path / "zero.gguf", magnitude=0.0)
    assert create(srv, "strong", f"FROM {MODEL}\nADAPTER ./strong.gguf\n", tmp_path).returncode == 0
    assert create(srv, "zero", f"FROM {MODEL}\nADAPTER ./zero.gguf\n", tmp_path).returncode == 0
    client = OpenAI(base_url=srv.url + "/v1/", api_key="x", max_retries=0)

    def say(model):
        return client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Tell me a story"}],
                                              temperature=0, max_tokens=12).choices[0].message.content

    base = say(MODEL)
    assert say("zero") == base
    assert say("strong") != base


def test_an_adapter_that_is_not_gguf_is_refused(srv, tmp_path):
    (tmp_path / "junk.gguf").write_bytes(b"junk" * 100)
    out = create(srv, "junky", f"FROM {MODEL}\nADAPTER ./junk.gguf\n", tmp_path)
    assert out.returncode == 1 and "not a GGUF" in out.stderr
