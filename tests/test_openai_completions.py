"""/v1/completions through the official openai client: prompt forms, echo, suffix, best_of, n, streaming."""

from __future__ import annotations

import openai
import pytest

from conftest import MODEL, NUM_PARALLEL

PROMPT = "The capital of France is"


def greedy(client, prompt=PROMPT, **kw):
    return client.completions.create(model=MODEL, prompt=prompt, temperature=0, **kw)


def test_readme_snippet_returns_a_text_completion(client):
    r = client.completions.create(model=MODEL, prompt="Say this is a test")
    assert r.object == "text_completion"
    assert r.id.startswith("cmpl-")
    assert r.model == MODEL and r.system_fingerprint.startswith("fp_")
    assert len(r.choices) == 1 and r.choices[0].index == 0 and r.choices[0].text
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_default_max_tokens_is_openais_16(client):
    r = greedy(client, "Once upon a time")
    assert r.usage.completion_tokens <= 16
    assert r.choices[0].finish_reason == "length" or r.usage.completion_tokens < 16


def test_prompt_is_raw_not_templated(client, vocab):
    r = greedy(client, max_tokens=1)
    assert r.usage.prompt_tokens == len(vocab.tokenize(PROMPT, add_special=vocab.add_bos, parse_special=False))


def test_list_of_prompts_gives_one_choice_each(client):
    r = greedy(client, [PROMPT, "One, two, three,"], max_tokens=5)
    assert [c.index for c in r.choices] == [0, 1]
    assert r.choices[0].text == greedy(client, PROMPT, max_tokens=5).choices[0].text
    assert r.choices[1].text == greedy(client, "One, two, three,", max_tokens=5).choices[0].text


def test_token_prompts(client, vocab):
    tokens = vocab.tokenize(PROMPT, add_special=False, parse_special=False)
    text = greedy(client, max_tokens=5).choices[0].text
    assert greedy(client, tokens, max_tokens=5).choices[0].text == text
    both = greedy(client, [tokens, tokens], max_tokens=5)
    assert [c.text for c in both.choices] == [text, text]


def test_echo_prepends_the_prompt(client):
    plain = greedy(client, max_tokens=5).choices[0].text
    echoed = greedy(client, max_tokens=5, echo=True).choices[0].text
    assert echoed == PROMPT + plain


def test_suffix_without_fim_tokens_is_400(client):
    with pytest.raises(openai.BadRequestError) as err:
        greedy(client, suffix="and that is all.")
    assert "fill-in-the-middle" in err.value.message and err.value.param == "suffix"


def test_n_choices_and_seeded_repeat(client):
    def run():
        return client.completions.create(model=MODEL, prompt=PROMPT, n=2, temperature=1.0, seed=11, max_tokens=8)

    first = run()
    assert [c.index for c in first.choices] == [0, 1]
    assert [c.text for c in first.choices] == [c.text for c in run().choices]


def test_n_with_several_prompts_numbers_choices_in_order(client):
    r = client.completions.create(model=MODEL, prompt=[PROMPT, "Hello"], n=2, temperature=1.0, seed=1, max_tokens=3)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]


def test_best_of_returns_n_of_the_candidates(client):
    candidates = client.completions.create(model=MODEL, prompt=PROMPT, n=3, temperature=1.0, seed=5, max_tokens=8)
    best = client.completions.create(
        model=MODEL, prompt=PROMPT, n=1, best_of=3, temperature=1.0, seed=5, max_tokens=8
    )
    assert len(best.choices) == 1
    assert best.choices[0].text in {c.text for c in candidates.choices}
    assert best.usage.completion_tokens == candidates.usage.completion_tokens


def test_best_of_below_n_or_streamed_is_400(client):
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt=PROMPT, n=2, best_of=1)
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=MODEL, prompt=PROMPT, best_of=2, stream=True)
    assert err.value.param == "best_of"
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt=PROMPT, best_of=NUM_PARALLEL + 1)


def test_stop_and_sampling_fields(client):
    full = greedy(client, "1, 2, 3, 4, 5,", max_tokens=12).choices[0].text
    assert " 7" in full
    r = greedy(client, "1, 2, 3, 4, 5,", max_tokens=12, stop=" 7")
    assert r.choices[0].text == full[: full.find(" 7")] and r.choices[0].finish_reason == "stop"
    seeded = {
        client.completions.create(model=MODEL, prompt=PROMPT, temperature=1.0, top_p=1e-6, seed=s, max_tokens=6)
        .choices[0].text
        for s in range(3)
    }
    assert seeded == {greedy(client, max_tokens=6).choices[0].text}


def test_streaming_joins_to_the_full_text(client):
    want = greedy(client, max_tokens=10).choices[0].text
    chunks = list(greedy(client, max_tokens=10, stream=True, stream_options={"include_usage": True}))
    assert all(c.object == "text_completion" for c in chunks)
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == want
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finishes) == 1
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0
    assert all(c.usage is None for c in chunks[:-1])


def test_streaming_with_echo_sends_the_prompt_first(client):
    chunks = list(greedy(client, max_tokens=3, stream=True, echo=True))
    assert chunks[0].choices[0].text == PROMPT


def test_bad_prompts_are_400(http):
    for prompt, needle in (([], "prompt"), ([[]], "prompt"), ([10**9], "vocabulary"), ("", "empty")):
        r = http.post("/v1/completions", json={"model": MODEL, "prompt": prompt})
        assert r.status_code == 400, prompt
        assert needle in r.json()["error"]["message"]
