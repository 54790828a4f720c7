"""Which models exist and which are loaded: names to store entries, entries to running engines.

Models load on first use. A request asking for a larger context than the loaded engine holds gets a
new engine with that context; the old one finishes what it is serving and is then closed.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

from ..config import Settings
from ..engine.model import LlamaModel, ModelLoadError
from ..engine.runner import Runner, RunnerConfig
from ..store.names import InvalidName, Name
from ..store.store import (
    ADAPTER_MEDIA_TYPE,
    MESSAGES_MEDIA_TYPE,
    MODEL_MEDIA_TYPE,
    PARAMS_MEDIA_TYPE,
    PROJECTOR_MEDIA_TYPE,
    SYSTEM_MEDIA_TYPE,
    TEMPLATE_MEDIA_TYPE,
    Entry,
    Store,
)
from .errors import EngineFailure, InvalidRequest, ModelNotFound
from .templates import ChatTemplate, TemplateRenderError

log = logging.getLogger("corral.service")


@dataclass
class LoadedModel:
    entry: Entry
    model: LlamaModel
    runner: Runner
    template: ChatTemplate
    n_ctx: int  # context per sequence the engine was built with
    params: dict[str, Any] = field(default_factory=dict)  # the model's PARAMETERs (Ollama option names)
    system: str | None = None
    messages: list[dict[str, str]] = field(default_factory=list)  # the model's MESSAGE turns
    has_projector: bool = False
    fingerprint: str = ""

    def close(self) -> None:
        self.runner.close()
        self.model.close()


def _engine_version() -> str:
    try:
        return metadata.version("llama-cpp-python")
    except metadata.PackageNotFoundError:
        return "unknown"


class ModelManager:
    def __init__(self, store: Store, settings: Settings) -> None:
        self.store = store
        self.settings = settings
        self._loaded: dict[str, LoadedModel] = {}  # by manifest digest: copies of a model share an engine
        self._retiring: list[LoadedModel] = []
        self._lock = asyncio.Lock()

    def resolve(self, raw: str) -> Entry:
        try:
            name = Name.parse(raw)
        except InvalidName as exc:
            raise InvalidRequest(str(exc), param="model") from None
        entry = self.store.find(name)
        if entry is None:
            raise ModelNotFound(raw)
        return entry

    async def get(self, raw_name: str, num_ctx: int | None = None) -> LoadedModel:
        entry = self.resolve(raw_name)
        async with self._lock:
            self._reap()
            loaded = self._loaded.get(entry.digest)
            if loaded is not None and (num_ctx is None or num_ctx <= loaded.n_ctx):
                return loaded
            fresh = await asyncio.to_thread(self._load, entry, num_ctx)
            if loaded is not None:
                self._retiring.append(loaded)
            self._loaded[entry.digest] = fresh
            return fresh

    def _load(self, entry: Entry, num_ctx: int | None) -> LoadedModel:
        manifest = entry.manifest
        model_layer = manifest.layer(MODEL_MEDIA_TYPE)
        if model_layer is None:
            raise EngineFailure(f"model '{entry.name}' has no weights layer")
        params = self._json_layer(entry, PARAMS_MEDIA_TYPE) or {}
        try:
            model = LlamaModel(self.store.blob_path(model_layer.digest), use_mmap=params.get("use_mmap", True))
        except ModelLoadError as exc:
            raise EngineFailure(f"model '{entry.name}' could not be loaded: {exc}") from None
        if num_ctx is not None and num_ctx > model.n_ctx_train:
            model.close()
            raise InvalidRequest(
                f"num_ctx {num_ctx} is larger than the context model '{entry.name}' was trained with "
                f"({model.n_ctx_train})",
                param="num_ctx",
            )
        wanted = num_ctx or min(int(params.get("num_ctx") or 0) or self.settings.context_length, model.n_ctx_train)
        config = RunnerConfig(
            n_ctx_per_seq=wanted,
            n_parallel=self.settings.num_parallel,
            n_threads=int(params.get("num_thread") or self.settings.num_threads),
            n_batch=int(params.get("num_batch") or self.settings.batch_size),
            stream_interval=self.settings.stream_interval_ms / 1000,
        )
        try:
            adapters = [model.load_adapter(self.store.blob_path(layer.digest))
                        for layer in manifest.layers if layer.media_type == ADAPTER_MEDIA_TYPE]
            runner = Runner(model, config, adapters)
        except Exception as exc:
            model.close()
            raise EngineFailure(f"model '{entry.name}' could not start: {exc}") from None
        template_layer = manifest.layer(TEMPLATE_MEDIA_TYPE)
        system_layer = manifest.layer(SYSTEM_MEDIA_TYPE)
        source = self.store.read_blob(template_layer.digest).decode() if template_layer else model.chat_template()
        bos = model.detokenize_special(model.bos) if model.bos >= 0 else ""
        eos = model.detokenize_special(model.eos) if model.eos >= 0 else ""
        try:
            template = ChatTemplate(source, bos_token=bos, eos_token=eos)
        except TemplateRenderError as exc:
            runner.close()
            model.close()
            raise EngineFailure(f"model '{entry.name}': {exc}") from None
        fingerprint = "fp_" + hashlib.sha256(
            f"{entry.digest}|{wanted}|{_engine_version()}".encode()
        ).hexdigest()[:10]
        log.info("loaded %s (context %d per sequence, %d slots)", entry.name, wanted, config.n_parallel)
        return LoadedModel(
            entry=entry,
            model=model,
            runner=runner,
            template=template,
            n_ctx=wanted,
            params=params,
            system=self.store.read_blob(system_layer.digest).decode() if system_layer else None,
            messages=self._json_layer(entry, MESSAGES_MEDIA_TYPE) or [],
            has_projector=manifest.layer(PROJECTOR_MEDIA_TYPE) is not None,
            fingerprint=fingerprint,
        )

    def _json_layer(self, entry: Entry, media_type: str) -> Any:
        layer = entry.manifest.layer(media_type)
        return json.loads(self.store.read_blob(layer.digest)) if layer else None

    def _reap(self) -> None:
        for old in [m for m in self._retiring if m.runner.busy == 0]:
            self._retiring.remove(old)
            old.close()

    async def close(self) -> None:
        async with self._lock:
            for loaded in [*self._loaded.values(), *self._retiring]:
                await asyncio.to_thread(loaded.close)
            self._loaded.clear()
            self._retiring.clear()
