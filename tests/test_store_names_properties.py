"""Properties of the model-name parser: it accepts or refuses any text cleanly, reads every valid name back to
its parts, and never yields a name whose manifest path could leave the store."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from corral.store.names import DEFAULT_HOST, DEFAULT_NAMESPACE, DEFAULT_TAG, InvalidName, Name
from corral.store.store import Store


def _part(pattern: str) -> st.SearchStrategy[str]:
    return st.from_regex(pattern, fullmatch=True).filter(lambda s: ".." not in s)


hosts = _part(r"[A-Za-z0-9_][A-Za-z0-9_.:-]{0,24}")
namespaces = _part(r"[A-Za-z0-9_][A-Za-z0-9_-]{0,24}")
models = tags = _part(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,24}")
names = st.builds(Name, hosts, namespaces, models, tags)

# Text that looks like a name, or like an attempt to escape the store, more often than st.text() would.
name_like = st.one_of(
    st.text(),
    st.lists(st.sampled_from(list("aZ09_.-:/\\ \t\n\x00%~") + ["..", "://", "é", "Ａ"]), max_size=30).map("".join),
    st.builds(lambda n: n.display(), names),
)


@settings(max_examples=500, deadline=None)
@given(name_like)
def test_any_text_parses_or_is_refused_with_invalid_name(raw: str) -> None:
    try:
        name = Name.parse(raw)
    except InvalidName as exc:
        assert str(exc), "an InvalidName says what is wrong"
        return
    assert all(name.parts)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Store:
    return Store(tmp_path_factory.mktemp("names-store"))


@settings(max_examples=500, deadline=None)
@given(raw=name_like)
def test_a_parsed_name_never_leads_outside_the_store(store: Store, raw: str) -> None:
    try:
        name = Name.parse(raw)
    except InvalidName:
        return
    for part in name.parts:
        assert part not in (".", "..") and not ({"/", "\\", "\x00"} & set(part)), name
    path = store.manifest_path(name)
    relative = path.resolve().relative_to(store.manifests.resolve())  # raises if it escapes
    assert relative.parts == name.parts


@settings(max_examples=300, deadline=None)
@given(hosts, namespaces, models, tags)
def test_a_full_name_parses_to_exactly_its_parts(host: str, namespace: str, model: str, tag: str) -> None:
    assert Name.parse(f"{host}/{namespace}/{model}:{tag}").parts == (host, namespace, model, tag)
    assert Name.parse(f"{namespace}/{model}").parts == (DEFAULT_HOST, namespace, model, DEFAULT_TAG)
    assert Name.parse(model).parts == (DEFAULT_HOST, DEFAULT_NAMESPACE, model, DEFAULT_TAG)


@settings(max_examples=300, deadline=None)
@given(names)
def test_display_parses_back_to_the_same_name(name: Name) -> None:
    shown = name.display()
    again = Name.parse(shown)
    assert again.key() == name.key()
    assert again.display() == shown  # the short form is a fixed point
    assert shown.endswith(f":{name.tag}")


@settings(max_examples=300, deadline=None)
@given(names, st.sampled_from(["", "https://", "http://"]), st.sampled_from(["", " ", "\t", "\n "]))
def test_case_scheme_and_surrounding_space_do_not_change_the_name(name: Name, scheme: str, space: str) -> None:
    shown = name.display()
    assert Name.parse(f"{space}{scheme}{shown}{space}") == Name.parse(shown)
    assert Name.parse(shown.swapcase()).key() == name.key()
