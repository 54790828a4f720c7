"""Model names: defaults, display, validation before any path is built."""

import pytest

from corral.store.names import InvalidName, Name


def test_defaults_and_display():
    n = Name.parse("smollm2:135m")
    assert n.parts == ("registry.ollama.ai", "library", "smollm2", "135m")
    assert n.display() == "smollm2:135m"
    assert Name.parse("smollm2").tag == "latest"
    assert Name.parse("team/model").display() == "team/model:latest"
    assert Name.parse("host.example:5000/team/model:v1").display() == "host.example:5000/team/model:v1"


def test_case_insensitive_key():
    assert Name.parse("SmolLM2:135M").key() == Name.parse("smollm2:135m").key()


@pytest.mark.parametrize(
    "raw", ["", "  ", "../x", "a/../b", "a//b", "a/b/c/d", "x:", ":tag", "bad name", "a" * 81, "m:" + "t" * 81, ".hidden"]
)
def test_invalid_names_are_rejected(raw):
    with pytest.raises(InvalidName):
        Name.parse(raw)
