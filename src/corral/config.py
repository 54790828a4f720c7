"""Every CORRAL_* setting, read once from the environment into one object."""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_PORT = 11434
# As Ollama allows by default: pages served from this machine, on any port.
DEFAULT_ORIGINS = ("http://localhost", "https://localhost", "http://localhost:*", "https://localhost:*",
                   "http://127.0.0.1", "https://127.0.0.1", "http://127.0.0.1:*", "https://127.0.0.1:*",
                   "http://[::1]", "http://[::1]:*", "app://*", "file://*", "tauri://*", "vscode-webview://*")
_DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")


def parse_duration(text: str) -> float:
    """Seconds from a number (`300`, `-1`) or a Go duration (`5m`, `1h30m`, `300ms`, `-1s`); ValueError else."""
    text = text.strip()
    try:
        value = float(text)
    except ValueError:
        pass
    else:
        if math.isnan(value):
            raise ValueError("not a number")
        return value
    sign, body = (-1.0, text[1:]) if text.startswith("-") else (1.0, text.removeprefix("+"))
    total, pos = 0.0, 0
    for match in _DURATION_PART.finditer(body):
        if match.start() != pos:
            break
        total += float(match.group(1)) * _DURATION_UNITS[match.group(2)]
        pos = match.end()
    if not body or pos != len(body):
        raise ValueError(f"not a duration: {text!r}")
    return sign * total


def _int(env: dict[str, str], name: str, default: int, minimum: int = 1) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{name} must be an integer, got {raw!r}") from None
    if value < minimum:
        raise ValueError(f"{name} must be at least {minimum}, got {value}")
    return value


def _duration(env: dict[str, str], name: str, default: float) -> float:
    """Seconds, from a number or a Go-style duration (`5m`, `1h30m`, `-1`), as Ollama reads OLLAMA_KEEP_ALIVE."""
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        return parse_duration(raw)
    except ValueError:
        raise ValueError(f"{name} must be seconds or a duration such as 5m or 1h30m, got {raw!r}") from None


def _list(env: dict[str, str], name: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in env.get(name, "").split(",") if item.strip())


def _api_keys(raw: str) -> tuple[str, ...]:
    """Comma-separated keys, or `@path` to a file of keys (one per line, `#` comments)."""
    raw = raw.strip()
    if raw.startswith("@"):
        path = Path(raw[1:]).expanduser()
        try:
            lines = path.read_text().splitlines()
        except OSError as exc:
            raise ValueError(f"CORRAL_API_KEYS names {path}, which cannot be read: {exc.strerror}") from None
        keys = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    else:
        keys = [key.strip() for key in raw.split(",") if key.strip()]
    return tuple(keys)


def _host_port(raw: str) -> tuple[str, int]:
    """Parse CORRAL_HOST the way Ollama parses OLLAMA_HOST: `host`, `host:port` or `:port`."""
    raw = raw.strip().removeprefix("http://")
    if not raw:
        return "127.0.0.1", DEFAULT_PORT
    host, sep, port = raw.rpartition(":")
    if not sep:
        return raw, DEFAULT_PORT
    if not port.isdigit():
        raise ValueError(f"CORRAL_HOST has a bad port: {raw!r}")
    return host or "127.0.0.1", int(port)


@dataclass(frozen=True)
class Settings:
    models_dir: Path = field(default_factory=lambda: Path.home() / ".corral" / "models")
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    num_parallel: int = 4
    context_length: int = 4096
    num_threads: int = field(default_factory=lambda: os.cpu_count() or 1)
    batch_size: int = 512
    stream_interval_ms: int = 50
    import_bundled: bool = True
    keep_alive: float = 300.0  # seconds a model stays loaded when idle; negative: until the server stops
    max_loaded_models: int = 3
    max_queue: int = 512  # requests waiting for a slot, past which new ones get 503 at once
    max_image_bytes: int = 20 << 20  # one image's encoded size (a data URL's decoded bytes or a fetched body)
    max_image_pixels: int = 50_000_000  # width x height, checked before decoding
    image_fetch_timeout: float = 10.0  # seconds for fetching one http(s) image URL, start to end
    api_keys: tuple[str, ...] = ()  # when set, /v1 and /api need `Authorization: Bearer <one of them>`
    rate_limit: int = 0  # requests per minute per key (per client address without keys); 0: no limit
    origins: tuple[str, ...] = DEFAULT_ORIGINS  # browser origins allowed (CORS); `*` is a wildcard
    max_body_bytes: int = 100 << 20  # a request body (model uploads to /api/blobs excepted)
    max_messages: int = 1000  # messages in one chat request
    max_images: int = 16  # images in one request
    debug: bool = False  # log request bodies too

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> "Settings":
        env = dict(os.environ if env is None else env)
        host, port = _host_port(env.get("CORRAL_HOST", ""))
        models = env.get("CORRAL_MODELS", "").strip()
        return cls(
            models_dir=Path(models).expanduser() if models else Path.home() / ".corral" / "models",
            host=host,
            port=port,
            num_parallel=_int(env, "CORRAL_NUM_PARALLEL", 4),
            context_length=_int(env, "CORRAL_CONTEXT_LENGTH", 4096, minimum=16),
            num_threads=_int(env, "CORRAL_NUM_THREADS", os.cpu_count() or 1),
            batch_size=_int(env, "CORRAL_BATCH_SIZE", 512, minimum=8),
            stream_interval_ms=_int(env, "CORRAL_STREAM_INTERVAL_MS", 50, minimum=0),
            import_bundled=env.get("CORRAL_NO_BUNDLED", "").strip().lower() not in ("1", "true", "yes"),
            keep_alive=_duration(env, "CORRAL_KEEP_ALIVE", 300.0),
            max_loaded_models=_int(env, "CORRAL_MAX_LOADED_MODELS", 3),
            max_queue=_int(env, "CORRAL_MAX_QUEUE", 512),
            max_image_bytes=_int(env, "CORRAL_MAX_IMAGE_BYTES", 20 << 20),
            max_image_pixels=_int(env, "CORRAL_MAX_IMAGE_PIXELS", 50_000_000),
            image_fetch_timeout=_duration(env, "CORRAL_IMAGE_FETCH_TIMEOUT", 10.0),
            api_keys=_api_keys(env.get("CORRAL_API_KEYS", "")),
            rate_limit=_int(env, "CORRAL_RATE_LIMIT", 0, minimum=0),
            origins=_list(env, "CORRAL_ORIGINS") or DEFAULT_ORIGINS,
            max_body_bytes=_int(env, "CORRAL_MAX_BODY_BYTES", 100 << 20),
            max_messages=_int(env, "CORRAL_MAX_MESSAGES", 1000),
            max_images=_int(env, "CORRAL_MAX_IMAGES", 16),
            debug=env.get("CORRAL_DEBUG", "").strip().lower() in ("1", "true", "yes"),
        )
