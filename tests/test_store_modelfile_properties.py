"""Properties of the Modelfile parser beyond the round trip `parse(render(m)) == m` (in test_store_modelfile.py):
any text, and any statement-shaped text, is either read or refused with a ModelfileError naming a real line;
what is read renders to text that reads back the same; and parameter coercion is total over JSON values."""

from __future__ import annotations

import math

from hypothesis import given, settings
from hypothesis import strategies as st

from corral.store.modelfile import (
    DEPRECATED_PARAMETERS,
    PARAMETER_TYPES,
    Modelfile,
    ModelfileError,
    coerce_parameter,
    parse,
    render,
)

# The real instructions, weighted over an unsupported and an unknown one.
INSTRUCTIONS = ["FROM", "PARAMETER", "TEMPLATE", "SYSTEM", "ADAPTER", "LICENSE", "MESSAGE"] * 3 + ["REQUIRES", "BOGUS"]
PARAMETER_NAMES = sorted(PARAMETER_TYPES) + sorted(DEPRECATED_PARAMETERS) + ["bogus", ""]

# Values as they appear after an instruction: bare, "quoted" (with escapes), """blocks""", broken quotes,
# numbers of every shape (including more digits than int() converts), and arbitrary text.
values = st.one_of(
    st.text(max_size=20),
    st.lists(st.sampled_from(['"', '"""', "\\", "\\\"", "\n", "\r\n", " ", "a", "#", "é", "1", "-", ".", "e"]),
             max_size=12).map("".join),
    st.integers().map(str),
    st.floats().map(repr),
    st.integers(min_value=4290, max_value=4400).map(lambda n: "9" * n),
    st.sampled_from(["true", "false", "True", "nan", "inf", "1_0", "0x10", ""]),
)


@st.composite
def statements(draw: st.DrawFn) -> str:
    instruction = draw(st.sampled_from(INSTRUCTIONS))
    instruction = draw(st.sampled_from([instruction, instruction.lower(), instruction.title()]))
    middle = ""
    if instruction.upper() == "PARAMETER":
        middle = draw(st.sampled_from(PARAMETER_NAMES)) + " "
    elif instruction.upper() == "MESSAGE":
        middle = draw(st.sampled_from(["user", "system", "assistant", "tool", "User", ""])) + " "
    indent = draw(st.sampled_from(["", " ", "\t"]))
    return f"{indent}{instruction} {middle}{draw(values)}"


modelfile_texts = st.builds(
    lambda first, lines, newline, bom: ("\ufeff" if bom else "") + newline.join([first, *lines]),
    st.sampled_from(["FROM m", "FROM m", "FROM m", ""]),
    st.lists(st.one_of(statements(), st.sampled_from(["", "# comment", "   "])), max_size=10),
    st.sampled_from(["\n", "\r\n"]),
    st.booleans(),
)


def _check_read_or_refused(text: str) -> Modelfile | None:
    try:
        return parse(text)
    except ModelfileError as exc:
        last_line = text.count("\n") + 1
        assert exc.line is None or 1 <= exc.line <= last_line, (exc.line, last_line, str(exc))
        assert str(exc)
        return None


@settings(max_examples=500, deadline=None)
@given(st.text())
def test_any_text_is_read_or_refused_with_a_line(text: str) -> None:
    _check_read_or_refused(text)


@settings(max_examples=500, deadline=None)
@given(modelfile_texts)
def test_statement_shaped_text_is_read_or_refused_and_reads_back_the_same(text: str) -> None:
    mf = _check_read_or_refused(text)
    if mf is not None:
        assert parse(render(mf)) == mf


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(["", "# note", "ADAPTER a", "SYSTEM hi", 'TEMPLATE """a\nb"""', "  "]), max_size=8),
       st.sampled_from(["PARAMETER bogus 1", "PARAMETER num_ctx x", "MESSAGE tool hi", "NOPE", 'SYSTEM "open',
                        "PARAMETER seed " + "9" * 5000]))
def test_an_error_names_the_line_its_statement_starts_on(before: list[str], bad: str) -> None:
    text = "\n".join([*before, bad, "FROM m"])
    start = sum(line.count("\n") + 1 for line in before) + 1
    try:
        parse(text)
    except ModelfileError as exc:
        assert exc.line == start, (exc.line, start, str(exc))
    else:
        raise AssertionError(f"{bad!r} was accepted")


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | values,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=6,
)


@settings(max_examples=500, deadline=None)
@given(st.sampled_from(PARAMETER_NAMES + ["stop"] * 3), values | json_values)
def test_coerce_parameter_is_total_and_typed(name: str, value: object) -> None:
    """What /api/create's `parameters` and a request's `options` go through: a typed value or a 400's message."""
    try:
        typed = coerce_parameter(name, value)
    except ModelfileError as exc:
        assert exc.line is None and str(exc)
        return
    kind = PARAMETER_TYPES[name]
    assert type(typed) is kind
    if kind is float:
        assert math.isfinite(typed)  # type: ignore[arg-type]
    if kind is list:
        assert all(isinstance(s, str) and s for s in typed)  # type: ignore[union-attr]  # [] is "no stops"
