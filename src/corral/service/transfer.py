"""Pull and push through the registry client, as a stream of Ollama progress statuses."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from ..protocol.native import StatusResponse, TransferRequest
from ..store import registry
from .errors import ServiceError
from .manage import parse_name
from .models import ModelManager


class RegistryFailure(ServiceError):
    """The registry refused or failed the transfer; 404 when what was asked for does not exist."""

    kind = "registry_error"

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


def _failure(exc: registry.RegistryError) -> RegistryFailure:
    status = getattr(exc, "status", None)
    return RegistryFailure(str(exc), 404 if status == 404 else 400 if status == 400 else 502)


async def _run(job: Callable[[Callable[[dict[str, Any]], Awaitable[None]]], Awaitable[Any]]
               ) -> AsyncIterator[StatusResponse]:
    queue: asyncio.Queue[StatusResponse | None] = asyncio.Queue()

    async def progress(update: dict[str, Any]) -> None:
        await queue.put(StatusResponse(**update))

    task = asyncio.create_task(job(progress))
    task.add_done_callback(lambda _: queue.put_nowait(None))
    try:
        while (status := await queue.get()) is not None:
            yield status
        if (exc := task.exception()) is not None:
            if isinstance(exc, registry.RegistryError):
                raise _failure(exc)
            raise exc
    finally:
        task.cancel()  # a client that goes away stops the transfer; a pull resumes from its partial files


async def pull(manager: ModelManager, body: TransferRequest) -> AsyncIterator[StatusResponse]:
    name = parse_name(body.target())
    async for status in _run(lambda progress: registry.pull(
            manager.store, name, insecure=bool(body.insecure), progress=progress)):
        yield status


async def push(manager: ModelManager, body: TransferRequest) -> AsyncIterator[StatusResponse]:
    name = parse_name(body.target())
    async for status in _run(lambda progress: registry.push(
            manager.store, name, insecure=bool(body.insecure), progress=progress)):
        yield status
