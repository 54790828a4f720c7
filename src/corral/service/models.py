"""Which models exist and which are loaded: names to store entries, entries to running engines.

Models load on first use. A request asking for a larger context than the loaded engine holds gets a
new engine with that context; the old one finishes what it is serving and is then closed.

Scheduling, as Ollama does it: an idle model unloads after its keep-alive (CORRAL_KEEP_ALIVE, 5 minutes;
a request's `keep_alive` changes it for that model; negative: never; 0: right after the request); loading
a model beyond CORRAL_MAX_LOADED_MODELS first unloads the least recently used idle one (or waits for one to
become idle); and past CORRAL_MAX_QUEUE requests waiting for a slot, a new request is refused at once.

Generation and embeddings have separate engines (a `Runner` or an `Embedder`, each with its own context
and thread), so a model can serve both at once. Embedding-only models (BERT and kin) never get a Runner.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

from ..config import Settings
from ..engine.embedder import Embedder, EmbedderConfig
from ..engine.model import LlamaModel, ModelLoadError
from ..engine.runner import Runner, RunnerConfig
from ..store.gguf_import import gguf_metadata
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
from .errors import EngineFailure, InvalidRequest, ModelNotFound, ServerBusy
from .templates import ChatTemplate, TemplateRenderError

log = logging.getLogger("corral.service")

# Architectures llama.cpp runs as encoders: they embed, they do not complete.
EMBEDDING_ARCHITECTURES = frozenset({"bert", "nomic-bert", "nomic-bert-moe", "jina-bert-v2", "jina-bert-v3",
                                     "t5encoder", "modern-bert", "neo-bert"})
# A model just handed to a request is not unloaded for at least this long, even with keep_alive 0, so that
# it cannot vanish while the request builds its prompt.
GRACE_SECONDS = 5.0
# Inputs evaluated together in one embedding batch (they also share its n_ctx tokens).
EMBED_SEQUENCES_PER_BATCH = 64


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
    keep_alive: float | None = None  # seconds it stays loaded when idle; None: the server's default
    expiry: asyncio.TimerHandle | None = None
    expires_at: float | None = None  # wall-clock time of the planned unload; None: never
    last_used: float = 0.0
    on_done: Callable[[LoadedModel], None] | None = None  # a request's job has ended

    @property
    def busy(self) -> bool:
        return self.runner.busy > 0

    def memory_bytes(self) -> int:
        return self.model.memory_bytes(self.n_ctx * self.runner.config.n_parallel)

    def close(self) -> None:
        if self.expiry is not None:
            self.expiry.cancel()
        self.runner.close()
        self.model.close()


@dataclass(eq=False)
class LoadedEmbedder:
    entry: Entry
    model: LlamaModel
    embedder: Embedder
    n_ctx: int  # the most tokens one input may have
    tail: int | None  # a special token the tokenizer appends (BERT's [SEP]); truncation keeps it last
    users: int = 0  # requests holding it now; it is unloaded only when none do
    keep_alive: float | None = None  # seconds it stays loaded when idle; None or negative: until shutdown
    expiry: asyncio.TimerHandle | None = None
    expires_at: float | None = None
    last_used: float = 0.0

    @property
    def busy(self) -> bool:
        return self.users > 0

    def memory_bytes(self) -> int:
        return self.model.memory_bytes(self.n_ctx)

    def close(self) -> None:
        if self.expiry is not None:
            self.expiry.cancel()
        self.embedder.close()
        self.model.close()


# A loaded engine of either kind; the scheduler treats both alike.
Engine = LoadedModel | LoadedEmbedder


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
        self._retiring: list[Engine] = []  # replaced by a larger-context engine; closed once idle
        self._embedders: dict[str, LoadedEmbedder] = {}  # by manifest digest, as for generation
        self._architectures: dict[str, str] = {}
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

    def architecture(self, entry: Entry) -> str:
        """`general.architecture` of the model's weights, from its config blob (the GGUF when it lacks it)."""
        arch = self._architectures.get(entry.digest)
        if arch is None:
            try:
                arch = json.loads(self.store.read_blob(entry.manifest.config.digest)).get("model_family") or ""
            except (OSError, ValueError):
                arch = ""
            model_layer = entry.manifest.layer(MODEL_MEDIA_TYPE)
            if not arch and model_layer is not None:
                try:
                    arch = str(gguf_metadata(self.store.blob_path(model_layer.digest)).get("general.architecture", ""))
                except Exception:  # unreadable weights fail later, at load, with their own message
                    arch = ""
            self._architectures[entry.digest] = arch
        return arch

    def embedding_only(self, entry: Entry) -> bool:
        return self.architecture(entry) in EMBEDDING_ARCHITECTURES

    async def get(self, raw_name: str, num_ctx: int | None = None) -> LoadedModel:
        entry = self.resolve(raw_name)
        if self.embedding_only(entry):
            raise InvalidRequest(
                f"model '{raw_name}' does not support chat or completions: it is an embedding model "
                "(use /v1/embeddings or /api/embed)",
                param="model",
            )
        self._check_queue()
        loaded = await self._ensure(self._loaded, entry, num_ctx, self._load)
        loaded.last_used = time.monotonic()
        self._arm(loaded, grace=True)
        return loaded

    async def _ensure(self, table: dict[str, Any], entry: Entry, num_ctx: int | None,
                      load: Callable[[Entry, int | None], Any]) -> Any:
        """The entry's engine from `table`, loaded (after making room) when missing, and replaced by a larger
        one when `num_ctx` asks for more context than it has (the old one closes once idle)."""
        engine = table.get(entry.digest)
        if engine is not None and (num_ctx is None or num_ctx <= engine.n_ctx):
            return engine
        async with self._lock:
            self._reap()
            engine = table.get(entry.digest)
            if engine is None or (num_ctx is not None and num_ctx > engine.n_ctx):
                if engine is None:
                    await self._make_room()
                fresh = await asyncio.to_thread(load, entry, num_ctx)
                if engine is not None:
                    self._retire(engine)
                table[entry.digest] = engine = fresh
        return engine

    def _open(self, entry: Entry) -> tuple[LlamaModel, dict[str, Any]]:
        """The entry's weights, loaded, and its PARAMETERs."""
        model_layer = entry.manifest.layer(MODEL_MEDIA_TYPE)
        if model_layer is None:
            raise EngineFailure(f"model '{entry.name}' has no weights layer")
        params = self._json_layer(entry, PARAMS_MEDIA_TYPE) or {}
        try:
            model = LlamaModel(self.store.blob_path(model_layer.digest), use_mmap=params.get("use_mmap", True))
        except ModelLoadError as exc:
            raise EngineFailure(f"model '{entry.name}' could not be loaded: {exc}") from None
        return model, params

    def _load(self, entry: Entry, num_ctx: int | None) -> LoadedModel:
        manifest = entry.manifest
        model, params = self._open(entry)
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
            projector = manifest.layer(PROJECTOR_MEDIA_TYPE)  # vision: loaded beside the model, on its thread
            runner = Runner(model, config, adapters,
                            projector=self.store.blob_path(projector.digest) if projector else None)
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
            on_done=self._request_done,
        )

    # -- embeddings ------------------------------------------------------------------------------------
    @asynccontextmanager
    async def embedder(self, raw_name: str, num_ctx: int | None = None,
                       keep_alive: float | None = None) -> AsyncIterator[LoadedEmbedder]:
        """The model's embedding engine, held for one request. `keep_alive` (seconds) then says how long it
        stays loaded when idle: None leaves it as it is (the server's keep-alive, unless an earlier request
        set one), a negative value keeps it until the server stops, 0 unloads it at once."""
        entry = self.resolve(raw_name)
        loaded: LoadedEmbedder = await self._ensure(self._embedders, entry, num_ctx, self._load_embedder)
        loaded.users += 1
        self._arm(loaded, grace=True)
        try:
            yield loaded
        finally:
            loaded.users -= 1
            loaded.last_used = time.monotonic()
            if keep_alive is not None:
                loaded.keep_alive = keep_alive
            self._arm(loaded)

    def _load_embedder(self, entry: Entry, num_ctx: int | None) -> LoadedEmbedder:
        model, params = self._open(entry)
        try:
            if num_ctx is not None and num_ctx > model.n_ctx_train:
                raise InvalidRequest(
                    f"num_ctx {num_ctx} is larger than the context model '{entry.name}' was trained with "
                    f"({model.n_ctx_train})",
                    param="num_ctx",
                )
            limit = num_ctx or min(int(params.get("num_ctx") or 0) or self.settings.context_length,
                                   model.n_ctx_train)
            config = EmbedderConfig(
                n_ctx=limit,
                n_seq_max=EMBED_SEQUENCES_PER_BATCH,
                n_threads=int(params.get("num_thread") or self.settings.num_threads),
            )
            embedder = Embedder(model, config)
        except InvalidRequest:
            model.close()
            raise
        except Exception as exc:
            model.close()
            raise EngineFailure(f"model '{entry.name}' could not start embeddings: {exc}") from None
        if embedder.pooling == "rank":
            embedder.close()
            model.close()
            raise InvalidRequest(f"model '{entry.name}' is a reranker: its pooling gives scores, not embeddings",
                                 param="model")
        with_special = model.tokenize("a", add_special=True, parse_special=False)
        plain = model.tokenize("a", add_special=False, parse_special=False)
        tail = with_special[-1] if len(with_special) > len(plain) and with_special[-len(plain):] != plain else None
        log.info("loaded %s for embeddings (%d tokens per input, %s pooling)", entry.name, limit, embedder.pooling)
        return LoadedEmbedder(entry=entry, model=model, embedder=embedder, n_ctx=limit, tail=tail)

    def _json_layer(self, entry: Entry, media_type: str) -> Any:
        layer = entry.manifest.layer(media_type)
        return json.loads(self.store.read_blob(layer.digest)) if layer else None

    # -- scheduling ------------------------------------------------------------------------------------
    def _check_queue(self) -> None:
        waiting = sum(m.runner.queued for m in self._loaded.values())
        if waiting >= self.settings.max_queue:
            raise ServerBusy()

    def keep_alive(self, loaded: LoadedModel, seconds: float | None) -> None:
        """A request's `keep_alive`: from now on the model's idle time before unloading (None: unchanged)."""
        if seconds is not None:
            loaded.keep_alive = seconds
            self._arm(loaded, grace=True)

    def _request_done(self, loaded: LoadedModel) -> None:
        loaded.last_used = time.monotonic()
        self._arm(loaded)

    def _arm(self, engine: Engine, grace: bool = False) -> None:
        """(Re)starts the engine's idle timer; `grace` keeps it for a request that is about to use it."""
        if engine.expiry is not None:
            engine.expiry.cancel()
            engine.expiry = None
        seconds = engine.keep_alive if engine.keep_alive is not None else self.settings.keep_alive
        if seconds < 0:
            engine.expires_at = None
            return
        delay = max(seconds, GRACE_SECONDS) if grace else seconds
        engine.expires_at = time.time() + delay
        loop = asyncio.get_running_loop()
        engine.expiry = loop.call_later(delay, lambda: loop.create_task(self._expire(engine)))

    def _table(self, engine: Engine) -> dict[str, Any]:
        return self._loaded if isinstance(engine, LoadedModel) else self._embedders

    async def _expire(self, engine: Engine) -> None:
        async with self._lock:
            table = self._table(engine)
            if table.get(engine.entry.digest) is not engine:
                return
            if engine.busy:  # its requests re-arm the timer as they end; this is a fallback
                self._arm(engine, grace=True)
                return
            del table[engine.entry.digest]
        log.info("unloaded %s (idle past its keep-alive)", engine.entry.name)
        await asyncio.to_thread(engine.close)

    def _retire(self, engine: Engine) -> None:
        if engine.expiry is not None:
            engine.expiry.cancel()
            engine.expiry = None
        self._retiring.append(engine)

    async def _make_room(self) -> None:
        """Called under the lock before a load: unloads the least recently used idle engine while as many
        as CORRAL_MAX_LOADED_MODELS are loaded, waiting for one to become idle when all are busy."""
        while len(self._loaded) + len(self._embedders) >= self.settings.max_loaded_models:
            idle = [m for m in (*self._loaded.values(), *self._embedders.values()) if not m.busy]
            if not idle:
                await asyncio.sleep(0.05)
                self._reap()
                continue
            victim = min(idle, key=lambda m: m.last_used)
            del self._table(victim)[victim.entry.digest]
            log.info("unloaded %s to make room (CORRAL_MAX_LOADED_MODELS=%d)", victim.entry.name,
                     self.settings.max_loaded_models)
            await asyncio.to_thread(victim.close)

    async def unload(self, raw_name: str) -> None:
        """Unloads the model's engines now, or, while they serve requests, as soon as those end."""
        entry = self.resolve(raw_name)
        async with self._lock:
            for table in (self._loaded, self._embedders):
                engine = table.get(entry.digest)
                if engine is None:
                    continue
                engine.keep_alive = 0
                if engine.busy:
                    self._arm(engine)
                else:
                    del table[entry.digest]
                    await asyncio.to_thread(engine.close)

    def running(self) -> list[tuple[Engine, float | None]]:
        """Loaded engines and when each will unload (None: never), the soonest last."""
        items = [(m, m.expires_at) for m in (*self._loaded.values(), *self._embedders.values())]
        return sorted(items, key=lambda pair: -(pair[1] if pair[1] is not None else float("inf")))

    def _reap(self) -> None:
        for old in [m for m in self._retiring if not m.busy]:
            self._retiring.remove(old)
            old.close()

    async def close(self) -> None:
        async with self._lock:
            for engine in [*self._loaded.values(), *self._retiring, *self._embedders.values()]:
                await asyncio.to_thread(engine.close)
            self._loaded.clear()
            self._retiring.clear()
            self._embedders.clear()
