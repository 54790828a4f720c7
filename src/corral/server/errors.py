"""Error envelopes: OpenAI's `{"error": {message, type, param, code}}` on /v1, Ollama's `{"error": "..."}` elsewhere.

Every failure a request can cause ends here with a status and a message; nothing leaks a traceback.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from ..protocol.openai import ErrorBody, ErrorResponse
from ..service.errors import ServiceError

log = logging.getLogger("corral.server")

_TYPE_BY_STATUS = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
                   405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error"}


def openai_error(status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str | None = None) -> JSONResponse:
    body = ErrorResponse(
        error=ErrorBody(message=message, type=kind or _TYPE_BY_STATUS.get(status, "server_error"), param=param,
                        code=code)
    )
    return JSONResponse(body.model_dump(), status_code=status)


def error_response(request: Request, status: int, message: str, param: str | None = None,
                   code: str | None = None, kind: str | None = None) -> JSONResponse:
    if request.url.path.startswith("/v1"):
        return openai_error(status, message, param, code, kind)
    return JSONResponse({"error": message}, status_code=status)


# Pydantic tags union members in error locations ("str", "list[...]", a model's class name); they are not
# field names, which are snake_case on every wire corral speaks.
def _is_tag(part: Any) -> bool:
    return isinstance(part, str) and (
        "[" in part or part in {"str", "int", "float", "bool", "list", "dict"} or part[:1].isupper()
    )


def param_path(loc: tuple[Any, ...]) -> str | None:
    path = ""
    for part in loc:
        if part == "body" and not path:
            continue
        if _is_tag(part):
            continue
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path or None


def validation_message(error: dict[str, Any]) -> tuple[str, str | None]:
    param = param_path(tuple(error.get("loc", ())))
    kind = error.get("type")
    if kind == "json_invalid":
        return ("We could not parse the JSON body of your request: "
                f"{error.get('ctx', {}).get('error', 'invalid JSON')}"), None
    if kind == "extra_forbidden":
        return f"Unrecognized request argument supplied: {param}", param
    if kind == "missing":
        if param is None:
            return "The request body is missing; send a JSON object.", None
        return f"Missing required parameter: '{param}'.", param
    message = str(error.get("msg", "invalid value")).removeprefix("Value error, ")
    if param is None:
        return f"Invalid request body: {message}", None
    return f"Invalid value for '{param}': {message}", param


def install(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = list(exc.errors())
        # A union field yields one error per member; the one with the deepest location is the most specific.
        first = max(errors, key=lambda e: len([p for p in e.get("loc", ()) if not _is_tag(p)])) if errors else {}
        message, param = validation_message(first)
        return error_response(request, 400, message, param)

    @app.exception_handler(ServiceError)
    async def _service(request: Request, exc: ServiceError) -> JSONResponse:
        if exc.status >= 500:
            log.error("request failed: %s", exc.message)
        return error_response(request, exc.status, exc.message, exc.param, exc.code, exc.kind)

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else "request failed"
        if exc.status_code == 404:
            message = f"no route for {request.method} {request.url.path}"
        elif exc.status_code == 405:
            message = f"method {request.method} is not allowed on {request.url.path}"
        return error_response(request, exc.status_code, message)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error on %s", request.url.path)
        return error_response(request, 500, f"internal error: {type(exc).__name__}")
