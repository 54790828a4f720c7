"""Chat completions: messages to a prompt through the model's template, engine events to OpenAI objects."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from ..engine.job import Done, Finished, GenerateJob, Token
from ..protocol.openai import (
    AssistantMessage,
    ChatChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChunkChoice,
    Delta,
    PromptTokensDetails,
    Usage,
)
from .errors import InvalidRequest
from .generation import (
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
from .logprobs import Aligner, Entry, chat_logprobs
from .models import LoadedModel, ModelManager
from .templates import TemplateRenderError


def template_messages(request: ChatCompletionRequest, loaded: LoadedModel) -> list[dict[str, Any]]:
    """OpenAI messages as the template expects them; `developer` is a system message to every template."""
    out: list[dict[str, Any]] = []
    for i, message in enumerate(request.messages):
        if message.has_images():
            reason = ("image input is not served by this corral release yet" if loaded.has_projector
                      else "it has no vision projector")
            raise InvalidRequest(
                f"model '{request.model}' does not support images: {reason} (messages[{i}] has an image_url part)",
                param=f"messages[{i}].content",
            )
        item: dict[str, Any] = {
            "role": "system" if message.role == "developer" else message.role,
            "content": message.text(),
        }
        if message.name is not None:
            item["name"] = message.name
        out.append(item)
    # The model's SYSTEM stands in for a missing system message; its MESSAGE turns follow the system
    # message(s) and come before the conversation.
    head = 0
    while head < len(out) and out[head]["role"] == "system":
        head += 1
    system = out[:head] or ([{"role": "system", "content": loaded.system}] if loaded.system is not None else [])
    return [*system, *loaded.messages, *out[head:]]


def prompt_tokens(request: ChatCompletionRequest, loaded: LoadedModel) -> list[int]:
    messages = template_messages(request, loaded)
    try:
        if messages[-1]["role"] == "assistant":
            text = loaded.template.render_continuation(messages)
        else:
            text = loaded.template.render(messages, add_generation_prompt=True)
    except TemplateRenderError as exc:
        raise InvalidRequest(str(exc), param="messages") from None
    model = loaded.model
    bos_text = loaded.template.bos_token
    add_bos = model.add_bos and not (bos_text and text.startswith(bos_text))
    return model.tokenize(text, add_special=add_bos, parse_special=True)


@dataclass
class PreparedChat:
    request: ChatCompletionRequest
    loaded: LoadedModel
    job: GenerateJob
    id: str
    created: int

    def usage(self, done: Done, completion_tokens: int) -> Usage:
        return Usage(
            prompt_tokens=done.prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=done.prompt_tokens + completion_tokens,
            prompt_tokens_details=PromptTokensDetails(cached_tokens=done.cached_tokens),
        )


async def prepare(manager: ModelManager, request: ChatCompletionRequest) -> PreparedChat:
    """Everything that can fail on bad input happens here, before a response (or stream) starts."""
    if request.top_logprobs is not None and not request.logprobs:
        raise InvalidRequest("top_logprobs needs logprobs: true", param="top_logprobs")
    loaded = await manager.get(request.model, request.num_ctx)
    n = request.n or 1
    check_choices(n, loaded)
    tokens = prompt_tokens(request, loaded)
    n_ctx = context_limit(request, loaded)
    requested = request.max_completion_tokens or request.max_tokens
    stop = request.stops() if request.stop is not None else list(loaded.params.get("stop") or [])
    job = GenerateJob(
        prompt=tokens,
        sampling=choice_params(sampling_params(request, loaded, response_grammar(request.response_format)), n),
        max_tokens=budget(len(tokens), n_ctx, requested, loaded),
        n_ctx=n_ctx,
        stop=stop,
        want_logprobs=bool(request.logprobs),
        top_logprobs=request.top_logprobs or 0,
    )
    return PreparedChat(request, loaded, job, new_id("chatcmpl"), int(time.time()))


async def complete(chat: PreparedChat) -> ChatCompletion:
    collected = await collect(chat.job, chat.loaded)
    outcomes, done = collected.outcomes, collected.done
    model = chat.loaded.model
    return ChatCompletion(
        id=chat.id,
        created=chat.created,
        model=chat.request.model,
        system_fingerprint=chat.loaded.fingerprint,
        choices=[
            ChatChoice(
                index=i,
                message=AssistantMessage(content=o.text),
                finish_reason=o.finish_reason,
                logprobs=chat_logprobs(model, o.entries) if chat.job.want_logprobs else None,
            )
            for i, o in enumerate(outcomes)
        ],
        usage=chat.usage(done, sum(o.completion_tokens for o in outcomes)),
    )


async def stream(chat: PreparedChat) -> AsyncIterator[list[ChatCompletionChunk]]:
    """OpenAI's framing: role in each choice's first delta, content deltas, a finish chunk, then usage.

    Chunks come in lists, one per batch of engine events, so they can go out in one write.
    """

    def chunk(choices: list[ChunkChoice], usage: Usage | None = None) -> ChatCompletionChunk:
        return ChatCompletionChunk(
            id=chat.id,
            created=chat.created,
            model=chat.request.model,
            system_fingerprint=chat.loaded.fingerprint,
            choices=choices,
            usage=usage,
        )

    want = chat.job.want_logprobs
    aligners = [Aligner(chat.loaded.model) for _ in range(chat.job.n)]

    def content(index: int, text: str, entries: list[Entry]) -> ChatCompletionChunk:
        logprobs = chat_logprobs(chat.loaded.model, entries) if want else None
        return chunk([ChunkChoice(index=index, delta=Delta(content=text), logprobs=logprobs)])

    yield [chunk([ChunkChoice(index=i, delta=Delta(role="assistant", content=""))]) for i in range(chat.job.n)]
    completion_tokens = 0
    async for batch in events(chat.job, chat.loaded):
        out: list[ChatCompletionChunk] = []
        for event in batch:
            if isinstance(event, Token):
                entries = aligners[event.index].on_token(event) if want else []
                if event.text:
                    out.append(content(event.index, event.text, entries))
            elif isinstance(event, Finished):
                completion_tokens += event.completion_tokens
                entries = aligners[event.index].release(event.text) if want else []
                if event.text:
                    out.append(content(event.index, event.text, entries))
                out.append(chunk([ChunkChoice(index=event.index, delta=Delta(), finish_reason=event.reason)]))
            elif isinstance(event, Done):
                options = chat.request.stream_options
                if options is not None and options.include_usage:
                    out.append(chunk([], usage=chat.usage(event, completion_tokens)))
        if out:
            yield out
