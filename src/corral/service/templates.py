"""Chat templates: the GGUF's `tokenizer.chat_template`, rendered with jinja2 as Hugging Face renders it."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

# Used only when a GGUF carries no template of its own.
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class TemplateRenderError(ValueError):
    """The template refused the conversation (it called raise_exception, or failed to render)."""


def _raise_exception(message: str) -> None:
    raise TemplateRenderError(message)


def _tojson(value: Any, indent: int | None = None, ensure_ascii: bool = False, sort_keys: bool = False) -> str:
    return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


_env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
_env.filters["tojson"] = _tojson
_env.globals["raise_exception"] = _raise_exception
_env.globals["strftime_now"] = _strftime_now


class ChatTemplate:
    def __init__(self, source: str | None, bos_token: str = "", eos_token: str = "") -> None:
        self.source = source or CHATML
        try:
            self._template = _env.from_string(self.source)
        except TemplateError as exc:
            raise TemplateRenderError(f"the model's chat template does not parse: {exc}") from exc
        self.bos_token = bos_token
        self.eos_token = eos_token

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **extra: Any) -> str:
        try:
            return self._template.render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
                **extra,
            )
        except TemplateRenderError:
            raise
        except Exception as exc:  # templates are third-party code: any failure is the request's problem
            raise TemplateRenderError(f"the chat template could not render this conversation: {exc}") from exc

    def render_continuation(self, messages: list[dict[str, Any]], **extra: Any) -> str:
        """Render so that the model continues the final assistant message instead of starting a new turn."""
        final = messages[-1].get("content") or ""
        if not final:
            return self.render(messages[:-1], add_generation_prompt=True, **extra)
        rendered = self.render(messages, add_generation_prompt=False, **extra)
        cut = rendered.rfind(final)
        if cut < 0:
            return rendered
        return rendered[: cut + len(final)]
