"""Ollama's /api/generate and /api/chat on the same engine as /v1, in Ollama's shapes.

A native request is translated into the OpenAI request it means (options to sampling fields, `format` to
`response_format`, native tool calls to OpenAI's), so both APIs share one set of checks, one prompt
builder, the tool-call grammar and parser, and logprobs. What is native stays here: NDJSON chunks with
`created_at`, timings in nanoseconds, `context` token lists, truncation of long chats, and the empty
request that loads (or with `keep_alive: 0` unloads) a model.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from pydantic import ValidationError

from ..engine.job import Done, Finished, GenerateJob, Token
from ..engine.vision import MediaPrompt
from ..protocol.native import (
    ChatChunk,
    ChatReply,
    ChatRequest,
    GenerateChunk,
    GenerateRequest,
    GenerationFields,
    NativeFunctionCall,
    NativeLogprob,
    NativeToolCall,
    NativeTopLogprob,
)
from ..protocol.openai import ChatCompletionRequest, CompletionRequest
from ..store.modelfile import ModelfileError, coerce_parameters
from . import chat
from .errors import InvalidRequest
from .generation import budget, context_limit, events, response_grammar, sampling_params
from .keep_alive import parse_keep_alive
from .logprobs import Aligner, Entry, chat_logprobs
from .models import LoadedModel, ModelManager
from .templates import ChatTemplate, TemplateRenderError
from .tool_calls import CallArguments, CallStart, Content, ToolCallParser

# Options that map straight onto the OpenAI request's sampling fields.
_SAMPLING_OPTIONS = ("temperature", "top_p", "top_k", "min_p", "typical_p", "seed", "stop", "repeat_penalty",
                     "repeat_last_n", "presence_penalty", "frequency_penalty", "num_ctx")
# Options that shape how a model is loaded, not how one request runs: they belong in the Modelfile.
_LOAD_OPTIONS = ("num_thread", "num_batch", "use_mmap")
_NO_EFFECT = {"num_gpu": "corral runs on the CPU", "main_gpu": "corral runs on the CPU",
              "num_keep": "corral never shifts the context"}


def created_at() -> str:
    """RFC 3339 with nanoseconds in UTC, as Ollama writes it."""
    now = time.time_ns()
    stamp = datetime.fromtimestamp(now // 1_000_000_000, UTC).strftime("%Y-%m-%dT%H:%M:%S")
    return f"{stamp}.{now % 1_000_000_000:09d}Z"


# -- translating a native request -------------------------------------------------------------------
def option_fields(options: dict[str, Any] | None) -> dict[str, Any]:
    """Ollama's `options` as OpenAI request fields; an option corral cannot honour per request is a 400."""
    if not options:
        return {}
    for name, reason in _NO_EFFECT.items():
        if name in options:
            raise InvalidRequest(f"option '{name}' has no effect here ({reason}); remove it", param=f"options.{name}")
    for name in _LOAD_OPTIONS:
        if name in options:
            raise InvalidRequest(
                f"option '{name}' sets how the model is loaded, not one request: set it as a PARAMETER in the "
                f"model's Modelfile (corral create)", param=f"options.{name}")
    try:
        values = coerce_parameters(options)
    except ModelfileError as exc:
        raise InvalidRequest(f"options: {exc}", param="options") from None
    fields = {name: values[name] for name in _SAMPLING_OPTIONS if name in values}
    predict = values.get("num_predict")
    if isinstance(predict, int) and predict > 0:  # -1 and -2: until the model stops or the context is full
        fields["max_tokens"] = predict
    return fields


def _format_field(fmt: str | dict[str, Any] | None) -> dict[str, Any] | None:
    if not fmt:
        return None
    if fmt == "json":
        return {"type": "json_object"}
    return {"type": "json_schema", "json_schema": {"name": "format", "schema": fmt}}


def _common(request: GenerationFields) -> dict[str, Any]:
    if request.think:
        raise InvalidRequest(f"model '{request.model}' does not support thinking", param="think")
    if request.shift:
        raise InvalidRequest("shift is not supported: corral never shifts the context; generation ends at the "
                             "context's end with done_reason 'length'", param="shift")
    if request.top_logprobs and not request.logprobs:
        raise InvalidRequest("top_logprobs needs logprobs: true", param="top_logprobs")
    fields: dict[str, Any] = {"model": request.model, **option_fields(request.options)}
    response_format = _format_field(request.format)
    if response_format is not None:
        fields["response_format"] = response_format
    return fields


def _validate(kind: type[ChatCompletionRequest | CompletionRequest], body: dict[str, Any]) -> Any:
    try:
        return kind.model_validate(body)
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(part) for part in error["loc"])
        raise InvalidRequest(f"{where}: {error['msg']}", param=where) from None


def _image_url(data: str, where: str) -> dict[str, Any]:
    """A native base64 image as an OpenAI image part (a data URL with the type its bytes show)."""
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequest(f"{where} is not valid base64", param=where) from None
    kinds = {b"\x89PNG": "image/png", b"\xff\xd8\xff": "image/jpeg", b"GIF8": "image/gif", b"BM": "image/bmp"}
    mime = next((m for magic, m in kinds.items() if raw.startswith(magic)), None)
    if mime is None and raw[:4] == b"RIFF" and raw[8:12] == b"WEBP":
        mime = "image/webp"
    return {"type": "image_url", "image_url": {"url": f"data:{mime or 'application/octet-stream'};base64,{data}"}}


def chat_request(request: ChatRequest) -> ChatCompletionRequest:
    """The OpenAI chat request a native one means. Native calls carry no ids (and results name the
    function instead), so ids are made up for them and results are matched to the latest call of their
    function that has no result yet."""
    messages: list[dict[str, Any]] = []
    unanswered: list[tuple[str, str]] = []  # (call id, function name), oldest first
    for i, m in enumerate(request.messages):
        item: dict[str, Any] = {"role": m.role, "content": m.content}
        if m.images:
            parts: list[dict[str, Any]] = [{"type": "text", "text": m.content}] if m.content else []
            parts += [_image_url(img, f"messages[{i}].images[{j}]") for j, img in enumerate(m.images)]
            item["content"] = parts
        if m.tool_calls:
            if m.role != "assistant":
                raise InvalidRequest(f"messages[{i}]: only assistant messages carry tool_calls",
                                     param=f"messages[{i}].tool_calls")
            calls = []
            for j, call in enumerate(m.tool_calls):
                call_id = call.id or f"call_{i}_{j}"
                calls.append({"id": call_id, "type": "function", "function": {
                    "name": call.function.name, "arguments": json.dumps(call.function.arguments)}})
                unanswered.append((call_id, call.function.name))
            item["tool_calls"] = calls
            if not m.content:
                item["content"] = None
        if m.role == "tool":
            call_id = m.tool_call_id
            if call_id is None:
                match = [c for c in unanswered if m.tool_name in (None, c[1])]
                if not match:
                    raise InvalidRequest(f"messages[{i}] is a tool result, but no earlier assistant message called "
                                         f"{m.tool_name or 'a tool'}", param=f"messages[{i}]")
                call_id = match[-1][0] if m.tool_name else match[0][0]
            unanswered = [c for c in unanswered if c[0] != call_id]
            item["tool_call_id"] = call_id
            if m.tool_name:
                item["name"] = m.tool_name
        elif m.tool_name or m.tool_call_id:
            raise InvalidRequest(f"messages[{i}]: only tool messages carry tool_name or tool_call_id",
                                 param=f"messages[{i}]")
        messages.append(item)
    body: dict[str, Any] = {**_common(request), "messages": messages}
    if request.tools:  # Ollama's clients send an empty list for "no tools"
        body["tools"] = request.tools
    if request.logprobs:
        body["logprobs"] = True
        body["top_logprobs"] = request.top_logprobs or 0
    return _validate(ChatCompletionRequest, body)


# -- running ------------------------------------------------------------------------------------------
@dataclass
class Run:
    """One prepared native request: its job, and what its responses need."""

    model: str
    loaded: LoadedModel
    job: GenerateJob
    started_ns: int
    load_ns: int
    chat: bool  # /api/chat (else /api/generate)
    parser: ToolCallParser | None = None
    context: list[int] | None = None  # generate: the prompt's tokens, which `context` continues
    generated: list[int] = field(default_factory=list)

    def chunks(self) -> AsyncIterator[ChatChunk] | AsyncIterator[GenerateChunk]:
        return chat_chunks(self) if self.chat else generate_chunks(self)

    async def whole(self) -> ChatChunk | GenerateChunk:
        return await (chat_whole(self) if self.chat else generate_whole(self))

    def timings(self, done: Done, eval_count: int) -> dict[str, int]:
        return {
            "total_duration": time.perf_counter_ns() - self.started_ns,
            "load_duration": self.load_ns,
            "prompt_eval_count": done.prompt_tokens,
            "prompt_eval_duration": done.prompt_ns,
            "eval_count": eval_count,
            "eval_duration": done.eval_ns,
        }


async def _load(manager: ModelManager, model: str, num_ctx: int | None) -> tuple[LoadedModel, int]:
    start = time.perf_counter_ns()
    loaded = await manager.get(model, num_ctx)
    return loaded, time.perf_counter_ns() - start


async def start(manager: ModelManager, request: GenerateRequest | ChatRequest) -> Run | GenerateChunk | ChatChunk:
    """A prepared run, or for an empty request (no prompt, no messages) the one reply it gets: the model
    loaded (`done_reason` "load"), or with `keep_alive: 0` unloaded ("unload")."""
    keep_alive = parse_keep_alive(request.keep_alive)
    if isinstance(request, ChatRequest):
        if request.messages:
            return await prepare_chat(manager, request, keep_alive)
    elif request.prompt or request.images or request.suffix is not None or request.context:
        return await prepare_generate(manager, request, keep_alive)
    if keep_alive == 0:
        await manager.unload(request.model)
        reason = "unload"
    else:
        manager.keep_alive(await manager.get(request.model), keep_alive)
        reason = "load"
    if isinstance(request, ChatRequest):
        return ChatChunk(model=request.model, created_at=created_at(), message=ChatReply(content=""), done=True,
                         done_reason=reason)
    return GenerateChunk(model=request.model, created_at=created_at(), response="", done=True, done_reason=reason)


async def prepare_chat(manager: ModelManager, request: ChatRequest, keep_alive: float | None = None) -> Run:
    """Everything that can fail on input, before the response starts. Too long a conversation loses its
    oldest turns (system messages and the last message stay) unless `truncate` is false."""
    started = time.perf_counter_ns()
    openai_request = chat_request(request)
    _, load_ns = await _load(manager, openai_request.model, openai_request.num_ctx)  # timed apart from the rest
    while True:
        try:
            prepared = await chat.prepare(manager, openai_request)
            break
        except InvalidRequest as exc:
            if exc.code != "context_length_exceeded" or request.truncate is False or exc.param != "messages":
                raise
            messages = openai_request.messages
            oldest = next((i for i, m in enumerate(messages[:-1]) if m.role != "system"), None)
            if oldest is None:
                raise
            drop = oldest + 1
            while drop < len(messages) - 1 and messages[drop].role == "tool":  # a call's results go with it
                drop += 1
            openai_request = openai_request.model_copy(update={"messages": messages[:oldest] + messages[drop:]})
    manager.keep_alive(prepared.loaded, keep_alive)
    return Run(request.model, prepared.loaded, prepared.job, started, load_ns, chat=True, parser=prepared.parser())


async def prepare_generate(manager: ModelManager, request: GenerateRequest, keep_alive: float | None = None) -> Run:
    started = time.perf_counter_ns()
    if request.raw and (request.template or request.system or request.context):
        raise InvalidRequest("raw mode does not support template, system, or context", param="raw")
    body = {**_common(request), "prompt": [0]}  # the prompt is built below; the fields are checked here
    fields = _validate(CompletionRequest, body)
    loaded, load_ns = await _load(manager, request.model, fields.num_ctx)
    model = loaded.model
    media: tuple = ()
    if request.images and (request.raw or request.suffix is not None):
        raise InvalidRequest("images need the chat template: they cannot be used with raw or suffix",
                             param="images")
    if request.suffix is not None:
        if not model.has_fim:
            raise InvalidRequest(f"model '{request.model}' does not support insert (it has no fill-in-the-middle "
                                 "tokens), so 'suffix' cannot be used with it", param="suffix")
        pre, suf, mid = model.fim
        head = [model.bos] if model.add_bos and model.bos >= 0 else []
        tokens = [*head, pre, *model.tokenize(request.prompt, False, False), suf,
                  *model.tokenize(request.suffix, False, False), mid]
    elif request.raw:
        tokens = model.tokenize(request.prompt, add_special=model.add_bos, parse_special=True)
    else:
        prompt = await _templated(request, loaded, manager)
        tokens, media = prompt.tokens, prompt.media
    if request.context:
        bad = next((t for t in request.context if not 0 <= t < model.n_vocab), None)
        if bad is not None:
            raise InvalidRequest(f"context holds token {bad}, outside the vocabulary", param="context")
        tokens = [*request.context, *tokens]
    n_ctx = context_limit(fields, loaded)
    if len(tokens) >= n_ctx and request.truncate is not False:
        keep = n_ctx - min(fields.max_tokens or n_ctx // 4, n_ctx // 2)  # room left to answer
        head = tokens[:1] if model.add_bos and tokens[:1] == [model.bos] else []
        tokens = head + tokens[len(tokens) - (keep - len(head)):]
    stop = fields.stops() if fields.stop is not None else list(loaded.params.get("stop") or [])
    job = GenerateJob(
        prompt=tokens,
        sampling=[sampling_params(fields, loaded, response_grammar(fields.response_format))],
        max_tokens=budget(len(tokens), n_ctx, fields.max_tokens, loaded),
        n_ctx=n_ctx,
        stop=stop,
        want_logprobs=bool(request.logprobs),
        top_logprobs=request.top_logprobs or 0,
        media=media,
    )
    manager.keep_alive(loaded, keep_alive)
    # A prompt with images has no token list to continue from: its image positions are not tokens.
    return Run(request.model, loaded, job, started, load_ns, chat=False, context=None if media else list(tokens))


async def _templated(request: GenerateRequest, loaded: LoadedModel, manager: ModelManager) -> MediaPrompt:
    """The prompt (and its images) as the user turn of a conversation, in the model's (or the request's)
    template."""
    if request.template is not None:
        try:
            loaded = dataclasses.replace(loaded, template=ChatTemplate(request.template, loaded.template.bos_token,
                                                                       loaded.template.eos_token))
        except TemplateRenderError as exc:
            raise InvalidRequest(str(exc), param="template") from None
    messages = [{"role": "system", "content": request.system}] if request.system is not None else []
    content: str | list[dict[str, Any]] = request.prompt
    if request.images:
        content = [{"type": "text", "text": request.prompt}] if request.prompt else []
        content += [_image_url(image, f"images[{j}]") for j, image in enumerate(request.images)]
    as_chat = ChatCompletionRequest.model_validate(
        {"model": request.model, "messages": [*messages, {"role": "user", "content": content}]})
    return await chat.build_prompt(as_chat, loaded, manager.settings)


def _native_logprobs(run: Run, entries: list[Entry]) -> list[NativeLogprob] | None:
    if not run.job.want_logprobs or not entries:
        return None
    out = []
    for item in chat_logprobs(run.loaded.model, entries).content:
        top = [NativeTopLogprob(token=t.token, logprob=t.logprob, bytes=t.bytes) for t in item.top_logprobs]
        out.append(NativeLogprob(token=item.token, logprob=item.logprob, bytes=item.bytes,
                                 top_logprobs=top if run.job.top_logprobs else None))
    return out


@dataclass
class _Piece:
    text: str = ""
    calls: list[NativeToolCall] = field(default_factory=list)
    entries: list[Entry] = field(default_factory=list)
    finished: Finished | None = None
    done: Done | None = None


async def _pieces(run: Run) -> AsyncIterator[list[_Piece]]:
    """The job's output as text, completed tool calls and logprobs, one list per engine delivery."""
    aligner = Aligner(run.loaded.model)
    calls: dict[int, dict[str, Any]] = {}

    def split(text: str, final: bool) -> tuple[str, list[NativeToolCall]]:
        if run.parser is None:
            return text, []
        content, done_calls = "", []
        for piece in run.parser.feed(text) + (run.parser.finish() if final else []):
            if isinstance(piece, Content):
                content += piece.text
            elif isinstance(piece, CallStart):
                calls[piece.index] = {"id": piece.id, "name": piece.name, "arguments": ""}
            elif isinstance(piece, CallArguments):
                calls[piece.index]["arguments"] += piece.text
        if final:  # native calls go out whole, with their arguments as an object
            for index, call in sorted(calls.items()):
                try:
                    arguments = json.loads(call["arguments"] or "{}")
                except ValueError:
                    arguments = {}  # cut short by the token limit
                done_calls.append(NativeToolCall(id=call["id"], function=NativeFunctionCall(
                    index=index, name=call["name"], arguments=arguments if isinstance(arguments, dict) else {})))
        return content, done_calls

    async for batch in events(run.job, run.loaded):
        out: list[_Piece] = []
        for event in batch:
            if isinstance(event, Token):
                run.generated.append(event.token)
                text, _ = split(event.text, final=False)
                entries = aligner.on_token(event) if run.job.want_logprobs else []
                out.append(_Piece(text=text, entries=entries))
            elif isinstance(event, Finished):
                text, done_calls = split(event.text, final=True)
                entries = aligner.release(event.text) if run.job.want_logprobs else []
                out.append(_Piece(text=text, calls=done_calls, entries=entries, finished=event))
            elif isinstance(event, Done):
                out.append(_Piece(done=event))
        yield out


async def chat_chunks(run: Run) -> AsyncIterator[ChatChunk]:
    finished: Finished | None = None
    async for batch in _pieces(run):
        text, calls, entries = "", [], []
        for piece in batch:
            text += piece.text
            calls += piece.calls
            entries += piece.entries
            finished = piece.finished or finished
            if piece.done is not None:
                if text or calls or entries:
                    yield _chat_chunk(run, text, calls, entries)
                    text, calls, entries = "", [], []
                assert finished is not None
                yield ChatChunk(model=run.model, created_at=created_at(), message=ChatReply(content=""), done=True,
                                done_reason=finished.reason, **run.timings(piece.done, finished.completion_tokens))
                return
        if text or calls or entries:
            yield _chat_chunk(run, text, calls, entries)


def _chat_chunk(run: Run, text: str, calls: list[NativeToolCall], entries: list[Entry]) -> ChatChunk:
    return ChatChunk(model=run.model, created_at=created_at(), message=ChatReply(content=text, tool_calls=calls or None),
                     done=False, logprobs=_native_logprobs(run, entries))


async def chat_whole(run: Run) -> ChatChunk:
    """The non-streamed answer: what the chunks add up to."""
    text, calls, logprobs = "", [], []
    last: ChatChunk | None = None
    async for chunk in chat_chunks(run):
        text += chunk.message.content
        calls += chunk.message.tool_calls or []
        logprobs += chunk.logprobs or []
        last = chunk
    assert last is not None and last.done
    return last.model_copy(update={"message": ChatReply(content=text, tool_calls=calls or None),
                                   "logprobs": logprobs if run.job.want_logprobs else None})


async def generate_chunks(run: Run) -> AsyncIterator[GenerateChunk]:
    finished: Finished | None = None
    async for batch in _pieces(run):
        text, entries = "", []
        for piece in batch:
            text += piece.text
            entries += piece.entries
            finished = piece.finished or finished
            if piece.done is not None:
                if text or entries:
                    yield _generate_chunk(run, text, entries)
                    text, entries = "", []
                assert finished is not None
                context = [*run.context, *run.generated] if run.context is not None else None
                yield GenerateChunk(model=run.model, created_at=created_at(), response="", done=True,
                                    done_reason=finished.reason, context=context,
                                    **run.timings(piece.done, finished.completion_tokens))
                return
        if text or entries:
            yield _generate_chunk(run, text, entries)


def _generate_chunk(run: Run, text: str, entries: list[Entry]) -> GenerateChunk:
    return GenerateChunk(model=run.model, created_at=created_at(), response=text, done=False,
                         logprobs=_native_logprobs(run, entries))


async def generate_whole(run: Run) -> GenerateChunk:
    text, logprobs = "", []
    last: GenerateChunk | None = None
    async for chunk in generate_chunks(run):
        text += chunk.response
        logprobs += chunk.logprobs or []
        last = chunk
    assert last is not None and last.done
    return last.model_copy(update={"response": text, "logprobs": logprobs if run.job.want_logprobs else None})

