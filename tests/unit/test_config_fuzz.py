"""Property-based fuzzing of config loading, from the bundled example configs.

The examples (config/*.yaml) are mutated at random, as text (lines deleted, duplicated,
swapped or re-indented; characters inserted: control characters, YAML syntax such as `&`,
`*`, `<<`, `!!tag`, `{`) and as data (a value replaced by a scalar of another type or a
nested structure, a key deleted or added), and handed to `config.parse`. The property:

- the result is a `Settings`, or a `ConfigError`, never any other exception, and never a
  hang (each example runs under a SIGALRM timeout; the loader's node limit is what makes a
  hang impossible);
- every problem of a ConfigError is one line that says where it is: either `line L, column
  C: ` with L within the text (one past its end at most: the end of the stream), or a key
  path followed by `: ` that exists in the loaded document (every part of it; the last part
  may be missing when the problem is `required key is missing`), or `(top level): `, or one
  of the few problems of the whole file (empty, not a mapping, nested too deeply).

Among the examples is a config with two outputs (config/two-outputs.yaml), so that the
checks across outputs (names, brokers and client ids, Sparkplug edge nodes) are fuzzed too.
"""

from __future__ import annotations

import ast
import copy
import re
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from gateway import config, yamlload
from gateway.errors import ConfigError
from tests.examples import SHIPPED, example_files

ROOT = Path(__file__).resolve().parents[2]
# The cloud examples' /etc/millwright/ files are made beside the fuzzed file (see `tmp`).
FILES = "etc-millwright"
EXAMPLES = {
    p.name: p.read_text(encoding="utf-8").replace(SHIPPED, f"./{FILES}/")
    for p in sorted((ROOT / "config").glob("*.yaml"))
}
ENV = {"MQTT_USERNAME": "gateway", "MQTT_PASSWORD": "secret", "OPCUA_PASSWORD": "secret"}
TWO_OUTPUTS = "two-outputs.yaml"
# Per example: a loaded machine parses these files in milliseconds; only a hang takes this long.
TIMEOUT = 10.0

LOCATION = re.compile(r"line (\d+), column (\d+): \S")
WHOLE_FILE = {
    "the file is empty",
    "the top level must be a mapping (gateway:, outbox:, outputs:, devices:)",
    "nested too deeply",
}
# The parts of a key path as config._key_path writes them: .name, [index], ['quoted key'].
PART = re.compile(r"""\.?([A-Za-z_][A-Za-z0-9_-]*)|\[(\d+)\]|\[('(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*")\]""")


class Hang(Exception):
    """An example ran past TIMEOUT."""


@contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    def expire(signum: int, frame: FrameType | None) -> None:
        raise Hang(f"config.parse ran for more than {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _path_parts(problem: str) -> tuple[list[str | int], str] | None:
    """The key path at the start of `problem` and the message after it, or None."""
    parts: list[str | int] = []
    pos = 0
    while not problem.startswith(": ", pos):
        m = PART.match(problem, pos)
        if m is None or (pos == 0 and problem[0] == "."):
            return None
        name, index, quoted = m.groups()
        if name is not None:
            parts.append(name)
        else:
            parts.append(int(index) if index is not None else ast.literal_eval(quoted))
        pos = m.end()
    return (parts, problem[pos + 2 :]) if parts else None


def _resolves(doc: Any, parts: list[str | int], message: str) -> bool:
    node = doc
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(part, int):
            if not isinstance(node, list) or part >= len(node):
                return False
            node = node[part]
            continue
        if not isinstance(node, dict):
            return False
        # A key that is not text appears as written: 1 for the key 1, None for null.
        key = next((k for k in node if k == part or (not isinstance(k, str) and repr(k) == part)), None)
        if key is None and part not in node:
            # (`outputs: required key is missing (or mqtt: for a single output)`)
            return last and message.startswith("required key is missing")
        node = node[key if key is not None else part]
    return True


def check_problems(text: str, err: ConfigError) -> None:
    """Every problem is one line and says where it is (see the module docstring)."""
    assert err.problems, "a ConfigError with no problem"
    try:
        doc = yamlload.load(text)
    except yaml.YAMLError:
        doc = None  # then only a line and column can say where
    lines = text.count("\n") + 1
    for problem in err.problems:
        assert "\n" not in problem, problem
        assert "\r" not in problem, problem
        if problem in WHOLE_FILE or problem.startswith("(top level): "):
            continue
        if m := LOCATION.match(problem):
            assert 1 <= int(m.group(1)) <= lines + 1, problem
            assert int(m.group(2)) >= 1, problem
            continue
        found = _path_parts(problem)
        assert found is not None, f"names no place: {problem!r}"
        assert _resolves(doc, *found), f"{problem!r}: no such key path in the document"


def parse(text: str, tmp: Path) -> None:
    with time_limit(TIMEOUT):
        try:
            result = config.parse(text, str(tmp / "gateway.yaml"), env=ENV)
        except ConfigError as err:
            check_problems(text, err)
        else:
            assert isinstance(result, config.Settings)


@pytest.fixture(scope="module")
def tmp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The config files' folder: relative paths in them resolve here (not in the checkout)."""
    folder = tmp_path_factory.mktemp("fuzz")
    (folder / FILES).mkdir()
    example_files(folder / FILES)
    return folder


# -- mutations of the text ------------------------------------------------------------------

SNIPPETS = [
    "&a ", "*a", "*nope", "<<: *a", "<<: ", "!!str ", "!!set ", "!!binary ", "!!int ", "!!float ",
    "!!map ", "!custom ", "{", "}", "[", "]", ", ", ": ", "- ", "? ", "# ", "'", '"', "|", ">", "---",
    "...", "%YAML 1.1", "@", "`", "${X}", "${MQTT_PASSWORD}", "\t", "\0", "\x01", "\x1f", "\x7f", "\x85",
    "\ufeff", "\ufffe", "\u2028", "~", "null", "1e400", ".nan", ".inf", "-.inf", "0x1F", "0o17",
    "99999999999999999999999", "true", "yes", "2026-13-45", "&b [*b]", '"\\0"', '"\\x01"', '"\\uFFFE"',
    "\n", "\n  ", "\r\n",
]  # fmt: skip
OPERATIONS = ("delete", "duplicate", "swap", "insert", "indent")


@st.composite
def mutated_texts(draw: st.DrawFn) -> str:
    lines = EXAMPLES[draw(st.sampled_from(sorted(EXAMPLES)))].splitlines(keepends=True)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(OPERATIONS))
        if not lines:
            lines = [""]
        i = draw(st.integers(0, len(lines) - 1))
        if op == "delete":
            del lines[i]
        elif op == "duplicate":
            lines.insert(i, lines[i])
        elif op == "swap":
            j = draw(st.integers(0, len(lines) - 1))
            lines[i], lines[j] = lines[j], lines[i]
        elif op == "indent":
            delta = draw(st.integers(-4, 4))
            stripped = lines[i].lstrip(" ")
            lines[i] = " " * max(0, len(lines[i]) - len(stripped) + delta) + stripped
        else:
            noise = draw(st.sampled_from(SNIPPETS) | st.text(max_size=6))
            col = draw(st.integers(0, len(lines[i])))
            lines[i] = lines[i][:col] + noise + lines[i][col:]
    return "".join(lines)


# A document that is a YAML bomb once the alias to the innermost level is expanded.
BOMB = "".join(f"l{i}: &l{i} [{', '.join(['*l' + str(i - 1)] * 9 if i else ['x'] * 9)}]\n" for i in range(9))


@settings(max_examples=250, suppress_health_check=[HealthCheck.too_slow])
@given(text=mutated_texts())
@example(text=EXAMPLES["example.yaml"] + BOMB)
@example(text=EXAMPLES["demo.yaml"].replace("  area: press-shop\n", "  area: press-shop\n  site: again\n"))
@example(text=EXAMPLES["example.yaml"].replace("  id: edge-1", '  id: "edge\\0"'))
@example(text="gateway: {a: 1}\n" + "\x01")
@example(text=EXAMPLES[TWO_OUTPUTS].replace("outputs:\n", "mqtt: {url: mqtt://127.0.0.1:1883}\noutputs:\n"))
def test_mutated_config_text_loads_or_names_the_place(text: str, tmp: Path) -> None:
    parse(text, tmp)


# -- mutations of the data ------------------------------------------------------------------

KEYS = [
    "name", "protocol", "tags", "devices", "mqtt", "outputs", "url", "ca", "cert", "key", "tls_insecure",
    "password", "group_id", "edge_node_id",
    "password_file", "username", "client_id", "security", "server_certificate", "asset", "sparkplug",
    "format", "poll", "timeout", "reconnect_max", "scale", "address", "table", "type", "port", "max_bytes",
]  # fmt: skip
TEXTS = [
    "", " ", "1s", "500ms", "25h", "0s", "1e400", "nan", "inf", "mqtt://127.0.0.1:1883", "mqtts://h:8883",
    "opc.tcp://h:4840", "modbus", "opcua", "holding", "coil", "float32", "string", "sparkplug", "uns",
    "a/b", "+", "#", "${X}", "${MQTT_USERNAME}", "7a63fd", "/", ".", "..", "~nobody-here/x", "ns=2;s=x",
    "local", "scada", "millwright-edge-1-local",
    "press\0", "\x01\x1f\x7f\x85", "\ufdd0\ufffe\U0001ffff", "line\nbreak", "caf\u00e9", "é" * 40,
]  # fmt: skip
SCALARS = (
    st.integers(-(2**70), 2**70)
    | st.sampled_from([0, -1, 1, 65_535, 65_536, 2**63, 10**30, 10**400])
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.booleans()
    | st.none()
    | st.sampled_from(TEXTS)
    | st.text(st.characters(exclude_categories=("Cs",)), max_size=12)
    | st.just([])
    | st.just({})
)
KEY_NAMES = st.sampled_from(KEYS) | st.text(max_size=5)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(KEY_NAMES, inner, max_size=3),
    max_leaves=6,
)


def _slots(node: Any) -> Iterator[tuple[Any, Any]]:
    """Every (container, key or index) of a document, depth first."""
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, value in items:
        yield node, key
        yield from _slots(value)


@st.composite
def mutated_documents(draw: st.DrawFn) -> str:
    doc = copy.deepcopy(DOCS[draw(st.sampled_from(sorted(DOCS)))])
    for _ in range(draw(st.integers(1, 3))):
        slots = list(_slots(doc))
        op = draw(st.sampled_from(("replace", "delete", "add", "copy")))
        if not slots:
            break
        container, key = draw(st.sampled_from(slots))
        if op == "copy" and isinstance(container, list):
            # A list item twice, in full or changed: two outputs (or devices, tags) that the
            # checks across the list must tell apart.
            container.insert(draw(st.integers(0, len(container))), copy.deepcopy(container[key]))
        elif op == "replace":
            container[key] = draw(VALUES)
        elif op == "delete":
            del container[key]
        elif isinstance(container, dict):
            container[draw(KEY_NAMES)] = draw(VALUES)
        else:
            container.insert(draw(st.integers(0, len(container))), draw(VALUES))
    return yaml.safe_dump(doc, allow_unicode=True)


DOCS = {name: yaml.safe_load(text) for name, text in EXAMPLES.items()}


@settings(max_examples=250, suppress_health_check=[HealthCheck.too_slow])
@given(text=mutated_documents())
def test_mutated_config_data_loads_or_names_the_place(text: str, tmp: Path) -> None:
    parse(text, tmp)


def test_a_two_output_example_is_among_the_fuzzed() -> None:
    assert [o["format"] for o in DOCS[TWO_OUTPUTS]["outputs"]] == ["uns", "sparkplug"]


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_the_unmutated_examples_load(name: str, tmp: Path) -> None:
    assert isinstance(config.parse(EXAMPLES[name], str(tmp / name), env=ENV), config.Settings)


@pytest.mark.parametrize(
    ("problem", "ok"),
    [
        ("devices[0].tags[2].address: Input should be ...", True),
        ("devices[0].colour: unknown key", True),
        ("devices[0].host: required key is missing", True),
        ("devices[0].nope.deeper: required key is missing", False),
        ("devices[7]: Input should be ...", False),
        ("gateway['my key']: unknown key", True),
        ("line 3, column 1: duplicate key 'a'", True),
        ("line 99, column 1: x", False),
        ("something went wrong", False),
        ("devices[0].name: two\nlines", False),
    ],
)
def test_the_property_itself(problem: str, ok: bool) -> None:
    """check_problems accepts what it should, and refuses what it should."""
    text = "devices:\n- {name: d, colour: red, tags: [{}, {}, {address: x}]}\ngateway: {'my key': 1}\n"
    err = ConfigError("f.yaml", [problem])
    if ok:
        check_problems(text, err)
    else:
        with pytest.raises(AssertionError):
            check_problems(text, err)
