"""/v1/embeddings through the official client: fidelity to sentence-transformers, every input form, errors."""

from __future__ import annotations

import base64
import concurrent.futures

import numpy as np
import openai
import pytest

from conftest import EMBED_MODEL, MODEL, unload_models


@pytest.fixture(scope="module", autouse=True)
def _leave_nothing_loaded(http):
    yield
    unload_models(http, EMBED_MODEL, MODEL)


def _vectors(response) -> np.ndarray:
    assert [d.index for d in response.data] == list(range(len(response.data)))
    return np.array([d.embedding for d in response.data], dtype=np.float32)


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def reference_run(client, minilm_reference):
    return client.embeddings.create(model=EMBED_MODEL, input=minilm_reference["sentences"])


def test_vectors_match_sentence_transformers(reference_run, minilm_reference):
    ours = _vectors(reference_run)
    theirs = np.array(minilm_reference["embeddings"], dtype=np.float32)
    assert ours.shape == theirs.shape == (20, 384)
    worst = min(_cos(a, b) for a, b in zip(ours, theirs))
    assert worst >= 0.999, worst
    assert np.allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)  # L2-normalised


def test_usage_counts_every_token(reference_run, minilm_reference):
    n = sum(len(t) for t in minilm_reference["token_ids"])
    assert reference_run.usage.prompt_tokens == reference_run.usage.total_tokens == n
    assert reference_run.model == EMBED_MODEL and reference_run.object == "list"
    assert all(d.object == "embedding" for d in reference_run.data)


def test_meaning_orders_similarity(client):
    cat, kitten, stocks = _vectors(client.embeddings.create(
        model=EMBED_MODEL, input=["the cat sits on the mat", "a kitten rests on a rug", "stock markets fell today"]))
    assert _cos(cat, kitten) > _cos(cat, stocks) + 0.3
    assert _cos(cat, kitten) > _cos(kitten, stocks) + 0.3
    sky, grass, sky2 = _vectors(client.embeddings.create(
        model="all-minilm:latest", input=["why is the sky blue?", "why is the grass green?", "what makes the sky blue"]))
    assert _cos(sky, sky2) > _cos(sky, grass)


def test_every_input_form_gives_the_same_vector(client, reference_run, minilm_reference):
    """A string, a list of strings, its token ids, and a list of token-id lists (HF ids = corral's ids)."""
    first, second = reference_run.data[0].embedding, reference_run.data[1].embedding
    tokens = minilm_reference["token_ids"]
    forms = [
        (minilm_reference["sentences"][0], [first]),
        (minilm_reference["sentences"][:2], [first, second]),
        (tokens[0], [first]),
        (tokens[:2], [first, second]),
    ]
    for value, expected in forms:
        got = _vectors(client.embeddings.create(model=EMBED_MODEL, input=value))
        assert got.shape == (len(expected), 384), value
        for g, e in zip(got, expected):
            assert _cos(g, np.array(e)) > 0.99999


def test_base64_decodes_to_the_float_values(http):
    body = {"model": EMBED_MODEL, "input": ["hello world", "why is the sky blue?"]}
    floats = http.post("/v1/embeddings", json={**body, "encoding_format": "float"}).json()
    encoded = http.post("/v1/embeddings", json={**body, "encoding_format": "base64"}).json()
    for f, e in zip(floats["data"], encoded["data"]):
        decoded = np.frombuffer(base64.b64decode(e["embedding"]), dtype="<f4")
        assert decoded.shape == (384,)
        assert np.array_equal(decoded, np.array(f["embedding"], dtype=np.float32))  # JSON floats are exact float32
    assert encoded["usage"] == floats["usage"]


def test_dimensions_truncate_then_renormalise(client):
    full = _vectors(client.embeddings.create(model=EMBED_MODEL, input="why is the sky blue?"))[0]
    short = _vectors(client.embeddings.create(model=EMBED_MODEL, input="why is the sky blue?", dimensions=64))[0]
    assert short.shape == (64,)
    assert np.allclose(short, full[:64] / np.linalg.norm(full[:64]), atol=1e-6)
    with pytest.raises(openai.BadRequestError) as err:
        client.embeddings.create(model=EMBED_MODEL, input="x", dimensions=385)
    assert "385" in err.value.message and "384" in err.value.message and err.value.param == "dimensions"


def test_items_keep_input_order_across_batches(client):
    """300 inputs take several engine batches; each item still matches its own single-input vector."""
    inputs = [f"sentence number {i}: {'alpha beta gamma ' * (i % 7)}" for i in range(300)]
    many = _vectors(client.embeddings.create(model=EMBED_MODEL, input=inputs))
    assert many.shape == (300, 384)
    for i in (0, 1, 150, 299):
        one = _vectors(client.embeddings.create(model=EMBED_MODEL, input=inputs[i]))[0]
        assert _cos(one, many[i]) > 0.99999


def test_concurrent_requests_all_answer_correctly(client):
    texts = [f"concurrent request {i} about {'cats' if i % 2 else 'markets'}" for i in range(8)]
    alone = [_vectors(client.embeddings.create(model=EMBED_MODEL, input=t))[0] for t in texts]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        together = list(pool.map(lambda t: _vectors(client.embeddings.create(model=EMBED_MODEL, input=[t] * 4)),
                                 texts))
    for a, group in zip(alone, together):
        assert all(_cos(a, g) > 0.99999 for g in group)


def test_a_generative_model_embeds_too(client):
    """As in Ollama: mean pooling over a decoder's last hidden states."""
    a, b, c = _vectors(client.embeddings.create(
        model=MODEL, input=["the cat sits on the mat", "a kitten rests on a rug", "stock markets fell today"]))
    assert a.shape == (576,)
    assert np.allclose(np.linalg.norm([a, b, c], axis=1), 1.0, atol=1e-5)
    assert _cos(a, b) > _cos(a, c)


@pytest.mark.parametrize(
    ("body", "needle", "param"),
    [
        ({"input": []}, "empty", "input"),
        ({"input": ""}, "empty string", "input"),
        ({"input": ["a", ""]}, "input[1]", "input"),
        ({"input": [[101, 7592], []]}, "input[1]", "input"),
        ({"input": [101, 99999]}, "99999", "input"),
        ({"input": "x", "encoding_format": "json"}, "encoding_format", "encoding_format"),
        ({"input": "x", "dimensions": 0}, "dimensions", "dimensions"),
        ({"input": [1.5]}, "input[0]", "input[0]"),
        ({"input": "x", "truncate": True}, "truncate", "truncate"),
    ],
)
def test_bad_requests_are_400_naming_the_field(http, body, needle, param):
    r = http.post("/v1/embeddings", json={"model": EMBED_MODEL, **body})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert needle in error["message"] and error["param"] == param
    assert error["type"] == "invalid_request_error"


def test_over_long_input_is_400_with_both_numbers(client):
    with pytest.raises(openai.BadRequestError) as err:
        client.embeddings.create(model=EMBED_MODEL, input=["fine", "word " * 600])
    assert "input[1] has 602 tokens" in err.value.message and "512" in err.value.message
    assert err.value.code == "context_length_exceeded"


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as err:
        client.embeddings.create(model="text-embedding-3-small", input="x")
    assert "text-embedding-3-small" in err.value.message


def test_an_embedding_model_refuses_chat(client):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=EMBED_MODEL, messages=[{"role": "user", "content": "hi"}])
    assert "does not support chat" in err.value.message and "all-minilm" in err.value.message
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=EMBED_MODEL, prompt="hi")
