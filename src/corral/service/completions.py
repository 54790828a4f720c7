"""Legacy completions: raw prompts (no chat template), one job per prompt, OpenAI's text_completion shape."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from ..engine.job import Done, Event, Finished, GenerateJob, PromptLogprobs, Token
from ..protocol.openai import (
    Completion,
    CompletionChoice,
    CompletionRequest,
    PromptTokensDetails,
    Usage,
)
from .errors import InvalidRequest
from .generation import (
    Outcome,
    budget,
    check_choices,
    choice_params,
    collect,
    context_limit,
    events,
    new_id,
    response_grammar,
    sampling_params,
)
from .logprobs import Aligner, Entry, legacy_logprobs, prompt_entries
from .models import LoadedModel, ModelManager

# OpenAI's documented default for /v1/completions when neither the request nor the model sets one.
DEFAULT_MAX_TOKENS = 16


@dataclass
class PromptJob:
    text: str  # the prompt as text, for `echo`
    job: GenerateJob


@dataclass
class PreparedCompletion:
    request: CompletionRequest
    loaded: LoadedModel
    prompts: list[PromptJob]
    n: int
    best_of: int
    id: str
    created: int


def _prompts(request: CompletionRequest) -> list[str | list[int]]:
    p = request.prompt
    if isinstance(p, str):
        return [p]
    if all(isinstance(x, int) for x in p):
        return [list(p)]  # type: ignore[arg-type]
    return list(p)  # type: ignore[arg-type]


def _tokens(prompt: str | list[int], request: CompletionRequest, loaded: LoadedModel, index: int) -> list[int]:
    model = loaded.model
    if isinstance(prompt, list):
        bad = next((t for t in prompt if not 0 <= t < model.n_vocab), None)
        if bad is not None:
            raise InvalidRequest(
                f"prompt[{index}] holds token {bad}, outside the vocabulary (0..{model.n_vocab - 1})", param="prompt"
            )
        if request.suffix is not None:
            raise InvalidRequest("suffix needs a text prompt, not token ids", param="suffix")
        return prompt
    if request.suffix is None:
        return model.tokenize(prompt, add_special=model.add_bos, parse_special=False)
    if not model.has_fim:
        raise InvalidRequest(
            f"model '{request.model}' has no fill-in-the-middle tokens, so 'suffix' cannot be used with it",
            param="suffix",
        )
    pre, suf, mid = model.fim
    head = [model.bos] if model.add_bos and model.bos >= 0 else []
    return [
        *head,
        pre,
        *model.tokenize(prompt, add_special=False, parse_special=False),
        suf,
        *model.tokenize(request.suffix, add_special=False, parse_special=False),
        mid,
    ]


async def prepare(manager: ModelManager, request: CompletionRequest) -> PreparedCompletion:
    loaded = await manager.get(request.model, request.num_ctx)
    n = request.n or 1
    best_of = request.best_of or n
    if best_of < n:
        raise InvalidRequest(f"best_of ({best_of}) must be at least n ({n})", param="best_of")
    if request.stream and best_of > n:
        raise InvalidRequest("best_of cannot be used with stream: the best choices are known only at the end",
                             param="best_of")
    check_choices(best_of, loaded, "best_of" if request.best_of else "n")
    n_ctx = context_limit(request, loaded)
    base = sampling_params(request, loaded, response_grammar(request.response_format))
    stop = request.stops() if request.stop is not None else list(loaded.params.get("stop") or [])
    prompts = []
    for index, prompt in enumerate(_prompts(request)):
        tokens = _tokens(prompt, request, loaded, index)
        if not tokens:
            raise InvalidRequest(f"prompt[{index}] is empty", param="prompt")
        job = GenerateJob(
            prompt=tokens,
            sampling=choice_params(base, best_of),
            max_tokens=budget(len(tokens), n_ctx, request.max_tokens, loaded, DEFAULT_MAX_TOKENS),
            n_ctx=n_ctx,
            stop=stop,
            want_logprobs=best_of > n or request.logprobs is not None,
            top_logprobs=request.logprobs or 0,
            prompt_logprobs=bool(request.echo) and request.logprobs is not None,
        )
        text = prompt if isinstance(prompt, str) else loaded.model.detokenize(prompt)
        prompts.append(PromptJob(text, job))
    return PreparedCompletion(request, loaded, prompts, n, best_of, new_id("cmpl"), int(time.time()))


def _best(outcomes: list[Outcome], n: int) -> list[Outcome]:
    """The n outcomes with the highest mean log-probability per token, in that order."""
    def mean(o: Outcome) -> float:
        return (o.logprob_sum or 0.0) / max(o.completion_tokens, 1)

    return sorted(outcomes, key=mean, reverse=True)[:n]


def _usage(dones: list[Done], completion_tokens: int) -> Usage:
    prompt = sum(d.prompt_tokens for d in dones)
    return Usage(
        prompt_tokens=prompt,
        completion_tokens=completion_tokens,
        total_tokens=prompt + completion_tokens,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=sum(d.cached_tokens for d in dones)),
    )


async def complete(prep: PreparedCompletion) -> Completion:
    results = await asyncio.gather(*(collect(p.job, prep.loaded) for p in prep.prompts))
    model, echo, want = prep.loaded.model, bool(prep.request.echo), prep.request.logprobs is not None
    choices, generated = [], 0
    for p_index, (prompt, collected) in enumerate(zip(prep.prompts, results)):
        generated += sum(o.completion_tokens for o in collected.outcomes)
        picked = _best(collected.outcomes, prep.n) if prep.best_of > prep.n else collected.outcomes
        for c_index, outcome in enumerate(picked):
            entries = (collected.prompt_entries if echo else []) + outcome.entries
            choices.append(CompletionChoice(
                index=p_index * prep.n + c_index,
                text=prompt.text + outcome.text if echo else outcome.text,
                finish_reason=outcome.finish_reason,
                logprobs=legacy_logprobs(model, entries) if want else None,
            ))
    return Completion(
        id=prep.id,
        created=prep.created,
        model=prep.request.model,
        system_fingerprint=prep.loaded.fingerprint,
        choices=choices,
        usage=_usage([c.done for c in results], generated),
    )


async def stream(prep: PreparedCompletion) -> AsyncIterator[list[Completion]]:
    """Chunks of every prompt's choices, interleaved as they are produced; usage last when asked for.

    With `echo`, each choice starts with the prompt's text (and, with `logprobs`, the prompt's entries,
    which is why that first chunk waits until the prompt has been evaluated).
    """
    merged: asyncio.Queue[tuple[int, list[Event] | Exception]] = asyncio.Queue()
    model, echo, want = prep.loaded.model, bool(prep.request.echo), prep.request.logprobs is not None

    async def pump(p_index: int, job: GenerateJob) -> None:
        try:
            async for batch in events(job, prep.loaded):
                await merged.put((p_index, batch))
        except Exception as exc:  # re-raised in the consumer, which owns the response
            await merged.put((p_index, exc))

    offsets = [0] * (len(prep.prompts) * prep.n)  # characters sent so far per choice, for text_offset

    def chunk(index: int, text: str, finish: str | None = None, entries: list[Entry] | None = None) -> Completion:
        logprobs = legacy_logprobs(model, entries or [], offsets[index]) if want else None
        offsets[index] += len(text)
        return Completion(
            id=prep.id,
            created=prep.created,
            model=prep.request.model,
            system_fingerprint=prep.loaded.fingerprint,
            choices=[CompletionChoice(index=index, text=text, finish_reason=finish, logprobs=logprobs)],
        )

    aligners = [[Aligner(model) for _ in range(p.job.n)] for p in prep.prompts]
    prompts_seen: list[list[Entry]] = [[] for _ in prep.prompts]
    echoed = [not echo] * len(prep.prompts)
    tasks = [asyncio.create_task(pump(i, p.job)) for i, p in enumerate(prep.prompts)]
    dones: list[Done] = []
    generated = 0
    try:
        while len(dones) < len(tasks):
            p_index, batch = await merged.get()
            if isinstance(batch, Exception):
                raise batch
            out = []
            for event in batch:
                if isinstance(event, PromptLogprobs):
                    prompts_seen[p_index] += prompt_entries(model, event)
                    continue
                if not echoed[p_index]:
                    echoed[p_index] = True
                    text = prep.prompts[p_index].text
                    out += [chunk(p_index * prep.n + c, text, entries=prompts_seen[p_index]) for c in range(prep.n)]
                if isinstance(event, Token):
                    entries = aligners[p_index][event.index].on_token(event) if want else []
                    if event.text:
                        out.append(chunk(p_index * prep.n + event.index, event.text, entries=entries))
                elif isinstance(event, Finished):
                    generated += event.completion_tokens
                    entries = aligners[p_index][event.index].release(event.text) if want else []
                    out.append(chunk(p_index * prep.n + event.index, event.text, event.reason, entries))
                elif isinstance(event, Done):
                    dones.append(event)
            if out:
                yield out
        options = prep.request.stream_options
        if options is not None and options.include_usage:
            usage_chunk = chunk(0, "")
            usage_chunk.choices = []
            usage_chunk.usage = _usage(dones, generated)
            yield [usage_chunk]
    finally:
        for task in tasks:
            task.cancel()
