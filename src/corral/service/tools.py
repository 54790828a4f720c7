"""Tool calling for one chat request: which functions are offered, how the prompt shows them, and the
grammar that makes every call the model writes a valid call.

A template that takes a `tools` variable (Hugging Face style) gets the tools and the conversation's
calls as it expects them, and the model writes calls in its family's format. A template without tool
support gets a compact preamble in the system message, and calls and results written in the Hermes
format (`<tool_call>{...}</tool_call>`), which the preamble teaches.

Enforcement (`tool_choice`):
* `required` or a named function: the whole output is grammar-constrained to calls of the offered
  functions, each with arguments valid against the function's `parameters` schema;
* `auto`: the output is free until a call starts (the format's marker, or a bare `{`/`[` opening the
  output where the format writes calls that way); from there the same grammar holds, so a call that
  starts is finished validly and nothing but more calls can follow it;
* `none`: the tools are not shown and nothing is parsed, so no call can come out.
`parallel_tool_calls: false` makes the grammar stop after one call.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from ..engine.sampling import GrammarTrigger
from ..protocol.openai import ChatCompletionRequest, ChatMessage, ResponseFormat, Tool
from .errors import InvalidRequest
from .grammar import SchemaError, literal, rules_text, schemas_to_rules
from .models import LoadedModel
from .tool_calls import BARE_JSON, HERMES, LLAMA3, MISTRAL, ToolFormat

_TAKES_TOOLS = re.compile(r"\btools\b")


def template_format(template_source: str) -> ToolFormat | None:
    """The call format of a template that takes tools (None for one that does not)."""
    if not _TAKES_TOOLS.search(template_source):
        return None
    if "<tool_call>" in template_source:
        return HERMES
    if "[TOOL_CALLS]" in template_source:
        return MISTRAL
    if "<|python_tag|>" in template_source or '"parameters"' in template_source:
        return LLAMA3
    return BARE_JSON


@dataclass
class ToolPlan:
    """What the request's tools mean for this model."""

    fmt: ToolFormat
    functions: set[str]  # the functions the model may call (all offered, or the one named)
    grammar: str
    trigger: GrammarTrigger | None  # None: the grammar holds from the first token
    shown_tokens: frozenset[int]  # special marker tokens to write out so the parser sees them
    template_tools: list[dict[str, Any]] | None  # for a template that takes tools
    preamble: str | None  # for a template that does not


def choice_of(request: ChatCompletionRequest) -> str | None:
    """`none`, `auto`, `required`, or the name of the one function to call; checked against `tools`."""
    choice = request.tool_choice
    if request.tools is None:
        if choice is not None and choice != "none":
            raise InvalidRequest("'tool_choice' needs 'tools' to choose from", param="tool_choice")
        return "none"
    if choice is None:
        return "auto"
    if isinstance(choice, str):
        return choice
    names = [t.function.name for t in request.tools]
    if choice.function.name not in names:
        raise InvalidRequest(
            f"tool_choice names the function {choice.function.name!r}, which is not in 'tools' "
            f"(offered: {', '.join(names)})",
            param="tool_choice.function.name",
        )
    return choice.function.name


def plan(request: ChatCompletionRequest, loaded: LoadedModel) -> ToolPlan | None:
    """The tool plan for a request, or None when no call can come out (no tools, or `tool_choice: none`).

    Every tool is checked even when none may be called, so a bad tool is a 400 either way."""
    choice = choice_of(request)
    tools = request.tools or []
    for i, tool in enumerate(tools):
        _check_parameters(tool, i)
    if choice == "none":
        return None
    native = template_format(loaded.template.source)
    fmt = native or HERMES
    offered = [t for t in tools if choice in ("auto", "required") or t.function.name == choice]
    parallel = request.parallel_tool_calls is not False
    answer = _answer_schema(request.response_format) if choice == "auto" else None
    grammar = _grammar(fmt, offered, parallel, answer)
    trigger = None
    if choice == "auto" and answer is None:
        trigger = GrammarTrigger(markers=(fmt.open.encode(),) if fmt.open else (), at_start=fmt.at_start)
    return ToolPlan(
        fmt=fmt,
        functions={t.function.name for t in offered},
        grammar=grammar,
        trigger=trigger,
        shown_tokens=_marker_tokens(loaded, fmt),
        template_tools=[t.model_dump(exclude_none=True) for t in tools] if native else None,
        preamble=None if native else _preamble(tools, choice, parallel),
    )


def _parameters(tool: Tool) -> dict[str, Any]:
    # OpenAI: leaving `parameters` out defines a function without arguments.
    return tool.function.parameters if tool.function.parameters is not None else {"type": "object", "properties": {}}


def _check_parameters(tool: Tool, i: int) -> None:
    param = f"tools[{i}].function.parameters"
    schema = _parameters(tool)
    if schema.get("type", "object") != "object":
        raise InvalidRequest(
            f"{param}: the arguments of {tool.function.name!r} must be a JSON object, so 'parameters' must be "
            f"an object schema (got type {schema.get('type')!r})",
            param=param,
        )
    try:
        schemas_to_rules({"args": schema})
    except SchemaError as exc:
        exc.subject = param
        raise InvalidRequest(str(exc), param=param) from None


def _answer_schema(response_format: ResponseFormat | None) -> dict[str, Any] | None:
    if response_format is None or response_format.type == "text":
        return None
    if response_format.type == "json_object":
        return {"type": "object"}
    assert response_format.json_schema is not None
    return response_format.json_schema.schema_


def _grammar(fmt: ToolFormat, tools: list[Tool], parallel: bool, answer: dict[str, Any] | None) -> str:
    """GBNF for the calls (and, with `answer`, alternatively a JSON answer valid against it)."""
    schemas = {f"tool-args-{i}": _parameters(t) for i, t in enumerate(tools)}
    if answer is not None:
        schemas["tool-answer"] = answer
    own = ["root", "tool-call", "tool-calls", "tool-region", *(f"tool-call-{i}" for i in range(len(tools)))]
    try:
        rules = schemas_to_rules(schemas, reserved=own)
    except SchemaError as exc:  # only the answer schema can fail here: the tools were checked one by one
        raise InvalidRequest(str(exc), param="response_format.json_schema.schema") from None
    sp = '" "?'
    calls = {
        f"tool-call-{i}": (
            f'"{{" {sp} "\\"name\\":" {sp} {literal(json.dumps(t.function.name))} "," {sp} '
            f'{literal(json.dumps(fmt.arguments_key) + ":")} {sp} tool-args-{i} {sp} "}}"'
        )
        for i, t in enumerate(tools)
    }
    own_rules = {"tool-call": " | ".join(calls), **calls}
    if fmt is HERMES:
        own_rules["tool-region"] = '"<tool_call>" "\\n"? tool-call "\\n"? "</tool_call>"'
        own_rules["tool-calls"] = 'tool-region ("\\n"? "\\n"? tool-region)*' if parallel else "tool-region"
    elif fmt is MISTRAL:
        more = f'("," {sp} tool-call)*' if parallel else ""
        own_rules["tool-calls"] = f'"[TOOL_CALLS]" {sp} "[" tool-call {more} "]"'
    elif fmt is LLAMA3:
        more = f' (";" {sp} tool-call)*' if parallel else ""
        own_rules["tool-calls"] = f'"<|python_tag|>"? tool-call{more}'
    else:
        own_rules["tool-calls"] = f'tool-call | "[" tool-call ("," {sp} tool-call)* "]"' if parallel else "tool-call"
    own_rules["root"] = "tool-calls | tool-answer" if answer is not None else "tool-calls"
    return rules_text({**own_rules, **rules})


def _marker_tokens(loaded: LoadedModel, fmt: ToolFormat) -> frozenset[int]:
    """Markers that are special tokens in this vocabulary (Mistral's `[TOOL_CALLS]`), which the engine
    would otherwise render as nothing."""
    model = loaded.model
    shown = set()
    for marker in (fmt.open, fmt.close):
        if marker is None:
            continue
        tokens = model.tokenize(marker, add_special=False, parse_special=True)
        if len(tokens) == 1 and not model.token_bytes(tokens[0]):
            shown.add(tokens[0])
    return frozenset(shown)


def _preamble(tools: list[Tool], choice: str, parallel: bool) -> str:
    lines = [("You can call functions. Each is described by a JSON object giving its name and a JSON Schema "
              "for its arguments:")]
    for tool in tools:
        item: dict[str, Any] = {"name": tool.function.name}
        if tool.function.description:
            item["description"] = tool.function.description
        item["parameters"] = _parameters(tool)
        lines.append(json.dumps(item, ensure_ascii=False))
    lines.append("To call a function, write:")
    lines.append('<tool_call>{"name": "<function name>", "arguments": {<arguments>}}</tool_call>')
    lines.append("You may call several functions, one per line." if parallel else "Call one function at most.")
    if choice == "required":
        lines.append("You must call a function now.")
    elif choice != "auto":
        lines.append(f"You must call the function {choice} now.")
    else:
        lines.append("If no function is needed, answer directly.")
    lines.append("Function results come back inside <tool_response></tool_response>.")
    return "\n".join(lines)


# -- the conversation -------------------------------------------------------------------------------
def history_calls(message: ChatMessage, i: int) -> list[dict[str, Any]]:
    """An assistant message's earlier calls, arguments parsed, as templates expect them."""
    calls = []
    for j, call in enumerate(message.tool_calls or []):
        try:
            arguments = json.loads(call.function.arguments)
        except ValueError as exc:
            raise InvalidRequest(
                f"messages[{i}].tool_calls[{j}].function.arguments is not valid JSON ({exc}): "
                f"{call.function.arguments[:80]!r}",
                param=f"messages[{i}].tool_calls[{j}].function.arguments",
            ) from None
        if not isinstance(arguments, dict):
            raise InvalidRequest(
                f"messages[{i}].tool_calls[{j}].function.arguments must be a JSON object, "
                f"got {type(arguments).__name__}",
                param=f"messages[{i}].tool_calls[{j}].function.arguments",
            )
        calls.append({"id": call.id, "type": "function",
                      "function": {"name": call.function.name, "arguments": arguments}})
    return calls


def hermes_call_text(call: dict[str, Any]) -> str:
    body = {"name": call["function"]["name"], "arguments": call["function"]["arguments"]}
    return f"<tool_call>{json.dumps(body, ensure_ascii=False)}</tool_call>"


def hermes_result_text(content: str) -> str:
    return f"<tool_response>\n{content}\n</tool_response>"
