"""What chat and completions share: sampling precedence, context checks, running a job to its events.

Precedence for every sampling field: the request, then the model's PARAMETERs, then corral's defaults.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass, fields
from typing import Any

from ..engine.job import (
    Done,
    Event,
    Failed,
    Finished,
    GenerateJob,
    PromptLogprobs,
    Token,
)
from ..engine.sampling import GrammarTrigger, SamplingParams
from ..protocol.openai import ResponseFormat, SamplingFields
from .errors import EngineFailure, InvalidRequest
from .grammar import JSON_OBJECT_GRAMMAR, SchemaError, schema_to_grammar
from .logprobs import Aligner, Entry, prompt_entries
from .models import LoadedModel

# Request fields that map one to one onto SamplingParams (and onto Ollama's PARAMETER names).
_SAMPLING_FIELDS = [f.name for f in fields(SamplingParams) if f.name not in ("logit_bias", "grammar", "grammar_trigger")]


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


def response_grammar(response_format: ResponseFormat | None) -> str | None:
    """The grammar that enforces `response_format` while sampling; a schema it cannot enforce is a 400."""
    if response_format is None or response_format.type == "text":
        return None
    if response_format.type == "json_object":
        return JSON_OBJECT_GRAMMAR
    assert response_format.json_schema is not None
    try:
        return schema_to_grammar(response_format.json_schema.schema_)
    except SchemaError as exc:
        raise InvalidRequest(str(exc),
                             param="response_format.json_schema.schema") from None


def sampling_params(
    request: SamplingFields, loaded: LoadedModel, grammar: str | None = None, trigger: GrammarTrigger | None = None
) -> SamplingParams:
    values: dict[str, Any] = {"grammar": grammar, "grammar_trigger": trigger}
    for name in _SAMPLING_FIELDS:
        requested = getattr(request, name, None)  # typical_p exists only as a model PARAMETER
        if requested is not None:
            values[name] = requested
        elif loaded.params.get(name) is not None:
            values[name] = loaded.params[name]
    if request.logit_bias:
        bias = {}
        for key, value in request.logit_bias.items():
            token = int(key)
            if not 0 <= token < loaded.model.n_vocab:
                raise InvalidRequest(
                    f"logit_bias token {token} is outside the vocabulary (0..{loaded.model.n_vocab - 1})",
                    param="logit_bias",
                )
            bias[token] = value
        values["logit_bias"] = bias
    return SamplingParams(**values)


def choice_params(base: SamplingParams, n: int) -> list[SamplingParams]:
    """Each choice gets its own seed (seed, seed+1, ...), so a seeded request repeats and its choices differ."""
    if base.seed is None:
        return [base] * n
    return [base.with_seed(base.seed + i) for i in range(n)]


def check_choices(n: int, loaded: LoadedModel, param: str = "n") -> None:
    slots = loaded.runner.config.n_parallel
    if n > slots:
        raise InvalidRequest(
            f"'{param}' is {n}, but this server runs {slots} sequences in parallel (CORRAL_NUM_PARALLEL); "
            f"ask for at most {slots}",
            param=param,
        )


def context_limit(request: SamplingFields, loaded: LoadedModel) -> int:
    return request.num_ctx or loaded.n_ctx


def budget(
    prompt_tokens: int, n_ctx: int, requested: int | None, loaded: LoadedModel, default: int | None = None
) -> int:
    """How many tokens each choice may generate; a prompt or request that cannot fit is a 400."""
    if prompt_tokens >= n_ctx:
        raise InvalidRequest(
            f"This model's maximum context length is {n_ctx} tokens. However, your prompt has {prompt_tokens} "
            f"tokens. Please shorten it, or raise num_ctx.",
            param="messages",
            code="context_length_exceeded",
        )
    room = n_ctx - prompt_tokens
    if requested is not None:
        if requested > room:
            raise InvalidRequest(
                f"This model's maximum context length is {n_ctx} tokens. However, you requested "
                f"{prompt_tokens + requested} tokens ({prompt_tokens} in the prompt, {requested} in the "
                f"completion). Please reduce the prompt or the completion length.",
                param="max_tokens",
                code="context_length_exceeded",
            )
        return requested
    model_default = loaded.params.get("num_predict")
    if model_default is not None and int(model_default) > 0:
        return min(int(model_default), room)
    return min(default, room) if default is not None else room


@dataclass
class Outcome:
    """One finished choice."""

    text: str
    finish_reason: str
    completion_tokens: int
    logprob_sum: float | None
    entries: list[Entry]  # per-token log-probabilities, when the job asked for them


@dataclass
class Collected:
    outcomes: list[Outcome]
    done: Done
    prompt_entries: list[Entry]  # the prompt's own log-probabilities, when asked for


async def events(job: GenerateJob, loaded: LoadedModel) -> AsyncIterator[list[Event]]:
    """Submits the job and yields its events, in the batches the engine delivered them, up to Done.

    Batches let a stream write several chunks at once; the job is cancelled if the consumer goes away.
    """
    job.loop = asyncio.get_running_loop()
    loaded.runner.submit(job)
    try:
        while True:
            batch = await job.next_events()
            failed = next((e for e in batch if isinstance(e, Failed)), None)
            if failed is not None:
                raise EngineFailure(failed.message)
            yield batch
            if isinstance(batch[-1], Done):
                return
    finally:
        job.cancel()
        if loaded.on_done is not None:
            loaded.on_done(loaded)


async def collect(job: GenerateJob, loaded: LoadedModel) -> Collected:
    texts: list[list[str]] = [[] for _ in range(job.n)]
    aligners = [Aligner(loaded.model) for _ in range(job.n)]
    entries: list[list[Entry]] = [[] for _ in range(job.n)]
    outcomes: list[Outcome | None] = [None] * job.n
    prompt: list[Entry] = []
    async for batch in events(job, loaded):
        for event in batch:
            if isinstance(event, Token):
                texts[event.index].append(event.text)
                if job.want_logprobs:
                    entries[event.index] += aligners[event.index].on_token(event)
            elif isinstance(event, PromptLogprobs):
                prompt += prompt_entries(loaded.model, event)
            elif isinstance(event, Finished):
                i = event.index
                texts[i].append(event.text)
                if job.want_logprobs:
                    entries[i] += aligners[i].release(event.text)
                outcomes[i] = Outcome("".join(texts[i]), event.reason, event.completion_tokens, event.logprob_sum,
                                      entries[i])
            elif isinstance(event, Done):
                return Collected([o for o in outcomes if o is not None], event, prompt)
    raise EngineFailure("the engine ended the job without finishing it")
