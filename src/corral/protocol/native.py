"""Ollama's native /api wire types for model management, as pydantic models."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)


class ModelRequest(Strict):
    """The body of show and delete. Ollama's older clients send `name`; both are accepted."""

    model: str | None = None
    name: str | None = None
    verbose: bool | None = None

    def target(self) -> str | None:
        return self.model or self.name


class CopyRequest(Strict):
    source: str = Field(min_length=1)
    destination: str = Field(min_length=1)


class Message(Strict):
    role: Literal["system", "user", "assistant"]
    content: str


class CreateRequest(Strict):
    model: str | None = None
    name: str | None = None
    from_: str | None = Field(default=None, alias="from")
    files: dict[str, str] | None = None  # file name -> uploaded blob digest; the first is the model GGUF,
    #                                      a second one a vision projector GGUF
    adapters: dict[str, str] | None = None
    template: str | None = None
    system: str | None = None
    license: str | list[str] | None = None
    parameters: dict[str, Any] | None = None
    messages: list[Message] | None = None
    stream: bool | None = True
    quantize: None = None  # corral does not quantize; a value is refused by the strict type

    def target(self) -> str | None:
        return self.model or self.name


class TransferRequest(Strict):
    """The body of pull and push."""

    model: str | None = None
    name: str | None = None
    insecure: bool | None = False
    stream: bool | None = True

    def target(self) -> str | None:
        return self.model or self.name


class Details(BaseModel):
    parent_model: str = ""
    format: str = "gguf"
    family: str = ""
    families: list[str] | None = None
    parameter_size: str = ""
    quantization_level: str = ""


class ListedModel(BaseModel):
    name: str
    model: str
    modified_at: str
    size: int
    digest: str
    details: Details


class TagsResponse(BaseModel):
    models: list[ListedModel]


class ShowResponse(BaseModel):
    license: str = ""
    modelfile: str
    parameters: str = ""
    template: str = ""
    system: str = ""
    details: Details
    model_info: dict[str, Any]
    capabilities: list[str]
    modified_at: str


class StatusResponse(BaseModel):
    status: str
    digest: str | None = None
    total: int | None = None
    completed: int | None = None


class VersionResponse(BaseModel):
    version: str
