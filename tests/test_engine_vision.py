"""Images in the batch loop without a server: the tiny vision model of tests/vision_fixture.py on a Runner.

The reference for correctness is llama.cpp's own `mtmd_helper_eval_chunks` (what llama-server's examples
use): the runner evaluates image embeddings in its own batches, beside other sequences, and must reach the
same logits.
"""

from __future__ import annotations

import asyncio
import ctypes
import io

import llama_cpp.llama_cpp as ll
import llama_cpp.mtmd_cpp as mt
import numpy as np
import pytest
from PIL import Image

import vision_fixture
from corral.engine.job import Done, Failed, Finished, GenerateJob, Token
from corral.engine.model import LlamaModel
from corral.engine.runner import Runner, RunnerConfig, _outside_images
from corral.engine.sampling import SamplingParams
from corral.engine.vision import MediaChunk, MediaSpan, VisionContext, placeholder_id

GREEDY = SamplingParams(temperature=0.0)
CHAT = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"


def png(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (24, 36, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "PNG")
    return out.getvalue()


@pytest.fixture(scope="module")
def files(tmp_path_factory, gguf_path):
    return vision_fixture.build(tmp_path_factory.mktemp("tiny-vision"), gguf_path)


@pytest.fixture(scope="module")
def model(files):
    m = LlamaModel(files[0])
    yield m
    m.close()


@pytest.fixture(scope="module")
def runner(model, files):
    r = Runner(model, RunnerConfig(n_ctx_per_seq=512, n_parallel=2, n_threads=2, n_batch=64), projector=files[1])
    yield r
    r.close()


def prompt(vision: VisionContext, text: str, *images: bytes, add_special: bool = True):
    bitmaps = [vision.decode(data) for data in images]
    try:
        return vision.tokenize(text.format(*[vision.marker] * len(images)), bitmaps, add_special)
    finally:
        for b in bitmaps:
            b.free()


def job_for(p, max_tokens: int = 4, **kw) -> GenerateJob:
    return GenerateJob(prompt=p.tokens, media=p.media, sampling=[GREEDY] * kw.pop("n", 1), max_tokens=max_tokens,
                       n_ctx=512, want_logprobs=True, top_logprobs=3, **kw)


def run(runner: Runner, *jobs: GenerateJob):
    """Every job's (token, logprob) list per choice and its Done, or the Failed event."""

    async def one(job):
        job.loop = asyncio.get_running_loop()
        runner.submit(job)
        out: dict[int, list] = {}
        while True:
            for e in await job.next_events():
                if isinstance(e, Token):
                    out.setdefault(e.index, []).append((e.token, None if e.logprob is None else round(e.logprob, 4)))
                elif isinstance(e, Failed):
                    return e
                elif isinstance(e, Done):
                    return out, e
                else:
                    assert isinstance(e, Finished)

    async def all_jobs():
        return await asyncio.gather(*(one(j) for j in jobs))

    return asyncio.run(all_jobs())


def test_placeholders_name_image_content(runner):
    vision = runner.vision
    a = prompt(vision, CHAT.format("look {} and {}"), png(1), png(1))
    b = prompt(vision, CHAT.format("look {} and {}"), png(1), png(2))
    assert [s.n_tokens for s in a.media] == [vision_fixture.IMAGE_TOKENS] * 2
    assert a.image_tokens == 2 * vision_fixture.IMAGE_TOKENS
    for span in a.media:
        assert set(a.tokens[span.start : span.end]) == {placeholder_id(span.key)}
        assert placeholder_id(span.key) < 0
    assert a.media[0].key == a.media[1].key == b.media[0].key != b.media[1].key
    text_only = [t for t in a.tokens if t >= 0]
    assert len(text_only) == len(a.tokens) - 2 * vision_fixture.IMAGE_TOKENS


def test_images_evaluate_as_llama_cpps_own_helper_does(runner, model, files):
    p = prompt(runner.vision, CHAT.format("Describe {} briefly"), png(3))
    [(tokens, done)] = run(runner, job_for(p, max_tokens=1))
    assert done.prompt_tokens == len(p.tokens)

    # The reference: a fresh context, the same projector, mtmd's helper doing all of the evaluation.
    vision = VisionContext(files[1], model, 2)
    params = ll.llama_context_default_params()
    params.n_ctx, params.n_batch, params.n_ubatch, params.n_threads = 512, 512, 512, 2
    ctx = ll.llama_init_from_model(model.handle, params)
    chunks = mt.mtmd_input_chunks_init()
    bitmap = vision.decode(png(3))
    try:
        text = CHAT.format(f"Describe {vision.marker} briefly").encode()
        inp = mt.mtmd_input_text(text, len(text), True, True)
        bitmaps = (mt.mtmd_bitmap_p_ctypes * 1)(bitmap.ptr)
        assert mt.mtmd_tokenize(vision.ctx, chunks, ctypes.byref(inp), bitmaps, 1) == 0
        n_past = ll.llama_pos(0)
        assert mt.mtmd_helper_eval_chunks(vision.ctx, ctx, chunks, 0, 0, 512, True, ctypes.byref(n_past)) == 0
        assert n_past.value == len(p.tokens)
        logits = np.ctypeslib.as_array(ll.llama_get_logits_ith(ctx, -1), shape=(model.n_vocab,)).astype(np.float64)
    finally:
        bitmap.free()
        mt.mtmd_input_chunks_free(chunks)
        ll.llama_free(ctx)
        vision.close()
    best = int(np.argmax(logits))
    logprob = float(logits[best] - logits.max() - np.log(np.exp(logits - logits.max()).sum()))
    assert tokens[0][0][0] == best
    assert tokens[0][0][1] == pytest.approx(logprob, abs=2e-3)


def test_an_image_split_over_steps_gives_the_same_output(runner, model, files):
    p = prompt(runner.vision, CHAT.format("Describe {} now"), png(4))
    [(whole, _)] = run(runner, job_for(p, max_tokens=6))
    small = Runner(model, RunnerConfig(n_ctx_per_seq=512, n_parallel=2, n_threads=2, n_batch=6), projector=files[1])
    try:
        q = prompt(small.vision, CHAT.format("Describe {} now"), png(4))
        [(split, done)] = run(small, job_for(q, max_tokens=6))
    finally:
        small.close()
    assert done.prompt_tokens > 3 * 6  # the image alone needed three steps
    assert [t for t, _ in split[0]] == [t for t, _ in whole[0]]
    assert [lp for _, lp in split[0]] == pytest.approx([lp for _, lp in whole[0]], abs=2e-3)


def test_image_and_text_jobs_run_side_by_side(runner, model):
    image_job = lambda: job_for(prompt(runner.vision, CHAT.format("What is {}?"), png(5)), max_tokens=6)  # noqa: E731
    text_job = lambda: GenerateJob(prompt=model.tokenize(CHAT.format("Tell me a story"), False, True),  # noqa: E731
                                   sampling=[GREEDY], max_tokens=6, n_ctx=512)
    [(alone_image, _)] = run(runner, image_job())
    [(alone_text, _)] = run(runner, text_job())
    (together_image, _), (together_text, _) = run(runner, image_job(), text_job())
    assert [t for t, _ in together_image[0]] == [t for t, _ in alone_image[0]]
    assert [t for t, _ in together_text[0]] == [t for t, _ in alone_text[0]]


def test_encodings_are_reused_by_content(runner):
    before_encoded, before_hits = runner.images_encoded, runner.image_cache_hits
    first = prompt(runner.vision, CHAT.format("One {}"), png(6))
    run(runner, job_for(first))
    assert runner.images_encoded == before_encoded + 1
    [(_, done)] = run(runner, job_for(first))  # the same prompt: its cache holds the image already
    assert done.cached_tokens == len(first.tokens) - 1
    assert (runner.images_encoded, runner.image_cache_hits) == (before_encoded + 1, before_hits)
    other = prompt(runner.vision, CHAT.format("Another prefix, then {}"), png(6))
    [(_, done)] = run(runner, job_for(other))  # another prefix: the image is evaluated again, not encoded
    assert done.cached_tokens < other.media[0].start
    assert (runner.images_encoded, runner.image_cache_hits) == (before_encoded + 1, before_hits + 1)


def test_several_choices_fork_after_the_image(runner):
    p = prompt(runner.vision, CHAT.format("Fork {}"), png(7))
    [(single, _)] = run(runner, job_for(p, max_tokens=4))
    [(forked, done)] = run(runner, job_for(p, max_tokens=4, n=2))
    assert forked[0] == forked[1] == single[0]


def test_prefix_reuse_never_stops_inside_an_image(runner):
    p = prompt(runner.vision, CHAT.format("A {} B"), png(8))
    span = p.media[0]
    assert _outside_images(GenerateJob(prompt=p.tokens, media=p.media, sampling=[GREEDY], max_tokens=1, n_ctx=512),
                           span.start + 3) == span.start
    assert _outside_images(GenerateJob(prompt=p.tokens, media=p.media, sampling=[GREEDY], max_tokens=1, n_ctx=512),
                           span.end) == span.end


def test_a_failed_encode_fails_only_its_job(runner, model):
    good = prompt(runner.vision, CHAT.format("Fine {}"), png(9))
    broken = prompt(runner.vision, CHAT.format("Broken {}"), png(10))
    span = broken.media[0]
    placeholder = MediaChunk(mt.mtmd_input_chunk_get_placeholder(span.chunk.ptr))  # metadata only, no pixels
    broken_span = MediaSpan(span.start, span.n_tokens, span.n_pos, "not-cached:0", placeholder)
    bad_job = GenerateJob(prompt=broken.tokens, media=(broken_span,), sampling=[GREEDY], max_tokens=2, n_ctx=512)
    failed, (tokens, done) = run(runner, bad_job, job_for(good, max_tokens=2))
    assert isinstance(failed, Failed) and "vision encoder failed" in failed.message
    assert len(tokens[0]) == 2 and done.prompt_tokens == len(good.tokens)


def test_a_projector_that_does_not_fit_leaves_the_model_serving_text(model, files, tmp_path):
    wrong = vision_fixture.write_projector(tmp_path / "wrong.gguf", lm_embd=32)
    damaged = tmp_path / "damaged.gguf"
    damaged.write_bytes(b"GGUF" + b"\x00" * 64)
    for projector, words in ((wrong, "mismatch"), (damaged, "could not load")):
        r = Runner(model, RunnerConfig(n_ctx_per_seq=256, n_parallel=1, n_threads=2, n_batch=32), projector=projector)
        try:
            assert r.vision is None and words in r.vision_error
            [(tokens, done)] = run(r, GenerateJob(prompt=model.tokenize("Hello", False, False), sampling=[GREEDY],
                                                  max_tokens=2, n_ctx=256))
            assert len(tokens[0]) == 2
            fake = MediaSpan(0, 1, 1, "x:0", MediaChunk(0))
            with pytest.raises(ValueError, match="could not load|mismatch"):
                r.submit(GenerateJob(prompt=[-1], media=(fake,), sampling=[GREEDY], max_tokens=1, n_ctx=256))
        finally:
            r.close()


def test_a_prompt_may_end_with_an_image(runner):
    p = prompt(runner.vision, "Describe {}", png(11))
    assert p.media[0].end == len(p.tokens)  # the first token comes from the image's last embedding
    [(first, done)] = run(runner, job_for(p, max_tokens=3))
    [(again, done_again)] = run(runner, job_for(p, max_tokens=3))
    assert first == again and len(first[0]) == 3
    assert done_again.cached_tokens == p.media[0].start  # the image is evaluated again, whole
