"""Embeddings: requests to token lists, token lists to the model's embedding engine, vectors to responses.

One core (`embed`) serves OpenAI's /v1/embeddings and Ollama's /api/embed and /api/embeddings. Vectors
are L2-normalised (the legacy route excepted, as in Ollama); `dimensions` keeps the first N values and
normalises again. Inputs longer than the model's context are a 400 unless the request asks for
truncation (`/api/embed` does by default, as Ollama does); nothing is cut silently.
"""

from __future__ import annotations

import asyncio
import base64
import time
from dataclasses import dataclass

import numpy as np

from ..engine.embedder import EmbedError, EmbedJob
from ..protocol.native import EmbedRequest, EmbedResponse, LegacyEmbeddingRequest, LegacyEmbeddingResponse
from ..protocol.openai import Embedding, EmbeddingList, EmbeddingRequest, EmbeddingUsage
from ..store.modelfile import ModelfileError, coerce_parameter
from .errors import EngineFailure, InvalidRequest
from .keep_alive import parse_keep_alive
from .models import LoadedEmbedder, ModelManager

# Inputs whose text adds up to more than this are tokenized off the event loop.
_TOKENIZE_INLINE_CHARS = 65536


@dataclass
class Embedded:
    vectors: list[np.ndarray]  # float32, one per input, in input order
    prompt_tokens: int
    load_duration: float  # seconds spent getting the model ready (loading, or waiting for the lock)
    total_duration: float


def _tokens(item: str | list[int], where: str, loaded: LoadedEmbedder, truncate: bool, model_name: str,
            param: str) -> list[int]:
    model = loaded.model
    if isinstance(item, str):
        if not item:
            raise InvalidRequest(f"{where} is an empty string; there is nothing to embed", param=param)
        tokens = model.tokenize(item, add_special=True, parse_special=False)
    else:
        if not item:
            raise InvalidRequest(f"{where} is an empty token list; there is nothing to embed", param=param)
        bad = next((t for t in item if not 0 <= t < model.n_vocab), None)
        if bad is not None:
            raise InvalidRequest(f"{where} holds token {bad}, outside the vocabulary (0..{model.n_vocab - 1})",
                                 param=param)
        tokens = list(item)
    limit = loaded.n_ctx
    if len(tokens) <= limit:
        return tokens
    if truncate:  # keep a trailing [SEP] (or the like) last: the model was trained with it there
        keep_tail = loaded.tail is not None and tokens[-1] == loaded.tail
        return tokens[: limit - 1] + [tokens[-1]] if keep_tail else tokens[:limit]
    raise InvalidRequest(
        f"{where} has {len(tokens)} tokens, more than the {limit} tokens model '{model_name}' embeds at once "
        "(its context length); shorten it, or split it into several inputs",
        param=param,
        code="context_length_exceeded",
    )


def _finish(vector: np.ndarray, normalize: bool, dimensions: int | None) -> np.ndarray:
    if not np.all(np.isfinite(vector)):
        raise EngineFailure("the model produced an embedding with NaN or infinite values")
    if dimensions is not None:
        vector = vector[:dimensions]
    if normalize or dimensions is not None:
        norm = float(np.linalg.norm(vector))
        if norm > 0:
            vector = vector / norm
    return vector.astype(np.float32, copy=False)


async def embed(manager: ModelManager, model_name: str, inputs: list[str] | list[list[int]], *,
                truncate: bool, normalize: bool = True, dimensions: int | None = None,
                num_ctx: int | None = None, keep_alive: float | None = None, param: str = "input") -> Embedded:
    """Embeds every input in one engine job: the engine packs them into as few batches as fit."""
    start = time.perf_counter()
    async with manager.embedder(model_name, num_ctx, keep_alive) as loaded:
        ready = time.perf_counter()
        n_embd = loaded.embedder.n_embd
        if dimensions is not None and dimensions > n_embd:
            raise InvalidRequest(f"dimensions {dimensions} is larger than model '{model_name}''s embedding size "
                                 f"({n_embd})", param="dimensions")
        single = len(inputs) == 1

        def tokenize_all() -> list[list[int]]:
            return [_tokens(item, param if single else f"{param}[{i}]", loaded, truncate, model_name, param)
                    for i, item in enumerate(inputs)]

        size = sum(len(item) for item in inputs if isinstance(item, str))
        token_lists = await asyncio.to_thread(tokenize_all) if size > _TOKENIZE_INLINE_CHARS else tokenize_all()
        raw: list[np.ndarray] = []
        if token_lists:
            job = EmbedJob(token_lists)
            job.bind()
            loaded.embedder.submit(job)
            try:
                raw = await job.wait()
            except EmbedError as exc:
                raise EngineFailure(str(exc)) from None
    vectors = [_finish(v, normalize, dimensions) for v in raw]
    return Embedded(vectors, sum(len(t) for t in token_lists), ready - start, time.perf_counter() - start)


def float_list(vector: np.ndarray) -> list[float]:
    """float32 values as the shortest decimals that read back as the same float32 (9 significant digits),
    so JSON carries about half the characters of float64's repr and parses back exactly."""
    values = vector.astype(np.float64)
    magnitude = np.abs(values)
    digits = 8 - np.floor(np.log10(np.where(magnitude > 0, magnitude, 1.0)))
    scale = 10.0 ** np.clip(digits, 0, 22)  # powers of ten up to 1e22 are exact doubles: k / 10**p rounds once
    return np.where(digits > 22, values, np.round(values * scale) / scale).tolist()  # tiny values stay as they are


# -- OpenAI: /v1/embeddings ------------------------------------------------------------------------------
def _openai_inputs(value: str | list[str] | list[int] | list[list[int]]) -> list[str] | list[list[int]]:
    if isinstance(value, str):
        return [value]
    if not value:
        raise InvalidRequest("input is empty: give a string, a list of strings, a list of token ids, or a list "
                             "of token-id lists", param="input")
    if isinstance(value[0], int):
        return [value]  # type: ignore[list-item]
    return value  # type: ignore[return-value]


async def create_embeddings(manager: ModelManager, request: EmbeddingRequest) -> EmbeddingList:
    result = await embed(manager, request.model, _openai_inputs(request.input), truncate=False,
                         dimensions=request.dimensions)
    if request.encoding_format == "base64":
        data = [Embedding(index=i, embedding=base64.b64encode(v.astype("<f4").tobytes()).decode("ascii"))
                for i, v in enumerate(result.vectors)]
    else:
        data = [Embedding(index=i, embedding=float_list(v)) for i, v in enumerate(result.vectors)]
    usage = EmbeddingUsage(prompt_tokens=result.prompt_tokens, total_tokens=result.prompt_tokens)
    return EmbeddingList(data=data, model=request.model, usage=usage)


# -- Ollama: /api/embed and /api/embeddings --------------------------------------------------------------
def _num_ctx(options: dict | None) -> int | None:
    """Of Ollama's options only num_ctx changes an embedding; any other is refused rather than ignored."""
    values = {k: v for k, v in (options or {}).items() if v is not None}
    other = sorted(set(values) - {"num_ctx"})
    if other:
        raise InvalidRequest(f"option '{other[0]}' has no effect on embeddings (only num_ctx does); remove it",
                             param=f"options.{other[0]}")
    if "num_ctx" not in values:
        return None
    try:
        return int(coerce_parameter("num_ctx", values["num_ctx"]))  # type: ignore[arg-type]
    except ModelfileError as exc:
        raise InvalidRequest(str(exc), param="options.num_ctx") from None


def _nanoseconds(seconds: float) -> int:
    return int(seconds * 1e9)


async def embed_native(manager: ModelManager, request: EmbedRequest) -> EmbedResponse:
    """An absent or empty input loads the model and answers no embeddings, as Ollama does (a preload)."""
    if isinstance(request.input, str):
        inputs = [request.input] if request.input else []
    else:
        inputs = list(request.input or [])
    result = await embed(manager, request.model, inputs, truncate=request.truncate is not False,
                         dimensions=request.dimensions, num_ctx=_num_ctx(request.options),
                         keep_alive=parse_keep_alive(request.keep_alive))
    return EmbedResponse(model=request.model, embeddings=[float_list(v) for v in result.vectors],
                         total_duration=_nanoseconds(result.total_duration),
                         load_duration=_nanoseconds(result.load_duration),
                         prompt_eval_count=result.prompt_tokens)


async def embed_legacy(manager: ModelManager, request: LegacyEmbeddingRequest) -> LegacyEmbeddingResponse:
    """Ollama's deprecated route: one prompt, a vector that is not normalised; an empty prompt gives []."""
    result = await embed(manager, request.model, [request.prompt] if request.prompt else [], truncate=False,
                         normalize=False, num_ctx=_num_ctx(request.options),
                         keep_alive=parse_keep_alive(request.keep_alive), param="prompt")
    return LegacyEmbeddingResponse(embedding=float_list(result.vectors[0]) if result.vectors else [])
