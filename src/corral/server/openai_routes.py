"""The /v1 routes: thin translators between HTTP and the service; no route touches the engine."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from types import ModuleType
from typing import TypeVar

from fastapi import APIRouter, Request
from fastapi.responses import Response

from ..protocol.openai import (
    ChatCompletion,
    ChatCompletionRequest,
    Completion,
    CompletionRequest,
    EmbeddingList,
    EmbeddingRequest,
    ErrorResponse,
    Model,
    ModelList,
)
from ..service import catalog, chat, completions, embeddings
from ..service.errors import InvalidRequest
from ..service.models import ModelManager
from .sse import sse_response

router = APIRouter(prefix="/v1", responses={400: {"model": ErrorResponse}, 404: {"model": ErrorResponse}})
T = TypeVar("T")


def _manager(request: Request) -> ModelManager:
    return request.app.state.manager


async def _unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Runs a non-streamed generation, abandoning it (and freeing its slot) if the client goes away."""
    task = asyncio.ensure_future(work)

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait([task, watcher], return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if not task.done():
        task.cancel()
        return Response(status_code=499)  # type: ignore[return-value]
    return task.result()


async def _generate(request: Request, body: ChatCompletionRequest | CompletionRequest, service: ModuleType):
    """Both generation routes: validate, prepare (every input error happens here), then stream or wait."""
    if body.stream_options is not None and not body.stream:
        raise InvalidRequest("stream_options is only allowed when stream is true", param="stream_options")
    record = request.state.record
    record.model = body.model
    prepared = await service.prepare(_manager(request), body)
    record.jobs = [p.job for p in prepared.prompts] if hasattr(prepared, "prompts") else [prepared.job]
    if body.stream:
        return sse_response(service.stream(prepared))
    return await _unless_disconnected(request, service.complete(prepared))


@router.post("/chat/completions", response_model=ChatCompletion)
async def chat_completions(body: ChatCompletionRequest, request: Request):
    return await _generate(request, body, chat)


@router.post("/completions", response_model=Completion)
async def create_completion(body: CompletionRequest, request: Request):
    return await _generate(request, body, completions)


@router.post("/embeddings", response_model=EmbeddingList)
async def create_embeddings(body: EmbeddingRequest, request: Request):
    request.state.record.model = body.model
    result = await _unless_disconnected(request, embeddings.create_embeddings(_manager(request), body))
    if isinstance(result, Response):
        return result
    request.state.record.prompt_tokens = result.usage.prompt_tokens
    # Serialised once here: a large batch of vectors is the bulk of the response's cost.
    return Response(result.model_dump_json(), media_type="application/json")


@router.get("/models", response_model=ModelList)
async def list_models(request: Request) -> ModelList:
    return catalog.list_models(_manager(request))


@router.get("/models/{name:path}", response_model=Model)
async def retrieve_model(name: str, request: Request) -> Model:
    return catalog.retrieve_model(_manager(request), name)
