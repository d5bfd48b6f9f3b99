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
    "=: 1\n",
    "1: one\n2.5: two\nnull: n\nfalse: f\n",
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


@pytest.mark.parametrize(
    ("text", "problem", "line", "column"),
    [
        ("a: 1\nb: 2\na: 3\n", "duplicate key 'a', first given at line 1", 3, 1),
        ("gateway:\n  id: g\n  site: s1\n  area: a\n  site: s2\n",
         "duplicate key 'site', first given at line 3", 5, 3),
        ("devices:\n- name: d\n  tags: [a]\n  tags: [b]\n",
         "duplicate key 'tags', first given at line 3", 4, 3),
        ("{name: a, name: b}\n", "duplicate key 'name', first given at line 1", 1, 11),
        ("? [1][0]\n", None, None, None),  # (not a duplicate: a syntax error, as safe_load says)
        ("1: one\ntrue: t\n", "duplicate key True (the same key as 1), first given at line 1", 2, 1),
        ("base: &b {x: 1}\nc: {x: 0, <<: *b, x: 2}\n", "duplicate key 'x', first given at line 2", 2, 19),
        ("'a': 1\n\"a\": 2\n", "duplicate key 'a', first given at line 1", 2, 1),
    ],
)  # fmt: skip
def test_a_key_given_twice_is_refused_at_the_second(
    text: str, problem: str | None, line: int | None, column: int | None
) -> None:
    with pytest.raises(yaml.YAMLError) as err:
        yamlload.load(text)
    if problem is None:
        assert not isinstance(err.value, yamlload.Refused)
        return
    assert isinstance(err.value, yamlload.Refused)
    assert err.value.problem == f"{problem}: the second would silently replace the first"
    mark = err.value.problem_mark
    assert mark is not None
    assert (mark.line + 1, mark.column + 1) == (line, column)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("base: &b {x: 1, y: 2}\nc:\n  <<: *b\n  x: 3\n", {"x": 3, "y": 2}),
        ("c:\n  x: 3\n  <<: {x: 1, y: 2}\n", {"x": 3, "y": 2}),
        ("a: &a {x: 1}\nb: &b {x: 2, z: 2}\nc: {<<: [*a, *b], x: 3}\n", {"x": 3, "z": 2}),
        ("a: &a {x: 1}\nc:\n  <<: *a\n  <<: {x: 2, y: 2}\n", {"x": 1, "y": 2}),  # two merges: both
    ],
)
def test_keys_from_a_merge_given_again_are_no_duplicates(text: str, expected: dict[str, int]) -> None:
    """Overriding what `<<: *base` brought in is what merging is for."""
    assert yamlload.load(text)["c"] == expected


def _bomb(levels: int) -> str:
    """The "billion laughs": each level a list of nine aliases to the level before."""
    lines = ["l0: &l0 [x, x, x, x, x, x, x, x, x]"]
    lines += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, levels)]
    return "\n".join(lines) + "\n"


def _nodes(value: Any) -> int:
    """The values a document stands for, every alias expanded: each scalar, key and collection."""
    if isinstance(value, dict):
        return 1 + sum(1 + _nodes(v) for v in value.values())
    if isinstance(value, list):
        return 1 + sum(_nodes(v) for v in value)
    return 1


def test_an_alias_bomb_is_refused_at_the_alias_that_passes_the_limit() -> None:
    text = _bomb(9)  # 387 million strings once expanded
    assert yamlload.MAX_NODES == 2_000_000
    with pytest.raises(yamlload.Refused) as err:
        yamlload.load(text)
    assert err.value.problem == (
        "with *l5 expanded, the document stands for more than 2,000,000 values; a config needs far "
        "fewer (this is how a YAML alias bomb looks)"
    )
    mark = err.value.problem_mark
    assert mark is not None
    # l5 stands for 597,871 values; with l0 to l5 written out, the third *l5 passes 2,000,000.
    assert (mark.line + 1, mark.column + 1) == (7, len("l6: &l6 [*l5, *l5, ") + 1)


@pytest.mark.parametrize("over", [0, 1])
def test_the_limit_counts_every_value_of_the_expanded_document(over: int) -> None:
    # A list of 999 strings (1,000 values with the list) and a list holding `pad` strings and
    # then 1,998 aliases to it: exactly MAX_NODES values, or one more.
    pad = yamlload.MAX_NODES - (1 + 2 + 1_000 + 1) - 1_998 * 1_000 + over
    text = f"a: &a [{', '.join(['x'] * 999)}]\nb: [{', '.join(['y'] * pad + ['*a'] * 1_998)}]\n"
    if over:
        with pytest.raises(yamlload.Refused, match="more than 2,000,000 values"):
            yamlload.load(text)
    else:
        assert _nodes(yamlload.load(text)) == yamlload.MAX_NODES


def test_the_limit_admits_large_configs_with_room_to_spare() -> None:
    from bench.harness import modbus_config

    # `python -m bench scale` at 100,000 tags: 1,000 presses of 100 registers.
    scale = modbus_config(1883, 5020, Path("o.db"), devices=1_000, tags=100, poll="20s", fmt="uns")
    assert _nodes(scale) == 715_023
    assert 2.5 * _nodes(scale) < yamlload.MAX_NODES
    # 1,000 devices sharing one anchored list of 100 tags: small to parse, as large expanded.
    devices = "".join(f"- {{name: d{i}, protocol: modbus, host: h, tags: *tags}}\n" for i in range(1, 1_000))
    tags = "".join(f"  - {{name: r{i}, table: holding, address: {i}}}\n" for i in range(100))
    text = f"devices:\n- name: d0\n  protocol: modbus\n  host: h\n  tags: &tags\n{tags}{devices}"
    doc = yamlload.load(text)
    assert doc["devices"][999]["tags"] is doc["devices"][0]["tags"]
    assert 700_000 < _nodes(doc) < yamlload.MAX_NODES / 2.5


def test_an_alias_bomb_is_a_config_error_with_its_line() -> None:
    with pytest.raises(ConfigError) as err:
        config.parse(f"gateway:\n  id: g\n{_bomb(9)}", "plant.yaml", env={})
    assert err.value.problems == [
        "line 9, column 20: with *l5 expanded, the document stands for more than 2,000,000 values; a "
        "config needs far fewer (this is how a YAML alias bomb looks)"
    ]


def test_a_duplicate_key_is_a_config_error_with_its_line_and_column() -> None:
    text = "gateway:\n  id: edge-1\n  site: plant1\n  area: a\n  site: plant2\n"
    with pytest.raises(ConfigError) as err:
        config.parse(text, "plant.yaml", env={})
    assert err.value.problems == [
        "line 5, column 3: duplicate key 'site', first given at line 3: the second would silently "
        "replace the first"
    ]
