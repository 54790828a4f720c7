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


# -- generation: /api/generate and /api/chat ---------------------------------------------------------
def _absent(value: Any) -> bool:
    return value is None


class NativeFunctionCall(Strict):
    name: str = Field(min_length=1)
    arguments: dict[str, Any] = Field(default_factory=dict)  # an object, unlike OpenAI's JSON string
    index: int | None = None


class NativeToolCall(Strict):
    id: str | None = None
    type: Literal["function"] | None = None
    function: NativeFunctionCall


class NativeMessage(Strict):
    role: Literal["system", "user", "assistant", "tool"]
    content: str = ""
    images: list[str] | None = None  # base64
    tool_calls: list[NativeToolCall] | None = None
    tool_name: str | None = None  # tool messages: the function whose result this is
    tool_call_id: str | None = None
    thinking: Literal[""] | None = None  # no corral model thinks; an empty value is what clients echo back


class GenerationFields(Strict):
    """What /api/generate and /api/chat share."""

    model: str = Field(min_length=1)
    format: Literal["", "json"] | dict[str, Any] | None = None  # "json", or a JSON schema
    options: dict[str, Any] | None = None  # Ollama's option names (num_ctx, temperature, num_predict, ...)
    stream: bool | None = True
    keep_alive: float | str | None = None
    think: bool | Literal["low", "medium", "high", "max"] | None = None
    truncate: bool | None = None
    shift: bool | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)


class GenerateRequest(GenerationFields):
    prompt: str = ""
    suffix: str | None = None
    images: list[str] | None = None  # base64
    system: str | None = None  # replaces the model's SYSTEM
    template: str | None = None  # a jinja chat template replacing the model's
    context: list[int] | None = None  # the `context` of an earlier response, continued
    raw: bool | None = None  # the prompt goes to the model as it is, without the template


class ChatRequest(GenerationFields):
    messages: list[NativeMessage] = Field(default_factory=list)
    tools: list[dict[str, Any]] | None = None  # OpenAI's tool objects, checked as /v1 checks them


class NativeTopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class NativeLogprob(NativeTopLogprob):
    top_logprobs: list[NativeTopLogprob] | None = Field(default=None, exclude_if=_absent)


class Reply(BaseModel):
    """What every generate and chat chunk has; the final one (`done: true`) adds why it ended and its
    counts and durations, in nanoseconds."""

    model: str
    created_at: str
    done: bool
    done_reason: str | None = Field(default=None, exclude_if=_absent)
    total_duration: int | None = Field(default=None, exclude_if=_absent)
    load_duration: int | None = Field(default=None, exclude_if=_absent)
    prompt_eval_count: int | None = Field(default=None, exclude_if=_absent)
    prompt_eval_duration: int | None = Field(default=None, exclude_if=_absent)
    eval_count: int | None = Field(default=None, exclude_if=_absent)
    eval_duration: int | None = Field(default=None, exclude_if=_absent)
    logprobs: list[NativeLogprob] | None = Field(default=None, exclude_if=_absent)


class GenerateChunk(Reply):
    response: str
    context: list[int] | None = Field(default=None, exclude_if=_absent)


class ChatReply(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str
    tool_calls: list[NativeToolCall] | None = Field(default=None, exclude_if=_absent)


class ChatChunk(Reply):
    message: ChatReply


class RunningModel(BaseModel):
    name: str
    model: str
    size: int  # bytes: the weights and the context's KV cache
    size_vram: int = 0  # corral runs on the CPU
    digest: str
    details: Details
    expires_at: str  # RFC 3339; far in the future for a model kept loaded until the server stops
    context_length: int


class PsResponse(BaseModel):
    models: list[RunningModel]


class StatusResponse(BaseModel):
    status: str
    digest: str | None = None
    total: int | None = None
    completed: int | None = None


class VersionResponse(BaseModel):
    version: str


# -- embeddings ---------------------------------------------------------------------------------------
KeepAlive = float | str | None  # seconds (negative: forever), or a duration such as "5m", "1h30m", "-1"


class EmbedRequest(Strict):
    model: str = Field(min_length=1)
    input: str | list[str] | None = None  # absent or empty: load the model and answer no embeddings
    truncate: bool | None = True  # false: an input longer than the context is a 400
    dimensions: int | None = Field(default=None, ge=1)
    keep_alive: KeepAlive = None
    options: dict[str, Any] | None = None


class EmbedResponse(BaseModel):
    model: str
    embeddings: list[list[float]]
    total_duration: int  # nanoseconds
    load_duration: int
    prompt_eval_count: int


class LegacyEmbeddingRequest(Strict):
    """The body of the deprecated /api/embeddings."""

    model: str = Field(min_length=1)
    prompt: str = ""
    keep_alive: KeepAlive = None
    options: dict[str, Any] | None = None


class LegacyEmbeddingResponse(BaseModel):
    embedding: list[float]
