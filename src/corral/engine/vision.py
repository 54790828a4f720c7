"""Images through llama.cpp's multimodal library (libmtmd), on its low-level ctypes bindings.

A `VisionContext` wraps one `mtmd_context` (a projector GGUF bound to a loaded language model). It turns a
prompt whose text holds a media marker per image into `MediaPrompt`: the text's tokens with one placeholder
id per image position, and a `MediaSpan` for each image telling the runner where its embeddings go.

Threads: the context is created and images are encoded (ggml compute) on the runner's decode thread only;
llama.cpp's OpenMP workers run ~30% slower in a process where a second thread has run ggml compute. Decoding
image files and `mtmd_tokenize` (resizing and normalising pixels, no ggml) are thread-safe per mtmd's header
and run on the service's worker threads, so a bad image is refused before a job exists.
"""

from __future__ import annotations

import collections
import ctypes
import hashlib
import logging
import secrets
import threading
from dataclasses import dataclass
from pathlib import Path

import llama_cpp.llama_cpp as ll
import llama_cpp.mtmd_cpp as mt
import numpy as np

from .model import LlamaModel

log = logging.getLogger("corral.engine.vision")

_GGML_LOG_WARN, _GGML_LOG_ERROR, _GGML_LOG_CONT = 3, 4, 5
_recent_errors: collections.deque[str] = collections.deque(maxlen=8)
_last_level = 0


@ll.llama_log_callback
def _mtmd_log(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
    """libmtmd logs every load and encode in detail to stderr; corral keeps warnings and errors, and remembers
    the last errors so a failure can say why."""
    global _last_level
    if level == _GGML_LOG_CONT:
        level = _last_level
    _last_level = level
    if level >= _GGML_LOG_WARN:
        line = text.decode("utf-8", errors="replace").strip()
        if line:
            if level == _GGML_LOG_ERROR:
                _recent_errors.append(line)
            log.log(logging.ERROR if level == _GGML_LOG_ERROR else logging.WARNING, "mtmd: %s", line)


_log_lock = threading.Lock()
_log_ready = False


def _quiet_mtmd() -> None:
    global _log_ready
    with _log_lock:
        if not _log_ready:
            mt.mtmd_helper_log_set(_mtmd_log, ctypes.c_void_p(0))  # also sets mtmd's own logger
            _log_ready = True


def _why(default: str) -> str:
    reason = _recent_errors[-1] if _recent_errors else default
    _recent_errors.clear()
    return reason


class VisionError(RuntimeError):
    """The projector could not load, an image could not be read, or an encode failed; the message says which."""


def placeholder_id(key: str) -> int:
    """A negative stand-in for every position of one image slice in a token list: no vocabulary id is negative,
    equal images get equal ids (so prompt-prefix reuse spans them) and different ones differ."""
    return -1 - int(hashlib.sha256(key.encode()).hexdigest()[:15], 16)


class MediaChunk:
    """An image chunk owned by corral (a copy of what `mtmd_tokenize` produced), freed with the job using it."""

    def __init__(self, ptr: int) -> None:
        self.ptr = ptr

    def __del__(self) -> None:
        ptr, self.ptr = self.ptr, None
        if ptr:
            try:
                mt.mtmd_input_chunk_free(ptr)
            except Exception:  # interpreter shutdown: the process is going away anyway
                pass


@dataclass(frozen=True, eq=False)
class MediaSpan:
    """One image slice of a prompt: `n_tokens` embeddings that stand at `prompt[start:start + n_tokens]`.

    `n_pos` is how many positions the slice advances the sequence (fewer than its tokens under M-RoPE); `key`
    names its content (the image's sha256 and the slice number), for the embedding cache.
    """

    start: int
    n_tokens: int
    n_pos: int
    key: str
    chunk: MediaChunk

    @property
    def end(self) -> int:
        return self.start + self.n_tokens


@dataclass(frozen=True)
class MediaPrompt:
    """What a job needs for a prompt with images: token ids (placeholders where images go) and the images."""

    tokens: list[int]
    media: tuple[MediaSpan, ...]

    @property
    def image_tokens(self) -> int:
        return sum(span.n_tokens for span in self.media)


class Bitmap:
    """A decoded image (RGB pixels) ready for `tokenize`; free it once the prompt is tokenized."""

    def __init__(self, ptr: int, sha256: str) -> None:
        self.ptr = ptr
        self.sha256 = sha256

    @property
    def size(self) -> tuple[int, int]:
        return mt.mtmd_bitmap_get_nx(self.ptr), mt.mtmd_bitmap_get_ny(self.ptr)

    def free(self) -> None:
        if self.ptr:
            mt.mtmd_bitmap_free(self.ptr)
            self.ptr = None

    def __del__(self) -> None:
        try:
            self.free()
        except Exception:
            pass


class VisionContext:
    """One projector bound to one loaded model. Create, encode and close on the runner thread; `decode`,
    `from_rgb` and `tokenize` may be called from any thread."""

    def __init__(self, projector: Path, model: LlamaModel, n_threads: int) -> None:
        _quiet_mtmd()
        params = mt.mtmd_context_params_default()
        params.use_gpu = False  # corral runs the language model on the CPU too
        params.print_timings = False
        params.n_threads = n_threads
        params.warmup = True
        # A marker no user can type: text that happens to contain llama.cpp's default `<__media__>` must stay
        # text, not claim an image slot.
        self._marker = f"<__corral_media_{secrets.token_hex(8)}__>".encode()
        params.media_marker = self._marker
        ctx = mt.mtmd_init_from_file(str(projector).encode(), model.handle, params)
        if not ctx:
            raise VisionError(f"llama.cpp could not load the vision projector {projector.name}: "
                              f"{_why('unsupported or damaged projector file')}")
        self.ctx = ctx
        if not mt.mtmd_support_vision(ctx):
            mt.mtmd_free(ctx)
            self.ctx = None
            raise VisionError(f"the projector {projector.name} has no vision encoder (audio-only projectors are "
                              "not served)")
        self.model = model
        self._users = 0  # calls from other threads in progress; `close` waits for them
        self._idle = threading.Condition()
        self.n_embd: int = ll.llama_model_n_embd_inp(model.handle)
        self.mrope: bool = bool(mt.mtmd_decode_use_mrope(ctx))
        self.non_causal: bool = bool(mt.mtmd_decode_use_non_causal(ctx, None))

    @property
    def marker(self) -> str:
        """Put this in the prompt text once per image, where the image goes."""
        return self._marker.decode()

    # -- any thread --------------------------------------------------------------------------------------
    def _enter(self) -> None:
        with self._idle:
            if not self.ctx:
                raise VisionError("the model was unloaded")
            self._users += 1

    def _leave(self) -> None:
        with self._idle:
            self._users -= 1
            self._idle.notify_all()

    def decode(self, data: bytes) -> Bitmap:
        """An encoded image (PNG, JPEG, GIF, BMP: what llama.cpp's stb_image reads) to RGB pixels."""
        buf = (ctypes.c_uint8 * len(data)).from_buffer_copy(data)
        self._enter()
        try:
            wrapped = mt.mtmd_helper_bitmap_init_from_buf_wrapper(self.ctx, buf, len(data), False,
                                                                  mt.mtmd_helper_init_opt_default())
        finally:
            self._leave()
        if wrapped.video_ctx:  # stb_image could not read it and mtmd went for video decoding: not an image
            if wrapped.bitmap:
                mt.mtmd_bitmap_free(wrapped.bitmap)
            mt.mtmd_helper_video_free(wrapped.video_ctx)
            raise VisionError("the image could not be decoded")
        if not wrapped.bitmap:
            raise VisionError(f"the image could not be decoded ({_why('unreadable image data')})")
        return Bitmap(wrapped.bitmap, hashlib.sha256(data).hexdigest())

    @staticmethod
    def from_rgb(width: int, height: int, rgb: bytes, sha256: str) -> Bitmap:
        """Pixels decoded elsewhere (formats stb_image lacks, such as WebP); `sha256` names the source bytes."""
        if len(rgb) != width * height * 3:
            raise VisionError(f"expected {width}x{height} RGB pixels, got {len(rgb)} bytes")
        buf = (ctypes.c_uint8 * len(rgb)).from_buffer_copy(rgb)
        ptr = mt.mtmd_bitmap_init(width, height, buf)
        if not ptr:
            raise VisionError("libmtmd could not take the image")
        return Bitmap(ptr, sha256)

    def tokenize(self, text: str, bitmaps: list[Bitmap], add_special: bool) -> MediaPrompt:
        """`text` with one marker per bitmap, in order, to tokens and image spans.

        Each bitmap's slices (some projectors cut an image into tiles) are keyed by its content hash and the
        slice number, so the same image bytes always give the same keys and placeholder ids.
        """
        if text.count(self.marker) != len(bitmaps):
            raise VisionError(f"the prompt has {text.count(self.marker)} image markers for {len(bitmaps)} images")
        for i, bitmap in enumerate(bitmaps):
            mt.mtmd_bitmap_set_id(bitmap.ptr, f"{bitmap.sha256}#{i}".encode())
        self._enter()
        chunks = mt.mtmd_input_chunks_init()
        try:
            data = text.encode("utf-8")
            inp = mt.mtmd_input_text(data, len(data), add_special, True)
            array = (mt.mtmd_bitmap_p_ctypes * max(1, len(bitmaps)))(*[b.ptr for b in bitmaps])
            rc = mt.mtmd_tokenize(self.ctx, chunks, ctypes.byref(inp), array, len(bitmaps))
            if rc != 0:
                raise VisionError(f"libmtmd could not prepare the images ({_why(f'error {rc}')})")
            tokens: list[int] = []
            spans: list[MediaSpan] = []
            slices: dict[str, int] = {}
            for i in range(mt.mtmd_input_chunks_size(chunks)):
                chunk = mt.mtmd_input_chunks_get(chunks, i)
                kind = mt.mtmd_input_chunk_get_type(chunk)
                if kind == mt.MTMD_INPUT_CHUNK_TYPE_TEXT:
                    n = ctypes.c_size_t()
                    ids = mt.mtmd_input_chunk_get_tokens_text(chunk, ctypes.byref(n))
                    tokens.extend(ids[: n.value])
                    continue
                if kind != mt.MTMD_INPUT_CHUNK_TYPE_IMAGE:
                    raise VisionError("libmtmd produced a non-image media chunk")
                owner = (mt.mtmd_input_chunk_get_id(chunk) or b"").decode()
                sha = owner.partition("#")[0]
                k = slices.get(owner, 0)
                slices[owner] = k + 1
                key = f"{sha}:{k}"
                n_tokens = mt.mtmd_input_chunk_get_n_tokens(chunk)
                copy = mt.mtmd_input_chunk_copy(chunk)
                if not copy:
                    raise VisionError("libmtmd could not copy an image chunk")
                spans.append(MediaSpan(start=len(tokens), n_tokens=n_tokens,
                                       n_pos=mt.mtmd_input_chunk_get_n_pos(chunk), key=key,
                                       chunk=MediaChunk(copy)))
                tokens.extend([placeholder_id(key)] * n_tokens)
            return MediaPrompt(tokens, tuple(spans))
        finally:
            mt.mtmd_input_chunks_free(chunks)
            self._leave()

    # -- runner thread -----------------------------------------------------------------------------------
    def encode(self, span: MediaSpan) -> np.ndarray:
        """The slice's embeddings, (n_tokens, n_embd) float32: the vision encoder and projector run here."""
        rc = mt.mtmd_encode_chunk(self.ctx, span.chunk.ptr)
        if rc != 0:
            raise VisionError(f"the vision encoder failed on the image ({_why(f'error {rc}')})")
        out = mt.mtmd_get_output_embd(self.ctx)
        return np.ctypeslib.as_array(out, shape=(span.n_tokens, self.n_embd)).copy()

    def positions(self, span: MediaSpan, pos_0: int) -> np.ndarray:
        """M-RoPE positions of the slice's tokens when it starts at `pos_0`: rows t, y, x, z (llama.cpp's
        section order for embeddings), one column per token."""
        image = mt.mtmd_input_chunk_get_tokens_image(span.chunk.ptr)
        out = (mt.mtmd_decoder_pos * span.n_tokens)()
        mt.mtmd_helper_image_get_decoder_pos(image, pos_0, out)
        raw = np.ctypeslib.as_array(ctypes.cast(out, ctypes.POINTER(ctypes.c_uint32)), shape=(span.n_tokens, 4))
        return raw[:, [0, 2, 1, 3]].T.astype(np.int32)  # fields are (t, x, y, z)

    def close(self) -> None:
        with self._idle:
            while self._users:
                self._idle.wait()
            ctx, self.ctx = self.ctx, None
        if ctx:
            mt.mtmd_free(ctx)


class EmbeddingCache:
    """Recently encoded image slices by content key, least recently used first out, within a byte budget."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._items: collections.OrderedDict[str, np.ndarray] = collections.OrderedDict()
        self._bytes = 0

    def get(self, key: str) -> np.ndarray | None:
        value = self._items.get(key)
        if value is not None:
            self._items.move_to_end(key)
        return value

    def put(self, key: str, value: np.ndarray) -> None:
        if key in self._items or value.nbytes > self.max_bytes:
            return
        self._items[key] = value
        self._bytes += value.nbytes
        while self._bytes > self.max_bytes:
            _, old = self._items.popitem(last=False)
            self._bytes -= old.nbytes

    def __len__(self) -> int:
        return len(self._items)
