"""/v1/chat/completions through the official openai client against the real server and bundled model."""

from __future__ import annotations

import threading
import time

import httpx
import openai
import pytest

from conftest import MODEL, NUM_PARALLEL

HELLO = [{"role": "user", "content": "Say this is a test"}]
STORY = [{"role": "user", "content": "Write a long story about a dragon who learns to cook."}]


def greedy(client, messages=HELLO, **kw):
    return client.chat.completions.create(model=MODEL, messages=messages, temperature=0, **kw)


def test_readme_snippet_returns_a_chat_completion(client):
    before = int(time.time())
    r = client.chat.completions.create(model=MODEL, messages=HELLO)
    assert r.object == "chat.completion"
    assert r.id.startswith("chatcmpl-") and len(r.id) > 20
    assert before - 1 <= r.created <= int(time.time()) + 1
    assert r.model == MODEL
    assert r.system_fingerprint.startswith("fp_")
    assert len(r.choices) == 1 and r.choices[0].index == 0
    assert r.choices[0].message.role == "assistant"
    assert isinstance(r.choices[0].message.content, str) and r.choices[0].message.content
    assert r.choices[0].finish_reason in ("stop", "length")
    u = r.usage
    assert u.prompt_tokens > 0 and u.completion_tokens > 0
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens


def test_ids_are_unique(client):
    ids = {greedy(client, max_tokens=1).id for _ in range(3)}
    assert len(ids) == 3


def test_usage_counts_the_templated_prompt_exactly(client, vocab):
    r = greedy(client, messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
               max_tokens=3)
    rendered = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert r.usage.prompt_tokens == len(vocab.tokenize(rendered, add_special=False, parse_special=True))
    assert r.usage.completion_tokens == 3


def test_curl_example_with_system_message(http):
    body = {
        "model": MODEL,
        "messages": [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "Hello!"},
        ],
    }
    r = http.post("/v1/chat/completions", json=body)
    assert r.status_code == 200
    data = r.json()
    assert data["object"] == "chat.completion"
    assert data["choices"][0]["message"]["content"]


def test_system_message_changes_the_prompt(client):
    plain = greedy(client, max_tokens=8)
    with_system = greedy(client, [{"role": "system", "content": "Answer only in French."}, *HELLO], max_tokens=8)
    assert with_system.usage.prompt_tokens != plain.usage.prompt_tokens


def test_developer_role_is_a_system_message(client):
    as_system = greedy(client, [{"role": "system", "content": "You are a pirate."}, *HELLO], max_tokens=20)
    as_developer = greedy(client, [{"role": "developer", "content": "You are a pirate."}, *HELLO], max_tokens=20)
    assert as_developer.choices[0].message.content == as_system.choices[0].message.content
    assert as_developer.usage.prompt_tokens == as_system.usage.prompt_tokens


def test_text_parts_equal_the_joined_string(client):
    parts = [{"type": "text", "text": "Say this"}, {"type": "text", "text": "is a test"}]
    a = greedy(client, [{"role": "user", "content": parts}], max_tokens=20)
    b = greedy(client, [{"role": "user", "content": "Say this\nis a test"}], max_tokens=20)
    assert a.choices[0].message.content == b.choices[0].message.content


def test_assistant_history_and_prefill(client):
    history = [*HELLO, {"role": "assistant", "content": "This is a test."}, {"role": "user", "content": "Again"}]
    assert greedy(client, history, max_tokens=5).choices[0].message.content
    prefill = [*HELLO, {"role": "assistant", "content": "Sure! Here it is:"}]
    continued = greedy(client, prefill, max_tokens=5)
    fresh = greedy(client, HELLO, max_tokens=5)
    assert continued.choices[0].message.content != fresh.choices[0].message.content


def test_max_tokens_gives_length(client):
    r = greedy(client, STORY, max_tokens=5)
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 5


def test_max_completion_tokens_wins_over_max_tokens(client):
    r = greedy(client, STORY, max_tokens=20, max_completion_tokens=3)
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 3


def test_natural_end_is_stop(client):
    r = greedy(client, max_tokens=300)
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens < 300


def test_temperature_zero_is_deterministic(client):
    outputs = {greedy(client, STORY, max_tokens=30).choices[0].message.content for _ in range(3)}
    assert len(outputs) == 1


def test_seed_repeats_and_different_seeds_differ(client):
    def run(seed):
        return client.chat.completions.create(
            model=MODEL, messages=STORY, temperature=1.0, seed=seed, max_tokens=30
        ).choices[0].message.content

    assert len({run(7) for _ in range(3)}) == 1
    assert len({run(s) for s in range(4)}) > 1


def test_temperature_changes_sampling(client):
    hot = {
        client.chat.completions.create(model=MODEL, messages=STORY, temperature=2.0, seed=s, max_tokens=15)
        .choices[0].message.content
        for s in range(3)
    }
    cold = {greedy(client, STORY, seed=s, max_tokens=15).choices[0].message.content for s in range(3)}
    assert len(cold) == 1 and len(hot) > 1


@pytest.mark.parametrize(
    "extra",
    [{"top_p": 1e-6}, {"extra_body": {"top_k": 1}}, {"extra_body": {"min_p": 1.0}}],
    ids=["top_p", "top_k", "min_p"],
)
def test_truncation_fields_reduce_to_greedy(client, extra):
    want = greedy(client, STORY, max_tokens=20).choices[0].message.content
    for seed in range(3):
        r = client.chat.completions.create(
            model=MODEL, messages=STORY, temperature=1.5, seed=seed, max_tokens=20, **extra
        )
        assert r.choices[0].message.content == want


def test_stop_string_cuts_output_and_never_leaks(client):
    full = greedy(client, STORY, max_tokens=40).choices[0].message.content
    # a stop string that starts mid-word, so it is split across tokens
    start = len(full) // 2
    stop = full[start : start + 5]
    cut = full[: full.find(stop)]
    r = greedy(client, STORY, max_tokens=40, stop=[stop, "ZZZZ"])
    assert r.choices[0].message.content == cut
    assert r.choices[0].finish_reason == "stop"
    streamed = "".join(
        c.choices[0].delta.content or ""
        for c in greedy(client, STORY, max_tokens=40, stop=stop, stream=True)
        if c.choices
    )
    assert streamed == cut


def test_penalties_change_repetitive_output(client):
    messages = [{"role": "user", "content": "Repeat the word cat fifty times."}]
    base = greedy(client, messages, max_tokens=40, extra_body={"repeat_penalty": 1.0})
    for field in ("frequency_penalty", "presence_penalty"):
        penalised = greedy(client, messages, max_tokens=40, extra_body={"repeat_penalty": 1.0}, **{field: 2.0})
        assert penalised.choices[0].message.content != base.choices[0].message.content, field
    repeat = greedy(client, messages, max_tokens=40, extra_body={"repeat_penalty": 1.8})
    assert repeat.choices[0].message.content != base.choices[0].message.content


def test_logit_bias_forces_and_bans_tokens(client, vocab):
    banana = vocab.tokenize(" banana", add_special=False, parse_special=False)
    assert len(banana) == 1
    forced = greedy(client, max_tokens=4, logit_bias={str(banana[0]): 100})
    assert forced.choices[0].message.content == " banana" * 4
    first = vocab.tokenize(greedy(client, max_tokens=1).choices[0].message.content, False, False)[0]
    banned = greedy(client, max_tokens=1, logit_bias={str(first): -100})
    assert vocab.tokenize(banned.choices[0].message.content, False, False)[0] != first


def test_n_gives_several_choices_from_one_prompt(client):
    r = client.chat.completions.create(model=MODEL, messages=STORY, n=3, temperature=1.0, seed=3, max_tokens=10)
    assert [c.index for c in r.choices] == [0, 1, 2]
    texts = [c.message.content for c in r.choices]
    assert len(set(texts)) > 1
    assert r.usage.completion_tokens == 30
    again = client.chat.completions.create(model=MODEL, messages=STORY, n=3, temperature=1.0, seed=3, max_tokens=10)
    assert [c.message.content for c in again.choices] == texts


def test_n_above_the_slot_count_is_400(client):
    with pytest.raises(openai.BadRequestError) as err:
        greedy(client, n=NUM_PARALLEL + 1)
    assert "'n'" in err.value.message and str(NUM_PARALLEL) in err.value.message


def test_user_field_is_accepted(client):
    assert greedy(client, max_tokens=2, user="user-1234").choices[0].message.content


def test_num_ctx_extra_field_limits_the_context(client):
    with pytest.raises(openai.BadRequestError) as err:
        greedy(client, STORY, extra_body={"num_ctx": 20})
    assert err.value.code == "context_length_exceeded"
    r = greedy(client, STORY, extra_body={"num_ctx": 60})
    assert r.choices[0].finish_reason == "length"
    assert r.usage.total_tokens <= 60


def test_image_to_a_text_model_is_400(client):
    content = [{"type": "text", "text": "what is this?"},
               {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}]
    with pytest.raises(openai.BadRequestError) as err:
        greedy(client, [{"role": "user", "content": content}])
    assert MODEL in err.value.message and "images" in err.value.message


# -- streaming ------------------------------------------------------------------------------------------------
def test_stream_framing_matches_openai(client):
    chunks = list(greedy(client, STORY, max_tokens=12, stream=True))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert len({c.id for c in chunks}) == 1 and len({c.created for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.choices[0].delta.role is None for c in chunks[1:])
    finishes = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finishes) == 1 and finishes[0] is chunks[-1]
    assert chunks[-1].choices[0].finish_reason == "length"
    assert all(c.usage is None for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == greedy(client, STORY, max_tokens=12).choices[0].message.content


def test_stream_include_usage_adds_a_last_usage_chunk(client):
    chunks = list(greedy(client, STORY, max_tokens=6, stream=True, stream_options={"include_usage": True}))
    last = chunks[-1]
    assert last.choices == [] and last.usage.completion_tokens == 6
    assert last.usage.total_tokens == last.usage.prompt_tokens + 6
    assert all(c.usage is None for c in chunks[:-1])


def test_stream_with_n_has_a_role_and_finish_per_choice(client):
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=STORY, n=2, temperature=1.0, seed=1, max_tokens=5, stream=True))
    for index in (0, 1):
        mine = [c.choices[0] for c in chunks if c.choices and c.choices[0].index == index]
        assert mine[0].delta.role == "assistant"
        assert [c.finish_reason for c in mine if c.finish_reason] == ["length"]


def test_raw_sse_ends_with_done(http):
    body = {"model": MODEL, "messages": HELLO, "max_tokens": 3, "stream": True}
    with http.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    frames = [f for f in raw.split("\n\n") if f]
    assert all(f.startswith("data: ") for f in frames)
    assert frames[-1] == "data: [DONE]"


def test_abandoned_streams_free_their_slots(server, client):
    """Streams dropped mid-generation must not keep slots: a request needing every slot then runs at once."""
    body = {"model": MODEL, "messages": STORY, "max_tokens": 1500, "stream": True, "temperature": 1.0}
    for _ in range(NUM_PARALLEL):
        with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=60) as r:
            for line in r.iter_lines():
                if '"content":"' in line and '"content":""' not in line:
                    break
    started = time.monotonic()
    r = greedy(client, n=NUM_PARALLEL, max_tokens=2, timeout=30)
    assert len(r.choices) == NUM_PARALLEL
    assert time.monotonic() - started < 10


def test_concurrent_requests_all_complete(client):
    results: list[str] = []

    def worker(seed: int) -> None:
        r = client.chat.completions.create(model=MODEL, messages=STORY, seed=seed, max_tokens=15)
        results.append(r.choices[0].message.content)

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(2 * NUM_PARALLEL)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 2 * NUM_PARALLEL and all(results)


def test_prefix_reuse_reports_cached_tokens(http):
    body = {"model": MODEL, "messages": STORY, "max_tokens": 2, "temperature": 0}
    http.post("/v1/chat/completions", json=body)
    again = http.post("/v1/chat/completions", json=body).json()
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] == again["usage"]["prompt_tokens"] - 1
