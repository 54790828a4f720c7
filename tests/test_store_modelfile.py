"""Modelfiles: Ollama's grammar, typed parameters, errors that name the line, and a render that round-trips."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from corral.store.modelfile import (
    PARAMETER_TYPES,
    Modelfile,
    ModelfileError,
    coerce_parameter,
    coerce_parameters,
    parse,
    render,
)


def error_of(text: str) -> str:
    with pytest.raises(ModelfileError) as info:
        parse(text)
    return str(info.value)


# --- instructions ----------------------------------------------------------------------------------


def test_every_instruction():
    mf = parse(
        "FROM smollm2:135m\n"
        "FROM ./mmproj.gguf\n"
        "PARAMETER temperature 0.5\n"
        "PARAMETER stop <|im_end|>\n"
        'TEMPLATE """{{ .Prompt }}"""\n'
        "SYSTEM You are terse.\n"
        "ADAPTER ./lora.gguf\n"
        "LICENSE MIT\n"
        'LICENSE """Apache 2.0"""\n'
        "MESSAGE user Hi\n"
        "MESSAGE assistant Hello!\n"
        "MESSAGE system Be brief\n"
    )
    assert mf == Modelfile(
        from_=["smollm2:135m", "./mmproj.gguf"],
        parameters={"temperature": 0.5, "stop": ["<|im_end|>"]},
        template="{{ .Prompt }}",
        system="You are terse.",
        adapters=["./lora.gguf"],
        licenses=["MIT", "Apache 2.0"],
        messages=[
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"},
            {"role": "system", "content": "Be brief"},
        ],
    )


def test_minimal_modelfile_has_defaults():
    assert parse("FROM m") == Modelfile(from_=["m"], parameters={})


def test_instruction_names_are_case_insensitive():
    mf = parse("from m\nParameter top_k 5\nsYsTeM hi\ntemplate t\nadapter a\nlicense l\nmessage user u\n")
    assert mf == Modelfile(
        from_=["m"],
        parameters={"top_k": 5},
        system="hi",
        template="t",
        adapters=["a"],
        licenses=["l"],
        messages=[{"role": "user", "content": "u"}],
    )


def test_later_template_and_system_override_earlier():
    mf = parse("FROM m\nSYSTEM one\nTEMPLATE a\nSYSTEM two\nTEMPLATE b\n")
    assert (mf.system, mf.template) == ("two", "b")


def test_later_parameter_overrides_earlier():
    assert parse("FROM m\nPARAMETER seed 1\nPARAMETER seed 2\n").parameters == {"seed": 2}


def test_comments_blank_lines_indentation_and_bom():
    text = "\ufeff# header comment\n\n   # indented comment\n\t\nFROM m   \n  SYSTEM   spaced out   \n# end"
    assert parse(text) == Modelfile(from_=["m"], parameters={}, system="spaced out")


def test_hash_inside_a_value_is_not_a_comment():
    mf = parse("FROM m\nSYSTEM Use # for headings\nMESSAGE user #1\n")
    assert mf.system == "Use # for headings"
    assert mf.messages == [{"role": "user", "content": "#1"}]


def test_crlf_line_endings():
    mf = parse("FROM m\r\nPARAMETER top_k 3\r\nSYSTEM hi\r\n")
    assert mf == Modelfile(from_=["m"], parameters={"top_k": 3}, system="hi")


# --- quoting ---------------------------------------------------------------------------------------


def test_triple_quoted_block_keeps_everything_verbatim():
    text = 'FROM m\nTEMPLATE """{{ if .System }}\n  "sys": {{ .System }}\n# not a comment\n"""\nSYSTEM x\n'
    mf = parse(text)
    assert mf.template == '{{ if .System }}\n  "sys": {{ .System }}\n# not a comment\n'
    assert mf.system == "x"


def test_quotes_before_the_closing_triple_belong_to_the_value():
    assert parse('FROM m\nSYSTEM """say "hi\""""\n').system == 'say "hi"'
    assert parse('FROM m\nSYSTEM """"quoted\""""\n').system == '"quoted"'
    assert parse('FROM m\nSYSTEM """"""\n').system == ""


def test_triple_quoted_block_keeps_backslashes():
    assert parse('FROM m\nTEMPLATE """a\\nb\\"c"""\n').template == 'a\\nb\\"c'


def test_double_quoted_values():
    mf = parse(
        'FROM "/models/my model.gguf"\n'
        'SYSTEM "  padded  "\n'
        'MESSAGE user "two\nlines"\n'
        'LICENSE "say \\"hi\\" and \\\\o/"\n'
        'ADAPTER "C:\\loras\\a.gguf"\n'
        'PARAMETER temperature "0.25"\n'
    )
    assert mf.from_ == ["/models/my model.gguf"]
    assert mf.system == "  padded  "
    assert mf.messages == [{"role": "user", "content": "two\nlines"}]
    assert mf.licenses == ['say "hi" and \\o/']
    assert mf.adapters == ["C:\\loras\\a.gguf"]  # only \" and \\ are escapes
    assert mf.parameters == {"temperature": 0.25}


def test_empty_quoted_text_values_are_allowed():
    mf = parse('FROM m\nSYSTEM ""\nMESSAGE assistant ""\n')
    assert mf.system == ""
    assert mf.messages == [{"role": "assistant", "content": ""}]


def test_quoted_value_may_be_followed_by_spaces_only():
    assert parse('FROM m\nSYSTEM "x"   \t\n').system == "x"
    assert error_of('FROM m\nSYSTEM "x" y\n') == "line 2: unexpected text after the closing quote of SYSTEM: 'y'"
    assert error_of('FROM m\nSYSTEM """x""" y\n').startswith("line 2: unexpected text after the closing quote")


def test_plain_value_with_inner_quotes():
    assert parse('FROM m\nSYSTEM You are "helpful".\n').system == 'You are "helpful".'


def test_line_numbers_continue_after_multiline_values():
    text = 'FROM m\nTEMPLATE """a\nb\nc"""\nSYSTEM "d\ne"\n\nPARAMETER top_k x\n'
    assert error_of(text) == "line 8: invalid int value 'x' for parameter 'top_k'"


# --- parameters ------------------------------------------------------------------------------------


def test_typed_parameters():
    mf = parse(
        "FROM m\n"
        "PARAMETER num_ctx 4096\n"
        "PARAMETER seed -1\n"
        "PARAMETER temperature 1\n"
        "PARAMETER top_p .9\n"
        "PARAMETER repeat_penalty 1.1e0\n"
        "PARAMETER use_mmap FALSE\n"
    )
    assert mf.parameters == {
        "num_ctx": 4096,
        "seed": -1,
        "temperature": 1.0,
        "top_p": 0.9,
        "repeat_penalty": 1.1,
        "use_mmap": False,
    }
    assert type(mf.parameters["num_ctx"]) is int
    assert type(mf.parameters["temperature"]) is float
    assert mf.parameters["use_mmap"] is False


def test_every_parameter_has_a_type():
    assert set(PARAMETER_TYPES.values()) == {int, float, bool, list}
    assert PARAMETER_TYPES["stop"] is list
    assert PARAMETER_TYPES["use_mmap"] is bool
    for name in ("num_ctx", "num_batch", "num_gpu", "main_gpu", "num_thread", "num_keep", "seed", "num_predict"):
        assert PARAMETER_TYPES[name] is int
    for name in ("top_p", "min_p", "typical_p", "temperature", "presence_penalty", "frequency_penalty"):
        assert PARAMETER_TYPES[name] is float


def test_stop_accumulates_in_order():
    mf = parse(
        'FROM m\nPARAMETER stop <|im_end|>\nPARAMETER temperature 0\nPARAMETER stop "User:"\nPARAMETER stop " "\n'
    )
    assert mf.parameters["stop"] == ["<|im_end|>", "User:", " "]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("PARAMETER top_k abc", "invalid int value 'abc' for parameter 'top_k'"),
        ("PARAMETER num_ctx 1.5", "invalid int value '1.5' for parameter 'num_ctx'"),
        ("PARAMETER temperature hot", "invalid float value 'hot' for parameter 'temperature'"),
        ("PARAMETER temperature nan", "invalid float value 'nan' for parameter 'temperature'"),
        ("PARAMETER top_p inf", "invalid float value 'inf' for parameter 'top_p'"),
        ("PARAMETER use_mmap yes", "invalid bool value 'yes' for parameter 'use_mmap'"),
        ("PARAMETER num_ctx 8", "parameter 'num_ctx' must be at least 16, got 8"),
        ("PARAMETER temperature -0.1", "parameter 'temperature' must be at least 0, got -0.1"),
        ("PARAMETER top_p 1.5", "parameter 'top_p' must be between 0 and 1, got 1.5"),
        ("PARAMETER min_p -1", "parameter 'min_p' must be between 0 and 1, got -1.0"),
        ("PARAMETER top_k -1", "parameter 'top_k' must be at least 0, got -1"),
        ("PARAMETER repeat_last_n -2", "parameter 'repeat_last_n' must be at least -1, got -2"),
        ("PARAMETER mirostat 2", "parameter 'mirostat' is deprecated and not supported"),
        ("PARAMETER penalize_newline true", "parameter 'penalize_newline' is deprecated and not supported"),
        ("PARAMETER use_mlock true", "parameter 'use_mlock' is deprecated and not supported"),
        ("PARAMETER tfs_z 1", "unknown parameter 'tfs_z'"),
        ("PARAMETER Temperature 1", "unknown parameter 'Temperature'"),
        ('PARAMETER stop ""', "parameter 'stop' must not be an empty string"),
        ("PARAMETER", "missing parameter name for PARAMETER"),
        ("PARAMETER top_k", "missing value for parameter 'top_k'"),
    ],
)
def test_parameter_errors_name_the_line(line, message):
    assert error_of(f"# a model\nFROM m\n\n{line}\nSYSTEM s\n") == f"line 4: {message}"


DEPRECATED = ["penalize_newline", "low_vram", "f16_kv", "logits_all", "vocab_only", "use_mlock", "mirostat",
              "mirostat_tau", "mirostat_eta"]


@pytest.mark.parametrize("name", DEPRECATED)
def test_every_deprecated_parameter_is_rejected(name):
    with pytest.raises(ModelfileError, match=f"^parameter '{name}' is deprecated and not supported$"):
        coerce_parameter(name, "1")


# --- coerce_parameter(s) with JSON values ------------------------------------------------------------


def test_coerce_parameters_from_json():
    assert coerce_parameters(
        {
            "num_ctx": 2048,
            "num_predict": 128.0,
            "temperature": 0,
            "top_p": 0.95,
            "use_mmap": True,
            "stop": "\n\n",
            "seed": "42",
        }
    ) == {
        "num_ctx": 2048,
        "num_predict": 128,
        "temperature": 0.0,
        "top_p": 0.95,
        "use_mmap": True,
        "stop": ["\n\n"],
        "seed": 42,
    }
    assert coerce_parameters({"stop": ["a", "b"]}) == {"stop": ["a", "b"]}
    assert coerce_parameters({}) == {}


def test_coerced_types_are_exact():
    assert type(coerce_parameter("temperature", 1)) is float
    assert type(coerce_parameter("top_k", 40.0)) is int
    assert coerce_parameter("use_mmap", "True") is True


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("top_k", True, "invalid int value True for parameter 'top_k'"),
        ("top_k", 1.5, "invalid int value 1.5 for parameter 'top_k'"),
        ("top_k", None, "invalid int value None for parameter 'top_k'"),
        ("seed", [1], "invalid int value [1] for parameter 'seed'"),
        ("temperature", False, "invalid float value False for parameter 'temperature'"),
        ("temperature", float("inf"), "invalid float value inf for parameter 'temperature'"),
        ("use_mmap", 1, "invalid bool value 1 for parameter 'use_mmap'"),
        ("stop", 5, "invalid list value 5 for parameter 'stop': expected strings"),
        ("stop", ["a", 1], "invalid list value ['a', 1] for parameter 'stop': expected strings"),
        ("stop", [""], "parameter 'stop' must not be an empty string"),
        ("num_ctx", 0, "parameter 'num_ctx' must be at least 16, got 0"),
        ("top_p", -0.5, "parameter 'top_p' must be between 0 and 1, got -0.5"),
        ("nope", 1, "unknown parameter 'nope'"),
        ("mirostat_eta", 0.1, "parameter 'mirostat_eta' is deprecated and not supported"),
    ],
)
def test_coerce_parameter_errors_have_no_line(name, value, message):
    with pytest.raises(ModelfileError) as info:
        coerce_parameter(name, value)
    assert str(info.value) == message
    assert info.value.line is None


def test_coerce_parameters_rejects_a_non_object():
    with pytest.raises(ModelfileError, match="parameters must be an object"):
        coerce_parameters(["temperature", 1])  # type: ignore[arg-type]


def test_modelfile_error_is_a_value_error():
    assert issubclass(ModelfileError, ValueError)


# --- statement errors ------------------------------------------------------------------------------


def test_no_from():
    assert error_of("SYSTEM hi\n") == "no FROM line"
    assert error_of("") == "no FROM line"
    assert error_of("# only a comment\n") == "no FROM line"


def test_third_from_is_an_error():
    assert error_of("FROM a\nFROM b\nFROM c\n") == "line 3: more than two FROM lines (a model and a vision projector)"


def test_unknown_instruction_lists_valid_commands():
    message = error_of("FROM m\n\nSYSTM hi\n")
    assert message == (
        "line 3: unknown instruction 'SYSTM'; valid commands are FROM, PARAMETER, TEMPLATE, SYSTEM, ADAPTER, "
        "LICENSE, MESSAGE"
    )


@pytest.mark.parametrize("instruction", ["REQUIRES", "draft", "Renderer", "PARSER"])
def test_unsupported_instructions_are_rejected(instruction):
    assert error_of(f"FROM m\n{instruction} x\n") == f"line 2: {instruction.upper()} is not supported by corral"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('FROM m\nSYSTEM "never closed\nmore\n', 'line 2: unterminated " quote'),
        ('FROM m\n\nTEMPLATE """never closed\n""\n', 'line 3: unterminated """ quote'),
        ('FROM m\nSYSTEM "escaped at the end\\"\n', 'line 2: unterminated " quote'),
        ('FROM m\nMESSAGE user """x\n', 'line 2: unterminated """ quote'),
    ],
)
def test_unterminated_quotes_name_the_opening_line(text, message):
    assert error_of(text) == message


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("FROM\n", "line 1: missing value for FROM"),
        ("FROM m\nSYSTEM   \n", "line 2: missing value for SYSTEM"),
        ("FROM m\nMESSAGE\n", "line 2: missing role for MESSAGE"),
        ("FROM m\nMESSAGE user\n", "line 2: missing value for MESSAGE"),
        ("FROM m\nMESSAGE tool hi\n", "line 2: message role must be one of system, user or assistant, got 'tool'"),
        ("FROM m\nMESSAGE User hi\n", "line 2: message role must be one of system, user or assistant, got 'User'"),
        ('FROM ""\n', "line 1: FROM needs a model name or a path, got ''"),
        ('FROM m\nADAPTER "  "\n', "line 2: ADAPTER needs a model name or a path, got '  '"),
    ],
)
def test_statement_errors(text, message):
    assert error_of(text) == message


# --- rendering -------------------------------------------------------------------------------------


def test_render_layout():
    mf = Modelfile(
        from_=["smollm2:135m"],
        parameters={"stop": ["<|im_end|>", "<|im_start|>"], "temperature": 0.2, "use_mmap": True, "num_ctx": 4096},
        template="{{ .Prompt }}",
        system="Be brief.",
        adapters=["./lora.gguf"],
        licenses=["MIT"],
        messages=[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there\nfriend"}],
    )
    assert render(mf) == (
        "FROM smollm2:135m\n"
        'TEMPLATE """{{ .Prompt }}"""\n'
        'SYSTEM """Be brief."""\n'
        'PARAMETER stop "<|im_end|>"\n'
        'PARAMETER stop "<|im_start|>"\n'
        "PARAMETER temperature 0.2\n"
        "PARAMETER use_mmap true\n"
        "PARAMETER num_ctx 4096\n"
        "ADAPTER ./lora.gguf\n"
        'LICENSE """MIT"""\n'
        "MESSAGE user Hi\n"
        'MESSAGE assistant """Hello there\nfriend"""\n'
    )
    assert parse(render(mf)) == mf


def test_render_uses_escaped_quotes_when_a_value_holds_triple_quotes():
    mf = Modelfile(from_=["m"], system='He wrote """x""" and a \\ backslash')
    assert render(mf) == 'FROM m\nSYSTEM "He wrote \\"\\"\\"x\\"\\"\\" and a \\\\ backslash"\n'
    assert parse(render(mf)) == mf


def test_render_rejects_what_parse_would_reject():
    with pytest.raises(ModelfileError, match="one or two FROM"):
        render(Modelfile(from_=[]))
    with pytest.raises(ModelfileError, match="one or two FROM"):
        render(Modelfile(from_=["a", "b", "c"]))
    with pytest.raises(ModelfileError, match="need a model name or a path"):
        render(Modelfile(from_=[" "]))
    with pytest.raises(ModelfileError, match="unknown parameter 'bogus'"):
        render(Modelfile(from_=["m"], parameters={"bogus": 1}))
    with pytest.raises(ModelfileError, match="message role"):
        render(Modelfile(from_=["m"], messages=[{"role": "tool", "content": "x"}]))


ROUND_TRIP_MODELS = [
    Modelfile(from_=["m"]),
    Modelfile(from_=["/path with spaces/model.gguf", "  mmproj.gguf"], parameters={"seed": 7}),
    Modelfile(
        from_=["llama3.2"],
        template=(
            "{{- if .System }}<|start_header_id|>system<|end_header_id|>\n\n{{ .System }}<|eot_id|>\n{{- end }}\n"
            '{{ range .Messages }}"{{ .Role }}"{{ end }}'
        ),
        system='  Leading and trailing spaces, a "quote" and a # hash  ',
        parameters={"stop": ["<|eot_id|>", '"', "\\", "\n", ' """ '], "top_p": 0.9, "min_p": 0.0},
        licenses=["LLAMA 3.2 COMMUNITY LICENSE\n\n1. Definitions\n", '"quoted licence"', ""],
        messages=[
            {"role": "system", "content": "# not a comment"},
            {"role": "user", "content": '"starts with a quote'},
            {"role": "assistant", "content": 'ends with a quote"'},
            {"role": "user", "content": '"""'},
            {"role": "assistant", "content": ""},
            {"role": "user", "content": "\n"},
        ],
    ),
    Modelfile(
        from_=['"quoted"'],
        template='"""',
        system='\\"',
        adapters=["a.gguf", "C:\\loras\\b.gguf", " spaced "],
        parameters={"use_mmap": False, "temperature": 1e-05, "num_predict": -2, "repeat_last_n": -1},
    ),
    Modelfile(from_=["m"], template="", system="", licenses=['a""', '""b', 'x"""y"""']),
    Modelfile(from_=["m"], system="windows\r\nline\rendings\r\n", messages=[{"role": "user", "content": "a\rb"}]),
]


@pytest.mark.parametrize("mf", ROUND_TRIP_MODELS)
def test_round_trip_hand_written(mf):
    assert parse(render(mf)) == mf


# --- property: parse(render(m)) == m ---------------------------------------------------------------

# Text that leans on the characters the quoting has to survive, mixed with arbitrary text.
tricky_text = st.one_of(
    st.text(),
    st.text(alphabet=st.sampled_from(['"', "\\", "\n", "\r", "#", " ", "\t", "a", "\ufeff", "\x85"]), max_size=12),
)
name_or_path = tricky_text.filter(lambda s: s.strip() != "")


def _optional(key: str, values: st.SearchStrategy) -> st.SearchStrategy:
    return st.one_of(st.just({}), values.map(lambda v: {key: v}))


parameters = st.tuples(
    _optional("num_ctx", st.integers(min_value=16, max_value=1 << 20)),
    _optional("seed", st.integers()),
    _optional("top_k", st.integers(min_value=0, max_value=1000)),
    _optional("repeat_last_n", st.integers(min_value=-1, max_value=1 << 16)),
    _optional("temperature", st.floats(min_value=0, allow_infinity=False, allow_nan=False)),
    _optional("top_p", st.floats(min_value=0, max_value=1)),
    _optional("presence_penalty", st.floats(allow_infinity=False, allow_nan=False)),
    _optional("use_mmap", st.booleans()),
    _optional("stop", st.lists(tricky_text.filter(bool), min_size=1, max_size=4)),
).map(lambda parts: {k: v for part in parts for k, v in part.items()})

modelfiles = st.builds(
    Modelfile,
    from_=st.lists(name_or_path, min_size=1, max_size=2),
    parameters=parameters,
    template=st.none() | tricky_text,
    system=st.none() | tricky_text,
    adapters=st.lists(name_or_path, max_size=2),
    licenses=st.lists(tricky_text, max_size=2),
    messages=st.lists(
        st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant"]), "content": tricky_text}),
        max_size=3,
    ),
)


@settings(max_examples=300, deadline=None)
@given(modelfiles)
def test_round_trip_property(mf):
    assert parse(render(mf)) == mf
