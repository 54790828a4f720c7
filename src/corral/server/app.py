"""The FastAPI application: store and model manager set up at start, routes and error envelopes mounted."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.responses import PlainTextResponse

from .. import __version__
from ..config import Settings
from ..service.models import ModelManager
from ..store.bundled import import_bundled
from ..store.store import Store
from . import errors, native_routes, openai_routes
from .guard import Guard, is_loopback

log = logging.getLogger("corral.server")


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings.from_env()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        store = Store(settings.models_dir)
        store.claim()  # removes the temporary files of writes that a crash interrupted
        if settings.import_bundled:
            for name in import_bundled(store):
                log.info("bundled model ready: %s", name)
        app.state.manager = ModelManager(store, settings)
        yield
        await app.state.manager.close()

    app = FastAPI(title="corral", version=__version__, lifespan=lifespan)
    app.state.settings = settings
    app.add_middleware(Guard, settings=settings)
    if not is_loopback(settings.host) and not settings.api_keys:
        log.warning("listening on %s, beyond this machine, with no API keys: anyone who can reach it can use "
                    "and change your models; set CORRAL_API_KEYS", settings.host)
    errors.install(app)
    app.include_router(openai_routes.router)
    app.include_router(native_routes.router)

    @app.api_route("/", methods=["GET", "HEAD"], response_class=PlainTextResponse, include_in_schema=False)
    async def health() -> str:
        return "corral is running"

    return app
