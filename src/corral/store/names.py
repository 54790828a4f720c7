"""Model names: `[host/][namespace/]model[:tag]`, with Ollama's defaults and part rules.

Names are validated before any path is built from them, so a name can never reach outside the store.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

DEFAULT_HOST = "registry.ollama.ai"
DEFAULT_NAMESPACE = "library"
DEFAULT_TAG = "latest"

_HOST = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.:-]{0,349}")
_NAMESPACE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]{0,79}")
_MODEL_OR_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,79}")


class InvalidName(ValueError):
    """A model name that breaks the naming rules; the message says which part and why."""


@dataclass(frozen=True)
class Name:
    host: str
    namespace: str
    model: str
    tag: str

    @classmethod
    def parse(cls, raw: str) -> "Name":
        if not isinstance(raw, str) or not raw.strip():
            raise InvalidName("model name is empty")
        text = raw.strip()
        if "://" in text:
            text = text.split("://", 1)[1]
        rest, tag = text, DEFAULT_TAG
        colon = text.rfind(":")
        if colon > text.rfind("/"):
            rest, tag = text[:colon], text[colon + 1 :]
        parts = rest.split("/")
        if len(parts) > 3:
            raise InvalidName(f"invalid model name {raw!r}: too many '/'-separated parts")
        model = parts[-1]
        namespace = parts[-2] if len(parts) >= 2 else DEFAULT_NAMESPACE
        host = parts[-3] if len(parts) == 3 else DEFAULT_HOST
        for label, value, pattern in (
            ("host", host, _HOST),
            ("namespace", namespace, _NAMESPACE),
            ("model", model, _MODEL_OR_TAG),
            ("tag", tag, _MODEL_OR_TAG),
        ):
            if not value:
                raise InvalidName(f"invalid model name {raw!r}: the {label} is empty")
            if ".." in value or not pattern.fullmatch(value):
                raise InvalidName(f"invalid model name {raw!r}: bad {label} {value!r}")
        return cls(host, namespace, model, tag)

    @property
    def parts(self) -> tuple[str, str, str, str]:
        return (self.host, self.namespace, self.model, self.tag)

    def key(self) -> tuple[str, ...]:
        """Names compare case-insensitively, as in Ollama."""
        return tuple(p.lower() for p in self.parts)

    def display(self) -> str:
        """The shortest form that parses back to this name, always with its tag."""
        short = f"{self.model}:{self.tag}"
        if self.host.lower() != DEFAULT_HOST:
            return f"{self.host}/{self.namespace}/{short}"
        if self.namespace.lower() != DEFAULT_NAMESPACE:
            return f"{self.namespace}/{short}"
        return short

    def __str__(self) -> str:
        return self.display()
