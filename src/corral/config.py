"""Every CORRAL_* setting, read once from the environment into one object."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_PORT = 11434


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
        )
