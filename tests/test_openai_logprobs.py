"""Log-probabilities: chat's `logprobs`/`top_logprobs` and completions' legacy `logprobs`, with `echo`."""

from __future__ import annotations

import math

import openai
import pytest

from conftest import MODEL

STORY = [{"role": "user", "content": "Write a long story about a dragon who learns to cook."}]


def chat(client, **kw):
    return client.chat.completions.create(model=MODEL, messages=STORY, **kw)


def test_chat_logprobs_cover_every_token_and_join_to_the_content(client):
    r = chat(client, temperature=0, max_tokens=20, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens == 20
    assert "".join(e.token for e in content) == r.choices[0].message.content
    for e in content:
        assert e.logprob <= 0 and bytes(e.bytes).decode("utf-8", "replace") == e.token
        assert len(e.top_logprobs) == 3
        lps = [t.logprob for t in e.top_logprobs]
        assert lps == sorted(lps, reverse=True)
        # greedy: the chosen token is its own top-1 under the raw distribution
        assert e.top_logprobs[0].token == e.token and math.isclose(e.top_logprobs[0].logprob, e.logprob)


def test_top_logprobs_are_a_distribution(client):
    r = chat(client, temperature=1.0, seed=3, max_tokens=8, logprobs=True, top_logprobs=20)
    for e in r.choices[0].logprobs.content:
        assert len(e.top_logprobs) == 20
        assert sum(math.exp(t.logprob) for t in e.top_logprobs) <= 1.0 + 1e-6
        assert e.logprob <= e.top_logprobs[0].logprob + 1e-9


def test_logprobs_off_or_zero_alternatives(client):
    assert chat(client, max_tokens=3).choices[0].logprobs is None
    r = chat(client, max_tokens=3, logprobs=True, top_logprobs=0)
    assert all(e.top_logprobs == [] for e in r.choices[0].logprobs.content)
    r = chat(client, max_tokens=3, logprobs=True)
    assert len(r.choices[0].logprobs.content) == 3


def test_bad_logprob_requests_are_400(client):
    with pytest.raises(openai.BadRequestError) as err:
        chat(client, top_logprobs=2)
    assert err.value.param == "top_logprobs"
    with pytest.raises(openai.BadRequestError) as err:
        chat(client, logprobs=True, top_logprobs=21)
    assert err.value.param == "top_logprobs"


def test_streamed_logprobs_ride_with_their_tokens(client):
    want = chat(client, temperature=0, max_tokens=15, logprobs=True, top_logprobs=2)
    chunks = list(chat(client, temperature=0, max_tokens=15, logprobs=True, top_logprobs=2, stream=True))
    streamed = []
    for c in chunks:
        if c.choices and c.choices[0].delta.content:
            entries = c.choices[0].logprobs.content
            assert "".join(e.token for e in entries) == c.choices[0].delta.content
            streamed += entries
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in want.choices[0].logprobs.content]


def test_stop_string_tokens_have_no_entries(client):
    full = chat(client, temperature=0, max_tokens=30).choices[0].message.content
    stop = full[10:16]
    r = chat(client, temperature=0, max_tokens=30, stop=[stop], logprobs=True)
    text = r.choices[0].message.content
    assert stop not in text
    joined = "".join(e.token for e in r.choices[0].logprobs.content)
    assert text.startswith(joined) and len(text) - len(joined) < 8  # at most the token the stop began in


def test_completions_legacy_logprobs(client):
    r = client.completions.create(model=MODEL, prompt="The capital of France is", temperature=0, max_tokens=6,
                                  logprobs=3)
    lp = r.choices[0].logprobs
    n = r.usage.completion_tokens
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == n
    assert "".join(lp.tokens) == r.choices[0].text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(n)]
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert len(top) == 3 and max(top.values()) == pytest.approx(logprob) and top.get(token) == pytest.approx(logprob)


def test_completions_echo_includes_the_prompt_tokens(client):
    prompt = "One, two, three,"
    r = client.completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=4, logprobs=1, echo=True)
    lp = r.choices[0].logprobs
    assert r.choices[0].text.startswith(prompt)
    assert "".join(lp.tokens) == r.choices[0].text
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(x is not None and x <= 0 for x in lp.token_logprobs[1:])
    streamed = list(client.completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=4, logprobs=1,
                                              echo=True, stream=True))
    tokens = [t for c in streamed if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.tokens]
    assert tokens == lp.tokens


def test_completions_logprobs_above_5_is_400(client):
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=MODEL, prompt="x", logprobs=6)
    assert err.value.param == "logprobs"


def test_best_of_returns_the_highest_mean_logprob(client):
    kw = dict(model=MODEL, prompt="Once upon a time", temperature=1.0, seed=9, max_tokens=8, logprobs=0)
    candidates = client.completions.create(n=3, **kw).choices
    means = {c.text: sum(c.logprobs.token_logprobs) / len(c.logprobs.token_logprobs) for c in candidates}
    best = client.completions.create(n=1, best_of=3, **kw).choices[0]
    assert best.text == max(means, key=means.get)
