"""Registry tags (bkn.methods.names(tag=...)): the named subsets every part of the suite asks for."""

from __future__ import annotations

import pathlib
import re

import pytest

from bkn import methods

ROOT = pathlib.Path(__file__).resolve().parents[1]
TAG_QUERY = re.compile(r"names\(tag=\"([^\"]+)\"\)")


def _tags_used_in_code() -> set[str]:
    used = set()
    for folder in ("bkn", "suites", "analysis"):
        for path in (ROOT / folder).rglob("*.py"):
            used.update(TAG_QUERY.findall(path.read_text(encoding="utf-8")))
    return used


def test_names_without_a_tag_is_every_method_in_registry_order():
    assert methods.names() == tuple(m.name for m in methods.resolve(methods.names()))
    assert methods.names()[:3] == ("bn", "bkn-official", "bkn-official-adaptive")


@pytest.mark.parametrize("tag", sorted(methods.TAGS))
def test_a_tag_gives_its_methods_in_registry_order(tag):
    tagged = methods.names(tag=tag)
    assert tagged, f"tag {tag!r} has no methods"
    order = methods.names()
    assert list(tagged) == sorted(tagged, key=order.index)
    assert all(tag in methods.get(name).tags for name in tagged)
    assert set(tagged) == {n for n in order if tag in methods.get(n).tags}


def test_unknown_tag_lists_the_known_ones():
    with pytest.raises(ValueError, match="unknown method tag 'no-such-tag'") as err:
        methods.names(tag="no-such-tag")
    assert all(tag in str(err.value) for tag in methods.TAGS)


def test_every_tag_used_in_code_is_known_and_non_empty():
    used = _tags_used_in_code()
    assert {"headline", "matrix", "speed", "core", "quick", "training", "distributed"} <= used  # the scan works
    for tag in used:
        assert methods.names(tag=tag), f"names(tag={tag!r}) is empty"


def test_the_subsets_the_suite_relied_on_are_kept():
    # What each hand-kept list held before it became a tag (set equality: the order is the registry's).
    rivals = {"gn-ws", "frn", "evonorm-b0", "evonorm-s0", "mabn", "cbn"}  # issue 25: layer and network benchmarks
    assert set(methods.names(tag="matrix")) == {"bn", "bkn-official", "bkn-analytic", "brn", "gn", "ln", "in"} | rivals
    assert rivals <= set(methods.names(tag="training"))
    assert set(methods.names(tag="speed")) == {"bn", "bkn-official", "bkn-analytic", "brn", "gn"}
    assert set(methods.names(tag="distributed")) == {"bn", "syncbn", "bkn-official", "bkn-analytic"}
    assert methods.names(tag="core") == ("bn", "bkn-official", "bkn-analytic")
    assert methods.names(tag="quick") == ("bn", "bkn-official", "bkn-analytic", "gn")
    # One headline set for the drift probe's printed tables and the report's figure (the union of both old lists).
    assert methods.names(tag="headline") == (
        "bn",
        "bkn-official",
        "bkn-official-adaptive",
        "bkn-analytic",
        "bkn-analytic-adaptive",
        "brn",
    )
    training = methods.names(tag="training")
    assert "syncbn" not in training and "in" not in training
    assert not any(str(methods.get(n).options.get("transition", "")).startswith("official-") for n in training)


def test_an_unknown_tag_on_an_entry_is_refused():
    with pytest.raises(ValueError, match="unknown tags"):
        methods._method("x", "bn", "X", "#000000", "test entry", tags=("not-a-tag",))
