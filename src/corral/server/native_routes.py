"""Ollama's native /api routes for model management, in Ollama's shapes (`{"error": "..."}` on failure)."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel

from ..protocol.native import (
    ChatChunk,
    ChatRequest,
    CopyRequest,
    CreateRequest,
    EmbedRequest,
    EmbedResponse,
    GenerateChunk,
    GenerateRequest,
    LegacyEmbeddingRequest,
    LegacyEmbeddingResponse,
    ModelRequest,
    PsResponse,
    ShowResponse,
    StatusResponse,
    TagsResponse,
    TransferRequest,
    VersionResponse,
)
from ..service import embeddings, manage, native_generation, transfer
from ..service.errors import ServiceError
from ..service.models import ModelManager
from .openai_routes import _unless_disconnected

router = APIRouter(prefix="/api")
log = logging.getLogger("corral.server")


def _manager(request: Request) -> ModelManager:
    return request.app.state.manager


async def _progress(statuses: AsyncIterator[StatusResponse], stream: bool | None) -> Response:
    """NDJSON progress when streaming (Ollama's default), else the final status as one JSON object.

    The first status is awaited before the response starts, so input errors keep their status code;
    a failure after that is the stream's last line, `{"error": "..."}`, as Ollama sends it.
    """
    first = await anext(statuses)
    if not stream:
        last = first
        async for last in statuses:
            pass
        return JSONResponse(last.model_dump(exclude_none=True))

    async def all_statuses() -> AsyncIterator[StatusResponse]:
        yield first
        async for status in statuses:
            yield status

    return _ndjson(all_statuses(), exclude_none=True)


def _ndjson(chunks: AsyncIterator[BaseModel], exclude_none: bool = False) -> StreamingResponse:
    """One JSON object per line; a failure once the response has started is its last line, as Ollama's."""

    async def lines() -> AsyncIterator[bytes]:
        try:
            async for chunk in chunks:
                yield chunk.model_dump_json(exclude_none=exclude_none).encode() + b"\n"
        except ServiceError as exc:
            yield json.dumps({"error": exc.message}).encode() + b"\n"
        except Exception as exc:  # the status is already sent; tell the client in-band, as the SSE writer does
            log.exception("stream failed")
            yield json.dumps({"error": f"internal error: {type(exc).__name__}"}).encode() + b"\n"

    return StreamingResponse(lines(), media_type="application/x-ndjson")


def _json(model: BaseModel | Response) -> Response:
    if isinstance(model, Response):  # the client went away
        return model
    return Response(model.model_dump_json(), media_type="application/json")


async def _generation(request: Request, body: GenerateRequest | ChatRequest) -> Response:
    """Both generation routes: an empty request loads or unloads; anything else is prepared (every input
    error happens here, before the response starts), then streamed or awaited whole."""
    request.state.record.model = body.model
    started = await native_generation.start(_manager(request), body)
    if not isinstance(started, native_generation.Run):
        return _json(started)
    request.state.record.jobs = [started.job]
    if body.stream is False:
        return _json(await _unless_disconnected(request, started.whole()))
    return _ndjson(started.chunks())


@router.post("/generate", response_model=GenerateChunk)
async def generate(body: GenerateRequest, request: Request) -> Response:
    return await _generation(request, body)


@router.post("/chat", response_model=ChatChunk)
async def chat(body: ChatRequest, request: Request) -> Response:
    return await _generation(request, body)


@router.get("/ps", response_model=PsResponse)
async def ps(request: Request) -> PsResponse:
    return manage.running(_manager(request))


@router.get("/version", response_model=VersionResponse)
async def version() -> VersionResponse:
    return manage.version()


@router.get("/tags", response_model=TagsResponse)
async def tags(request: Request) -> TagsResponse:
    return manage.list_tags(_manager(request))


@router.post("/show", response_model=ShowResponse)
async def show(body: ModelRequest, request: Request) -> ShowResponse:
    return await asyncio.to_thread(manage.show, _manager(request), body.target())


@router.post("/copy")
async def copy(body: CopyRequest, request: Request) -> Response:
    manage.copy(_manager(request), body.source, body.destination)
    return Response(status_code=200)


@router.delete("/delete")
async def delete(body: ModelRequest, request: Request) -> Response:
    manager = _manager(request)
    target = body.target()
    if target:
        try:
            await manager.unload(target)  # its engines go with it (a copy's engine reloads on next use)
        except ServiceError:
            pass  # an unknown or invalid name: delete says so below
    manage.delete(manager, target)
    return Response(status_code=200)


@router.post("/create")
async def create(body: CreateRequest, request: Request) -> Response:
    return await _progress(manage.create(_manager(request), body), body.stream)


@router.post("/pull")
async def pull(body: TransferRequest, request: Request) -> Response:
    return await _progress(transfer.pull(_manager(request), body), body.stream)


@router.post("/push")
async def push(body: TransferRequest, request: Request) -> Response:
    return await _progress(transfer.push(_manager(request), body), body.stream)


@router.head("/blobs/{digest}")
async def blob_exists(digest: str, request: Request) -> Response:
    return Response(status_code=200 if manage.has_blob(_manager(request), digest) else 404)


@router.post("/blobs/{digest}", status_code=201)
async def blob_upload(digest: str, request: Request) -> Response:
    await manage.put_blob(_manager(request), digest, request.stream())
    return Response(status_code=201)


@router.post("/embed", response_model=EmbedResponse)
async def embed(body: EmbedRequest, request: Request) -> Response:
    result = await embeddings.embed_native(_manager(request), body)
    return Response(result.model_dump_json(), media_type="application/json")


@router.post("/embeddings", response_model=LegacyEmbeddingResponse)
async def legacy_embeddings(body: LegacyEmbeddingRequest, request: Request) -> Response:
    result = await embeddings.embed_legacy(_manager(request), body)
    return Response(result.model_dump_json(), media_type="application/json")
