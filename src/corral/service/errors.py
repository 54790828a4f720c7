"""Errors the service raises; the server maps each class to a status and its route's error shape."""

from __future__ import annotations


class ServiceError(Exception):
    status = 500
    kind = "server_error"

    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code


class InvalidRequest(ServiceError):
    status = 400
    kind = "invalid_request_error"


class ModelNotFound(ServiceError):
    status = 404
    kind = "invalid_request_error"

    def __init__(self, name: str) -> None:
        super().__init__(f"model '{name}' not found", param="model", code="model_not_found")


class EngineFailure(ServiceError):
    """The engine failed while serving the request (a model that cannot load, a decode error)."""

    status = 500
    kind = "server_error"


class ServerBusy(ServiceError):
    """Too many requests are already waiting for a slot (CORRAL_MAX_QUEUE)."""

    status = 503
    kind = "server_error"

    def __init__(self) -> None:
        super().__init__("server busy, please try again.  maximum pending requests exceeded", code="server_busy")
