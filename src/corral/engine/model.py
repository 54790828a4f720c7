"""A loaded GGUF model and its vocabulary, on llama.cpp's low-level C API."""

from __future__ import annotations

import ctypes
import threading
from pathlib import Path

import llama_cpp.llama_cpp as ll

from ..store.gguf_check import GGUFError, check_gguf

_backend_lock = threading.Lock()
_backend_ready = False
_LOG_ERROR = 4  # GGML_LOG_LEVEL_ERROR
_load_errors = threading.local()  # llama.cpp's error lines during a load on this thread, to say why it failed


@ll.llama_log_callback
def _quiet_log(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
    """llama.cpp logs every load in detail to stderr; corral keeps its own log instead."""
    lines = getattr(_load_errors, "lines", None)
    if lines is not None and level == _LOG_ERROR:
        lines.append(text.decode("utf-8", errors="replace").strip())


def init_backend() -> None:
    global _backend_ready
    with _backend_lock:
        if not _backend_ready:
            ll.llama_log_set(_quiet_log, ctypes.c_void_p(0))
            ll.llama_backend_init()
            _backend_ready = True


class ModelLoadError(RuntimeError):
    """The weights could not be loaded; the message names the file."""


class LlamaModel:
    """Owns a `llama_model`; tokenizes and detokenizes. Thread-safe for reads (llama.cpp's vocab is)."""

    def __init__(self, path: Path, use_mmap: bool = True) -> None:
        init_backend()
        self.path = Path(path)
        params = ll.llama_model_default_params()
        params.n_gpu_layers = 0
        params.use_mmap = use_mmap
        try:  # some damage makes llama.cpp abort the process rather than fail the load: refuse it first
            check_gguf(self.path)
        except (GGUFError, OSError) as exc:
            raise ModelLoadError(f"{self.path.name}: {exc}") from None
        _load_errors.lines = []
        try:
            handle = ll.llama_model_load_from_file(str(self.path).encode(), params)
        finally:
            errors, _load_errors.lines = _load_errors.lines, None
        if not handle:
            reason = f": {errors[0]}" if errors else ""  # the first is the cause; the rest say the load failed
            raise ModelLoadError(f"llama.cpp could not load {self.path.name}{reason}")
        self.handle = handle
        self.vocab = ll.llama_model_get_vocab(handle)
        self.n_vocab: int = ll.llama_vocab_n_tokens(self.vocab)
        self.n_ctx_train: int = ll.llama_model_n_ctx_train(handle)
        self.add_bos: bool = bool(ll.llama_vocab_get_add_bos(self.vocab))
        self.bos: int = ll.llama_vocab_bos(self.vocab)
        self.eos: int = ll.llama_vocab_eos(self.vocab)
        self.fim: tuple[int, int, int] = (
            ll.llama_vocab_fim_pre(self.vocab),
            ll.llama_vocab_fim_suf(self.vocab),
            ll.llama_vocab_fim_mid(self.vocab),
        )
        self._piece_cache: dict[int, bytes] = {}

    # -- metadata ------------------------------------------------------------------
    def meta(self, key: str) -> str | None:
        buf = ctypes.create_string_buffer(1 << 16)
        n = ll.llama_model_meta_val_str(self.handle, key.encode(), buf, len(buf))
        if n < 0:
            return None
        if n >= len(buf):
            buf = ctypes.create_string_buffer(n + 1)
            ll.llama_model_meta_val_str(self.handle, key.encode(), buf, len(buf))
        return buf.value.decode("utf-8", errors="replace")

    def chat_template(self) -> str | None:
        raw = ll.llama_model_chat_template(self.handle, None)
        return raw.decode("utf-8", errors="replace") if raw else None

    @property
    def has_fim(self) -> bool:
        return all(t >= 0 for t in self.fim)

    # -- text <-> tokens -------------------------------------------------------------
    def tokenize(self, text: str, add_special: bool, parse_special: bool) -> list[int]:
        data = text.encode("utf-8")
        capacity = len(data) + 8
        buf = (ll.llama_token * capacity)()
        n = ll.llama_tokenize(self.vocab, data, len(data), buf, capacity, add_special, parse_special)
        if n < 0:
            capacity = -n
            buf = (ll.llama_token * capacity)()
            n = ll.llama_tokenize(self.vocab, data, len(data), buf, capacity, add_special, parse_special)
        return list(buf[:n])

    def token_bytes(self, token: int) -> bytes:
        """The bytes a token stands for (special tokens render as nothing), cached per token."""
        cached = self._piece_cache.get(token)
        if cached is not None:
            return cached
        buf = ctypes.create_string_buffer(64)
        n = ll.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, False)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = ll.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, False)
        piece = buf.raw[:n]
        self._piece_cache[token] = piece
        return piece

    def memory_bytes(self, context_tokens: int) -> int:
        """The weights' size plus an f16 KV cache holding `context_tokens` tokens, for `ps`."""
        heads = max(ll.llama_model_n_head(self.handle), 1)
        kv_width = ll.llama_model_n_embd(self.handle) * ll.llama_model_n_head_kv(self.handle) // heads
        per_token = 2 * 2 * kv_width * ll.llama_model_n_layer(self.handle)  # K and V, 2 bytes each
        return int(ll.llama_model_size(self.handle)) + per_token * context_tokens

    def special_bytes(self, token: int) -> bytes:
        """A token's bytes with special tokens spelled out (`[TOOL_CALLS]`)."""
        buf = ctypes.create_string_buffer(256)
        n = ll.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, True)
        return buf.raw[: max(n, 0)]

    def detokenize_special(self, token: int) -> str:
        """A token's text with special tokens spelled out (`<|im_start|>`), as templates write them."""
        buf = ctypes.create_string_buffer(256)
        n = ll.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, True)
        return buf.raw[: max(n, 0)].decode("utf-8", errors="replace")

    def detokenize(self, tokens: list[int]) -> str:
        return b"".join(self.token_bytes(t) for t in tokens).decode("utf-8", errors="replace")

    def is_eog(self, token: int) -> bool:
        return bool(ll.llama_vocab_is_eog(self.vocab, token))

    def load_adapter(self, path: Path) -> ctypes.c_void_p:
        """A LoRA adapter for this model; it is freed with the model."""
        adapter = ll.llama_adapter_lora_init(self.handle, str(path).encode())
        if not adapter:
            raise ModelLoadError(f"llama.cpp could not load the LoRA adapter {path} for {self.path.name}")
        return adapter

    def close(self) -> None:
        if self.handle:
            ll.llama_model_free(self.handle)
            self.handle = None
