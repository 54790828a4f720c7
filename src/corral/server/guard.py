"""What every request passes before a route sees it: browser origins (CORS), API keys, rate limits, the
body-size limit, and the one log line each request leaves.

It is plain ASGI middleware, so streamed responses pass through untouched and unbuffered.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import math
import re
import time
from collections import deque
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from ..config import Settings

log = logging.getLogger("corral.access")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

# Bodies that are files, not requests: model uploads have no size limit.
_UNLIMITED_BODY = re.compile(r"^/api/blobs/")
_ALLOWED_HEADERS = "Authorization, Content-Type, OpenAI-Organization, OpenAI-Project, X-Stainless-*, *"


@dataclass
class RequestRecord:
    """Filled in by the routes (under `request.state.record`) for the request's log line."""

    model: str | None = None
    jobs: list[Any] = field(default_factory=list)  # engine jobs, whose token counts are read at the end
    prompt_tokens: int | None = None  # where there are no jobs (embeddings)


def is_loopback(host: str) -> bool:
    if host in ("localhost", ""):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def origin_allowed(origin: str, patterns: tuple[str, ...]) -> bool:
    """Patterns are origins (`https://app.example`), with `*` standing for any run of characters
    (`http://localhost:*`); a lone `*` allows every origin."""
    for pattern in patterns:
        regex = "^" + ".*".join(re.escape(part) for part in pattern.split("*")) + "$"
        if re.match(regex, origin):
            return True
    return False


class RateLimiter:
    """At most `per_minute` requests per identity in any sliding minute."""

    def __init__(self, per_minute: int) -> None:
        self.per_minute = per_minute
        self.seen: dict[str, deque[float]] = {}

    def retry_after(self, identity: str, now: float) -> int:
        """0 when the request may go ahead (and it is counted); else whole seconds until it may."""
        window = self.seen.setdefault(identity, deque())
        while window and window[0] <= now - 60:
            window.popleft()
        if len(window) >= self.per_minute:
            return max(1, math.ceil(window[0] + 60 - now))
        window.append(now)
        return 0


class Guard:
    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.settings = settings
        self.keys = [key.encode() for key in settings.api_keys]
        self.limiter = RateLimiter(settings.rate_limit) if settings.rate_limit else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        path: str = scope["path"]
        method: str = scope["method"]
        record = RequestRecord()
        scope.setdefault("state", {})["record"] = record
        status = {"code": 0}
        debug_body: list[bytes] = []

        async def send_logged(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                if origin is not None:
                    message.setdefault("headers", [])
                    message["headers"] += [(b"access-control-allow-origin", origin.encode("latin-1")),
                                           (b"vary", b"Origin")]
            await send(message)

        origin = headers.get("origin")
        try:
            if origin is not None and not origin_allowed(origin, self.settings.origins):
                origin = None
                await self._refuse(scope, send_logged, 403, f"origin {headers['origin']!r} is not allowed "
                                   "(CORRAL_ORIGINS)")
                return
            if origin is not None and method == "OPTIONS" and "access-control-request-method" in headers:
                await self._preflight(send_logged, headers)
                return
            protected = path.startswith("/v1") or path.startswith("/api")
            identity = scope.get("client", ("", 0))[0] or "unknown"
            if protected and self.keys:
                key = self._key(headers.get("authorization", ""))
                if key is None:
                    await self._refuse(scope, send_logged, 401, "missing or invalid API key: send "
                                       "'Authorization: Bearer <key>' with one of CORRAL_API_KEYS",
                                       code="invalid_api_key")
                    return
                identity = "key:" + key
            if protected and self.limiter is not None:
                wait = self.limiter.retry_after(identity, time.monotonic())
                if wait:
                    await self._refuse(scope, send_logged, 429, f"rate limit reached: at most "
                                       f"{self.settings.rate_limit} requests per minute (CORRAL_RATE_LIMIT); "
                                       f"retry in {wait} s", code="rate_limit_exceeded",
                                       extra=[(b"retry-after", str(wait).encode())])
                    return
            limit = self.settings.max_body_bytes
            if protected and not _UNLIMITED_BODY.match(path):
                _read_body_as_json(scope, headers)
            if not _UNLIMITED_BODY.match(path):
                length = headers.get("content-length", "")
                if length.isdigit() and int(length) > limit:
                    await self._too_large(scope, send_logged, limit)
                    return
                receive = self._limited(receive, limit, debug_body if self.settings.debug else None)
            try:
                await self.app(scope, receive, send_logged)
            except _BodyTooLarge:
                if status["code"] == 0:
                    await self._too_large(scope, send_logged, limit)
        finally:
            self._log(method, path, status["code"], record, time.perf_counter() - started, debug_body)

    def _key(self, authorization: str) -> str | None:
        """The key's fingerprint when the header carries a valid key (compared in constant time)."""
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token:
            return None
        given = token.strip().encode()
        found = None
        for i, key in enumerate(self.keys):  # every key is compared, so timing says nothing of which matched
            if hmac.compare_digest(given, key):
                found = f"#{i + 1}"
        return found

    @staticmethod
    def _limited(receive: Receive, limit: int, keep: list[bytes] | None) -> Receive:
        total = 0

        async def wrapped() -> Message:
            nonlocal total
            message = await receive()
            if message["type"] == "http.request":
                total += len(message.get("body", b""))
                if total > limit:
                    raise _BodyTooLarge()
                if keep is not None:
                    keep.append(message.get("body", b""))
            return message

        return wrapped

    async def _too_large(self, scope: Scope, send: Send, limit: int) -> None:
        await self._refuse(scope, send, 413, f"request body is larger than {limit} bytes (CORRAL_MAX_BODY_BYTES)",
                           code="request_too_large")

    @staticmethod
    async def _preflight(send: Send, headers: dict[str, str]) -> None:
        requested = headers.get("access-control-request-headers", "")
        await send({"type": "http.response.start", "status": 204, "headers": [
            (b"access-control-allow-methods", b"GET, HEAD, POST, PUT, DELETE, OPTIONS"),
            (b"access-control-allow-headers", (requested or _ALLOWED_HEADERS).encode("latin-1")),
            (b"access-control-max-age", b"600"),
        ]})
        await send({"type": "http.response.body", "body": b""})

    @staticmethod
    async def _refuse(scope: Scope, send: Send, status: int, message: str, code: str | None = None,
                      extra: list[tuple[bytes, bytes]] | None = None) -> None:
        """An error in the route's shape: OpenAI's envelope under /v1, Ollama's `{"error"}` elsewhere."""
        if scope["path"].startswith("/v1"):
            kind = {401: "authentication_error", 429: "rate_limit_error"}.get(status, "invalid_request_error")
            body = {"error": {"message": message, "type": kind, "param": None, "code": code}}
        else:
            body = {"error": message}
        data = json.dumps(body).encode()
        await send({"type": "http.response.start", "status": status, "headers": [
            (b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()), *(extra or [])]})
        await send({"type": "http.response.body", "body": data})

    def _log(self, method: str, path: str, status: int, record: RequestRecord, seconds: float,
             body: list[bytes]) -> None:
        prompt = sum(len(job.prompt) for job in record.jobs) or record.prompt_tokens
        completion = sum(job.generated for job in record.jobs)
        fields: dict[str, Any] = {"method": method, "route": path, "status": status, "model": record.model,
                                  "prompt_tokens": prompt, "completion_tokens": completion if record.jobs else None,
                                  "duration_ms": round(seconds * 1000, 1)}
        if self.settings.debug and body:
            fields["body"] = b"".join(body).decode("utf-8", errors="replace")[:4000]
        log.info(json.dumps({k: v for k, v in fields.items() if v is not None}))


class _BodyTooLarge(Exception):
    pass


def _read_body_as_json(scope: Scope, headers: dict[str, str]) -> None:
    """Every API body is JSON, whatever the client labelled it: Ollama's own examples use `curl -d`, which
    sends `application/x-www-form-urlencoded`, and some clients send no Content-Type at all."""
    if headers.get("content-type", "").split(";")[0].strip().lower() == "application/json":
        return
    scope["headers"] = [(k, v) for k, v in scope.get("headers", []) if k.lower() != b"content-type"]
    scope["headers"].append((b"content-type", b"application/json"))
