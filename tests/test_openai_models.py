"""/v1/models and /v1/models/{model}."""

from __future__ import annotations

import openai
import pytest

from conftest import MODEL
from corral.store.names import Name
from corral.store.store import Store


def test_list_has_the_bundled_model(client, server):
    models = client.models.list()
    assert models.object == "list"
    ids = [m.id for m in models.data]
    assert MODEL in ids
    entry = Store(server.models_dir).find(Name.parse(MODEL))
    item = next(m for m in models.data if m.id == MODEL)
    assert item.object == "model"
    assert item.owned_by == "library"
    assert item.created == int(entry.modified)


def test_retrieve_echoes_the_name_asked_for(client):
    m = client.models.retrieve(MODEL)
    assert m.id == MODEL and m.object == "model" and m.owned_by == "library"
    assert client.models.retrieve("SmolLM2:135M").id == "SmolLM2:135M"  # names are case-insensitive


def test_retrieve_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as err:
        client.models.retrieve("no-such-model:7b")
    assert "no-such-model:7b" in err.value.message
    assert err.value.code == "model_not_found"


def test_unknown_model_in_generation_is_404_naming_it(client):
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    assert "'gpt-4o'" in err.value.message
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4o", prompt="hi")


def test_curl_models(http):
    r = http.get("/v1/models")
    assert r.status_code == 200 and r.json()["object"] == "list"
    r = http.get(f"/v1/models/{MODEL}")
    assert r.status_code == 200 and r.json()["id"] == MODEL
