"""Chat completions: messages to a prompt through the model's template, engine events to OpenAI objects."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from ..config import Settings
from ..engine.job import Done, Finished, GenerateJob, Token
from ..engine.vision import MediaPrompt
from ..protocol.openai import (
    AssistantMessage,
    ImagePart,
    ChatChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChoiceLogprobs,
    ChunkChoice,
    Delta,
    DeltaFunction,
    DeltaToolCall,
    PromptTokensDetails,
    ResponseFunctionCall,
    ResponseToolCall,
    Usage,
)
from . import images, tools
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
from .tool_calls import CallStart, Content, ToolCallParser, gather


def image_sources(request: ChatCompletionRequest) -> list[tuple[str, str]]:
    """Every image part's URL with where it is (`messages[i].content[j]`), in prompt order."""
    found = []
    for i, message in enumerate(request.messages):
        if isinstance(message.content, list):
            for j, part in enumerate(message.content):
                if isinstance(part, ImagePart):
                    url = part.image_url if isinstance(part.image_url, str) else part.image_url.url
                    found.append((url, f"messages[{i}].content[{j}]"))
    return found


def _refuse_images(request: ChatCompletionRequest, loaded: LoadedModel) -> None:
    for i, message in enumerate(request.messages):
        if message.has_images():
            reason = ("it has no vision projector" if not loaded.has_projector
                      else "images need the asynchronous prompt builder (chat.build_prompt)")
            raise InvalidRequest(
                f"model '{request.model}' does not support images: {reason} (messages[{i}] has an image_url part)",
                param=f"messages[{i}].content",
            )


def template_messages(
    request: ChatCompletionRequest, loaded: LoadedModel, preamble: str | None = None, marker: str | None = None
) -> list[dict[str, Any]]:
    """OpenAI messages as the template expects them; `developer` is a system message to every template.

    Earlier tool calls and results go to a template that takes tools as it expects them (arguments as
    objects, `tool` messages with the function's name); for one that does not, they are written out in
    the Hermes format and results become user turns, so any template can render them.

    An image part becomes `marker` (the vision context's stand-in for one image) where it stood among the
    text parts, which are joined with newlines; without a marker, images are a 400."""
    if marker is None:
        _refuse_images(request, loaded)
    takes_tools = tools.template_format(loaded.template.source) is not None
    out: list[dict[str, Any]] = []
    call_names: dict[str, str] = {}
    for i, message in enumerate(request.messages):
        content = message.text()
        if marker is not None and message.has_images():
            assert isinstance(message.content, list)
            content = "\n".join(marker if isinstance(p, ImagePart) else p.text for p in message.content)
        item: dict[str, Any] = {
            "role": "system" if message.role == "developer" else message.role,
            "content": content,
        }
        if message.name is not None:
            item["name"] = message.name
        if message.tool_calls:
            calls = tools.history_calls(message, i)
            call_names.update((c["id"], c["function"]["name"]) for c in calls)
            if takes_tools:
                item["tool_calls"] = calls
            else:
                item["content"] = "\n".join(filter(None, [item["content"], *map(tools.hermes_call_text, calls)]))
        if message.role == "tool":
            assert message.tool_call_id is not None
            name = message.name or call_names.get(message.tool_call_id)
            if name is None:
                raise InvalidRequest(
                    f"messages[{i}] answers tool call {message.tool_call_id!r}, but no earlier assistant message "
                    f"made a call with that id",
                    param=f"messages[{i}].tool_call_id",
                )
            if takes_tools:
                item.update(tool_call_id=message.tool_call_id, name=name)
            else:
                result = tools.hermes_result_text(item["content"])
                if out and out[-1].get("tool_results"):  # results of one turn's calls go in one user turn
                    out[-1]["content"] += "\n" + result
                    continue
                item = {"role": "user", "content": result, "tool_results": True}
        out.append(item)
    for item in out:
        item.pop("tool_results", None)
    # The model's SYSTEM stands in for a missing system message; its MESSAGE turns follow the system
    # message(s) and come before the conversation.
    head = 0
    while head < len(out) and out[head]["role"] == "system":
        head += 1
    system = out[:head] or ([{"role": "system", "content": loaded.system}] if loaded.system is not None else [])
    if preamble is not None:
        if system:
            system = [*system[:-1], {**system[-1], "content": f"{system[-1]['content']}\n\n{preamble}"}]
        else:
            system = [{"role": "system", "content": preamble}]
    return [*system, *loaded.messages, *out[head:]]


def prompt_text(request: ChatCompletionRequest, loaded: LoadedModel, plan: tools.ToolPlan | None = None,
                marker: str | None = None) -> tuple[str, bool]:
    """The templated prompt, and whether tokenizing it must add the model's BOS (the template may have)."""
    messages = template_messages(request, loaded, plan.preamble if plan else None, marker)
    extra: dict[str, Any] = {}
    if plan is not None and plan.template_tools is not None:
        extra["tools"] = plan.template_tools
    try:
        if messages[-1]["role"] == "assistant":
            text = loaded.template.render_continuation(messages, **extra)
        else:
            text = loaded.template.render(messages, add_generation_prompt=True, **extra)
    except TemplateRenderError as exc:
        raise InvalidRequest(str(exc), param="messages") from None
    bos_text = loaded.template.bos_token
    return text, loaded.model.add_bos and not (bos_text and text.startswith(bos_text))


def prompt_tokens(request: ChatCompletionRequest, loaded: LoadedModel, plan: tools.ToolPlan | None = None) -> list[int]:
    """The prompt of a request without images (images are a 400 here; see `build_prompt`)."""
    text, add_bos = prompt_text(request, loaded, plan)
    return loaded.model.tokenize(text, add_special=add_bos, parse_special=True)


async def build_prompt(request: ChatCompletionRequest, loaded: LoadedModel, settings: Settings,
                       plan: tools.ToolPlan | None = None) -> MediaPrompt:
    """The prompt of any chat request: its images are read (data URLs, fetched URLs), checked, and placed
    where their parts stood; image tokens count in the prompt's length."""
    sources = image_sources(request)
    if len(sources) > settings.max_images:
        raise InvalidRequest(f"the request has {len(sources)} images; at most {settings.max_images} are allowed "
                             "(CORRAL_MAX_IMAGES)", param="messages")
    if not sources:
        return MediaPrompt(prompt_tokens(request, loaded, plan), ())
    if not loaded.has_projector:
        _refuse_images(request, loaded)
    marker = images.marker(loaded, request.model, sources[0][1])
    inputs = await images.read_images(sources, settings)
    text, add_bos = prompt_text(request, loaded, plan, marker)
    return await images.tokenize(loaded, request.model, text, inputs, add_bos)


@dataclass
class PreparedChat:
    request: ChatCompletionRequest
    loaded: LoadedModel
    job: GenerateJob
    id: str
    created: int
    tools: tools.ToolPlan | None

    def parser(self) -> ToolCallParser | None:
        return ToolCallParser(self.tools.fmt, self.tools.functions) if self.tools else None

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
    limit = manager.settings.max_messages
    if len(request.messages) > limit:
        raise InvalidRequest(f"the request has {len(request.messages)} messages; at most {limit} are allowed "
                             "(CORRAL_MAX_MESSAGES)", param="messages")
    loaded = await manager.get(request.model, request.num_ctx)
    n = request.n or 1
    check_choices(n, loaded)
    plan = tools.plan(request, loaded)
    prompt = await build_prompt(request, loaded, manager.settings, plan)
    tokens = prompt.tokens
    n_ctx = context_limit(request, loaded)
    requested = request.max_completion_tokens or request.max_tokens
    stop = request.stops() if request.stop is not None else list(loaded.params.get("stop") or [])
    if plan is not None:
        params = sampling_params(request, loaded, plan.grammar, plan.trigger)
    else:
        params = sampling_params(request, loaded, response_grammar(request.response_format))
    job = GenerateJob(
        prompt=tokens,
        sampling=choice_params(params, n),
        max_tokens=budget(len(tokens), n_ctx, requested, loaded),
        n_ctx=n_ctx,
        stop=stop,
        want_logprobs=bool(request.logprobs),
        top_logprobs=request.top_logprobs or 0,
        shown_tokens=plan.shown_tokens if plan else frozenset(),
        media=prompt.media,
    )
    return PreparedChat(request, loaded, job, new_id("chatcmpl"), int(time.time()), plan)


def _message(chat: PreparedChat, text: str) -> tuple[AssistantMessage, bool]:
    """The assistant message for one choice's output, and whether it holds tool calls."""
    parser = chat.parser()
    if parser is None:
        return AssistantMessage(content=text), False
    parsed = gather(parser.feed(text) + parser.finish())
    calls = [ResponseToolCall(id=c.id, function=ResponseFunctionCall(name=c.name, arguments=c.arguments))
             for c in parsed.calls]
    content = parsed.content if parsed.content.strip() or not calls else None
    return AssistantMessage(content=content, tool_calls=calls or None), bool(calls)


def _finish_reason(reason: str, called: bool) -> str:
    return "tool_calls" if called and reason == "stop" else reason


async def complete(chat: PreparedChat) -> ChatCompletion:
    collected = await collect(chat.job, chat.loaded)
    outcomes, done = collected.outcomes, collected.done
    model = chat.loaded.model
    choices = []
    for i, o in enumerate(outcomes):
        message, called = _message(chat, o.text)
        choices.append(ChatChoice(
            index=i,
            message=message,
            finish_reason=_finish_reason(o.finish_reason, called),
            logprobs=chat_logprobs(model, o.entries) if chat.job.want_logprobs else None,
        ))
    return ChatCompletion(
        id=chat.id,
        created=chat.created,
        model=chat.request.model,
        system_fingerprint=chat.loaded.fingerprint,
        choices=choices,
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
    parsers = [chat.parser() for _ in range(chat.job.n)]
    unsent: list[list[Entry]] = [[] for _ in range(chat.job.n)]  # logprobs waiting for a chunk to carry them
    called = [False] * chat.job.n

    def logprobs(index: int) -> ChoiceLogprobs | None:
        if not want:
            return None
        entries, unsent[index] = unsent[index], []
        return chat_logprobs(chat.loaded.model, entries)

    def deltas(index: int, text: str, final: bool = False) -> list[ChatCompletionChunk]:
        parser = parsers[index]
        if parser is None:
            return [chunk([ChunkChoice(index=index, delta=Delta(content=text), logprobs=logprobs(index))])] if text else []
        out = []
        for piece in parser.feed(text) + (parser.finish() if final else []):
            if isinstance(piece, Content):
                delta = Delta(content=piece.text)
            elif isinstance(piece, CallStart):
                called[index] = True
                delta = Delta(tool_calls=[DeltaToolCall(index=piece.index, id=piece.id, type="function",
                                                        function=DeltaFunction(name=piece.name, arguments=""))])
            else:
                delta = Delta(tool_calls=[DeltaToolCall(index=piece.index, function=DeltaFunction(arguments=piece.text))])
            out.append(chunk([ChunkChoice(index=index, delta=delta, logprobs=logprobs(index))]))
        return out

    yield [chunk([ChunkChoice(index=i, delta=Delta(role="assistant", content=""))]) for i in range(chat.job.n)]
    completion_tokens = 0
    async for batch in events(chat.job, chat.loaded):
        out: list[ChatCompletionChunk] = []
        for event in batch:
            if isinstance(event, Token):
                if want:
                    unsent[event.index] += aligners[event.index].on_token(event)
                out += deltas(event.index, event.text)
            elif isinstance(event, Finished):
                i = event.index
                completion_tokens += event.completion_tokens
                if want:
                    unsent[i] += aligners[i].release(event.text)
                out += deltas(i, event.text, final=True)
                reason = _finish_reason(event.reason, called[i])
                out.append(chunk([ChunkChoice(index=i, delta=Delta(), finish_reason=reason, logprobs=logprobs(i) if unsent[i] else None)]))
            elif isinstance(event, Done):
                options = chat.request.stream_options
                if options is not None and options.include_usage:
                    out.append(chunk([], usage=chat.usage(event, completion_tokens)))
        if out:
            yield out
