"""The model list as OpenAI shows it: ids with their tag, `created` = last modified, `owned_by` = namespace."""

from __future__ import annotations

from ..protocol.openai import Model, ModelList
from ..store.store import Entry
from .models import ModelManager


def _model(entry: Entry, shown_as: str | None = None) -> Model:
    return Model(id=shown_as or entry.name.display(), created=int(entry.modified), owned_by=entry.name.namespace)


def list_models(manager: ModelManager) -> ModelList:
    return ModelList(data=[_model(entry) for entry in manager.store.list()])


def retrieve_model(manager: ModelManager, name: str) -> Model:
    """The id echoes the name as asked for, as OpenAI's and Ollama's retrieve do."""
    return _model(manager.resolve(name), shown_as=name)
