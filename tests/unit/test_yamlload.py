"""The event-built config loader against PyYAML's own safe loader (libyaml's where built)."""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway import config, yamlload
from gateway.errors import ConfigError

REFERENCE = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
ROOT = Path(__file__).resolve().parents[2]

SAME = [
    "",
    "# only a comment\n",
    "42\n",
    "- a\n- 1\n- 1.5\n- true\n- ~\n- 2026-11-27\n- 2026-11-27T10:00:00Z\n- 0x1F\n- 0o17\n- 1_000\n"
    "- .inf\n- '1'\n- !!str 2\n- !!float 3\n- !!binary aGVsbG8=\n- yes\n- Off\n- ''\n- null\n",
    "x: &s hello\ny: *s\nlist: &l [1, 2]\nl2: *l\n",
    "dup: 1\ndup: 2\n",
    "=: 1\n",
    "1: one\n2.5: two\nnull: n\ntrue: t\n",
    "{a: [1, {b: [2, 3]}], c: {d: {e: f}}}\n",
    "a: 'multi\n  line'\nb: |\n  block\n  text\nc: >\n  folded\n  text\nd: \"esc\\tape\"\n",
    "base: &b {x: 1, y: 2}\nother:\n  <<: *b\n  y: 3\n",
    "c:\n  y: 9\n  <<: {y: 1, q: 2}\n",
    "defaults: &d {poll: 1s, unit: Cel}\ndevices:\n- {<<: *d, name: a}\n- {<<: *d, name: b, poll: 5s}\n",
    "--- {a: 1}\n...\n",
]


def reference(text: str) -> Any:
    return yaml.load(text, Loader=REFERENCE)


@pytest.mark.parametrize("text", SAME)
def test_same_objects_as_safe_load(text: str) -> None:
    assert yamlload.load(text) == reference(text)


@pytest.mark.parametrize("path", sorted((ROOT / "config").glob("*.yaml")), ids=lambda p: p.name)
def test_the_bundled_configs_load_the_same(path: Path) -> None:
    text = path.read_text()
    assert yamlload.load(text) == reference(text)


def test_types_are_those_of_safe_load() -> None:
    doc = yamlload.load("[1, 1.5, true, ~, 2026-11-27, '7', !!binary aGk=]")
    assert [type(v) for v in doc] == [int, float, bool, type(None), datetime.date, str, bytes]


def test_an_alias_is_the_anchored_object_itself() -> None:
    doc = yamlload.load("a: &x [1]\nb: *x\nc: &s text\nd: *s\n")
    assert doc["a"] is doc["b"]
    assert doc["c"] is doc["d"]


@pytest.mark.parametrize("text", ["m: &m {self: *m}\n", "a: &a [1, [*a]]\n"])
def test_a_collection_inside_itself_is_refused(text: str) -> None:
    assert reference(text)  # safe_load builds it; the config would recurse on it forever
    with pytest.raises(yaml.YAMLError, match="refers to a collection from inside it"):
        yamlload.load(text)


def test_a_second_anchor_of_the_same_name_is_refused_as_safe_load_does() -> None:
    with pytest.raises(yaml.YAMLError, match="duplicate anchor"):
        reference("a: &x 1\nb: &x 2\n")
    with pytest.raises(yaml.YAMLError, match="duplicate anchor 'x'"):
        yamlload.load("a: &x 1\nb: &x 2\n")


def test_merge_keys_follow_the_spec_explicit_first_then_the_earlier_mapping() -> None:
    # yaml.org/type/merge.html: keys of the earlier mapping in the sequence override the later.
    doc = yamlload.load("a: &a {speed: 1, x: 1}\nb: &b {speed: 2, x: 2, z: 2}\nc:\n  <<: [*a, *b]\n  x: 3\n")
    assert doc["c"] == {"speed": 1, "x": 3, "z": 2}
    assert list(doc["c"]) == ["speed", "x", "z"]  # merged keys first, the earlier mapping's first


def test_nested_merges_follow_the_spec() -> None:
    # m1 is {y: 1, z: 1} (its own keys beat what it merges), so m2 merges z: 1.
    doc = yamlload.load("m0: &m0 {y: 0, z: 0}\nm1: &m1 {z: 1, <<: [*m0], y: 1}\nm2: {<<: *m1, y: 2}\n")
    assert doc["m1"] == {"y": 1, "z": 1}
    assert doc["m2"] == {"y": 2, "z": 1}


@pytest.mark.parametrize(
    ("text", "problem", "line"),
    [
        ("a: *nope\n", "found undefined alias 'nope'", 1),
        ("--- 1\n--- 2\n", "but found another document", 2),
        ("? [1, 2]\n: x\n", "found unhashable key", 1),
        ("a: <<\n", "could not determine a constructor for the tag 'tag:yaml.org,2002:merge'", 1),
        ("a:\n  <<: 5\n", "expected a mapping or list of mappings for merging, but found scalar", 2),
        ("a: [1, 2\n", None, 2),
        ("key: value: bad\n", None, 1),
    ],
)
def test_errors_are_those_of_safe_load(text: str, problem: str | None, line: int) -> None:
    with pytest.raises(yaml.YAMLError) as expected:
        reference(text)
    with pytest.raises(yaml.YAMLError) as got:
        yamlload.load(text)
    assert type(got.value) is type(expected.value)
    # libyaml leaves the alias's name out of "found undefined alias"; we name it.
    assert got.value.problem.startswith(expected.value.problem)  # type: ignore[attr-defined]
    if problem is not None:
        assert got.value.problem == problem  # type: ignore[attr-defined]
    mark = got.value.problem_mark  # type: ignore[attr-defined]
    assert (mark.line + 1, mark.column) == (line, expected.value.problem_mark.column)  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("a: 1\ns: !!set {a, b}\n", r"tag:yaml\.org,2002:set is not supported"),
        ("a: 1\ns: !!map foo\n", r"tag:yaml\.org,2002:map does not fit a scalar"),
        ("a: 1\ns: !!seq\n", r"tag:yaml\.org,2002:seq does not fit a scalar"),
    ],
)
def test_collection_tags_are_refused_with_their_line(text: str, problem: str) -> None:
    with pytest.raises(yaml.YAMLError, match=problem) as err:
        yamlload.load(text)
    assert err.value.problem_mark.line == 1  # type: ignore[attr-defined]


@pytest.mark.parametrize("scalar", ["2026-13-45", '!!int ""', "!!float _", "!!bool maybe", "!!timestamp foo"])
def test_scalars_safe_load_fails_on_without_a_mark_get_one(scalar: str) -> None:
    with pytest.raises(Exception) as expected:  # noqa: PT011 - ValueError, IndexError, KeyError, ...
        reference(f"a: 1\nb: {scalar}\n")
    assert not isinstance(expected.value, yaml.YAMLError)
    with pytest.raises(yaml.YAMLError) as err:
        yamlload.load(f"a: 1\nb: {scalar}\n")
    assert err.value.problem_mark.line == 1  # type: ignore[attr-defined]


def test_deep_nesting_needs_no_recursion() -> None:
    depth = 900  # libyaml refuses more than 1,000 levels
    doc = yamlload.load("[" * depth + "]" * depth)
    for _ in range(depth - 1):
        doc = doc[0]
    assert doc == []


def test_a_config_nested_too_deeply_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="nested too deeply"):
        config.parse("gateway:\n  x: " + "[" * 900 + "]" * 900 + "\n", "plant.yaml", env={})


def test_a_file_that_is_not_utf8_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "plant.yaml"
    path.write_bytes(b"gateway:\n  id: caf\xe9\n")
    with pytest.raises(ConfigError, match=r"(?s)plant\.yaml.*not UTF-8 text \(byte 18\)"):
        config.load(path)


def test_an_impossible_date_is_a_config_error_with_its_line() -> None:
    # safe_load raises a bare ValueError here, which would have escaped as a traceback.
    with pytest.raises(
        ConfigError,
        match=r"line 2, column \d+: not valid YAML: '2026-13-45' is not a valid timestamp: month must",
    ):
        config.parse("gateway:\n  installed: 2026-13-45\n", "plant.yaml", env={})
