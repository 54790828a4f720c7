"""Event delivery across threads: batched, throttled while flowing, immediate when forced."""

import asyncio

from corral.engine.job import Done, GenerateJob, Token, deliver
from corral.engine.sampling import SamplingParams


def make_job(loop):
    return GenerateJob(prompt=[1], sampling=[SamplingParams()], max_tokens=1, n_ctx=8, loop=loop)


def test_events_arrive_in_one_batch_and_interval_throttles():
    async def scenario():
        job = make_job(asyncio.get_running_loop())
        job.emit(Token(0, "a", 1, None))
        job.emit(Token(0, "b", 2, None))
        deliver([job], interval=10.0)  # never delivered before: due at once
        first = await asyncio.wait_for(job.next_events(), 1)
        job.emit(Token(0, "c", 3, None))
        held = not job.due(10.0)  # within the interval: no wake-up while tokens flow
        job.emit(Done(1, 0))
        deliver([job], interval=10.0, force=True)
        rest = await asyncio.wait_for(job.next_events(), 1)
        return first, held, rest

    first, held, rest = asyncio.run(scenario())
    assert [e.text for e in first] == ["a", "b"]
    assert held
    assert [type(e).__name__ for e in rest] == ["Token", "Done"]


def test_delivery_to_a_closed_loop_is_dropped_quietly():
    loop = asyncio.new_event_loop()
    job = make_job(loop)
    loop.close()
    job.emit(Token(0, "x", 1, None))
    deliver([job], force=True)  # must not raise in the decode thread
