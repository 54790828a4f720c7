"""The batch loop without a server: chunked prefill, prefix reuse, forks for n > 1, cancellation, queueing."""

from __future__ import annotations

import asyncio

import pytest

from corral.engine.job import Done, Finished, GenerateJob, Token
from corral.engine.runner import Runner, RunnerConfig
from corral.engine.sampling import SamplingParams

GREEDY = SamplingParams(temperature=0.0)


@pytest.fixture(scope="module")
def runner(vocab):
    r = Runner(vocab, RunnerConfig(n_ctx_per_seq=1024, n_parallel=2, n_threads=2, n_batch=64))
    yield r
    r.close()


def run(runner, jobs):
    async def one(job):
        job.loop = asyncio.get_running_loop()
        runner.submit(job)
        texts, finished, done = {}, {}, None
        pending = []
        while done is None:
            if not pending:
                pending = await job.next_events()
            e = pending.pop(0)
            if isinstance(e, Token):
                texts[e.index] = texts.get(e.index, "") + e.text
            elif isinstance(e, Finished):
                texts[e.index] = texts.get(e.index, "") + e.text
                finished[e.index] = e
            elif isinstance(e, Done):
                done = e
            else:
                raise AssertionError(e)
        return texts, finished, done

    async def all_jobs():
        return await asyncio.gather(*(one(j) for j in jobs))

    return asyncio.run(all_jobs())


def job(vocab, text, n=1, max_tokens=8, sampling=GREEDY, **kw):
    return GenerateJob(prompt=vocab.tokenize(text, False, False), sampling=[sampling] * n,
                       max_tokens=max_tokens, n_ctx=1024, **kw)


def test_long_prompt_is_prefilled_in_chunks(runner, vocab):
    text = "The history of the river is long. " * 40  # far more than n_batch=64 tokens
    [(texts, finished, done)] = run(runner, [job(vocab, text)])
    assert done.prompt_tokens > 4 * runner.config.n_batch
    assert finished[0].completion_tokens == 8 and finished[0].reason == "length"


def test_prefix_is_reused_and_output_unchanged(runner, vocab):
    text = "A list of fruits: apple, banana, cherry,"
    [(first, _, _)] = run(runner, [job(vocab, text)])
    [(second, _, done)] = run(runner, [job(vocab, text)])
    assert done.cached_tokens == done.prompt_tokens - 1
    assert first == second


def test_forks_share_one_prefill(runner, vocab):
    params = [SamplingParams(temperature=1.0, seed=s) for s in (1, 2)]
    j = GenerateJob(prompt=vocab.tokenize("Once upon a time", False, False), sampling=params, max_tokens=6, n_ctx=1024)
    [(texts, finished, done)] = run(runner, [j])
    assert set(finished) == {0, 1}
    assert all(f.completion_tokens == 6 for f in finished.values())
    assert done.prompt_tokens == len(j.prompt)


def test_more_jobs_than_slots_queue_and_complete(runner, vocab):
    jobs = [job(vocab, f"Count to {i}:", max_tokens=5) for i in range(6)]
    results = run(runner, jobs)
    assert all(f[0].completion_tokens == 5 for _, f, _ in results)


def test_cancelled_job_frees_its_slot(runner, vocab):
    long_job = job(vocab, "Tell me a very long story", max_tokens=900)

    async def scenario():
        long_job.loop = asyncio.get_running_loop()
        runner.submit(long_job)
        while not any(isinstance(e, Token) for e in await long_job.next_events()):
            pass
        long_job.cancel()
        await asyncio.sleep(0.2)
        return runner.busy

    assert asyncio.run(scenario()) == 0


def test_logprobs_are_log_softmax(runner, vocab):
    [(_, finished, _)] = run(runner, [job(vocab, "Hello", max_tokens=4, want_logprobs=True)])
    assert finished[0].logprob_sum is not None and finished[0].logprob_sum <= 0.0


def test_stop_strings_end_generation(runner, vocab):
    [(full, _, _)] = run(runner, [job(vocab, "1, 2, 3, 4,", max_tokens=10)])
    assert " 6" in full[0]
    [(cut, finished, _)] = run(runner, [job(vocab, "1, 2, 3, 4,", max_tokens=10, stop=[" 6"])])
    assert cut[0] == full[0][: full[0].find(" 6")] and finished[0].reason == "stop"


def test_too_many_choices_is_refused(runner, vocab):
    with pytest.raises(ValueError):
        runner.submit(job(vocab, "x", n=3))


def test_a_prefix_held_by_another_slot_is_copied_not_prefilled(runner, vocab):
    text = "A shared system prompt that many requests start with, long enough to be worth copying. " * 3
    busy = job(vocab, text + "First question?", max_tokens=200)
    other = job(vocab, text + "Second question?", max_tokens=4)

    async def scenario():
        loop = asyncio.get_running_loop()
        busy.loop = other.loop = loop
        runner.submit(busy)
        while not any(isinstance(e, Token) for e in await busy.next_events()):
            pass
        runner.submit(other)  # the first slot is busy: the second must copy its prefix
        while not any(isinstance(e, Done) for e in await other.next_events()):
            pass
        busy.cancel()
        return other.cached_tokens

    shared = len(vocab.tokenize(text, False, False))
    assert asyncio.run(scenario()) >= shared - 2


def test_a_single_slot_runner_serves(vocab):
    solo = Runner(vocab, RunnerConfig(n_ctx_per_seq=256, n_parallel=1, n_threads=2, n_batch=64))
    try:
        [(texts, finished, _)] = run(solo, [job(vocab, "Hello there", max_tokens=3)])
        assert finished[0].completion_tokens == 3
    finally:
        solo.close()


@pytest.mark.parametrize("offset", [0, 2])  # the trigger starts at a token's start, or inside a token
def test_a_lazy_grammar_holds_from_its_trigger_on(runner, vocab, offset):
    from corral.engine.sampling import GrammarTrigger

    prompt = "Here is a short story about a fox and a crow:"
    [(free, _, _)] = run(runner, [job(vocab, prompt, max_tokens=24)])
    text = free[0]
    tokens = vocab.tokenize(text, False, False)
    # A trigger the free output reaches: from some token's start (plus `offset`) to a later token's end.
    head = b"".join(vocab.token_bytes(t) for t in tokens[:6]).decode()
    upto = b"".join(vocab.token_bytes(t) for t in tokens[:9]).decode()
    marker = text[len(head) + offset:len(upto)]
    assert len(marker) >= 5 and text.count(marker) == 1
    grammar = f'root ::= "{marker}" " zebra zebra."\n'
    lazy = SamplingParams(temperature=0.0, grammar=grammar,
                          grammar_trigger=GrammarTrigger(markers=(marker.encode(),)))
    [(out, finished, _)] = run(runner, [job(vocab, prompt, max_tokens=24, sampling=lazy)])
    assert out[0] == text[:text.index(marker)] + marker + " zebra zebra."
    assert finished[0].reason == "stop"


def test_a_lazy_grammar_that_never_triggers_leaves_the_output_free(runner, vocab):
    from corral.engine.sampling import GrammarTrigger

    prompt = "Here is a short story about a fox and a crow:"
    [(free, _, _)] = run(runner, [job(vocab, prompt, max_tokens=16)])
    lazy = SamplingParams(temperature=0.0, grammar='root ::= "never"\n',
                          grammar_trigger=GrammarTrigger(markers=(b"\x00never\x00",), at_start=True))
    [(out, _, _)] = run(runner, [job(vocab, prompt, max_tokens=16, sampling=lazy)])
    assert out == free
