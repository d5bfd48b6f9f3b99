"""Config YAML to Python objects, built straight from the parser's events.

`yaml.safe_load` first composes the whole document as nodes, one per scalar with two
source marks each, and only then builds the objects. For a config of 100,000 tags (5 MB)
that took 7.7 s, and the process stayed 310 MB larger afterwards: the freed nodes had been
interleaved in memory with the objects that remain, so the allocator could not give the
space back. Here one event is alive at a time: the same file loads in 1.8 s, and the
process grows by the 56 MB of the objects themselves.

The result is what `safe_load` returns: the same resolver and constructors decide the type
of every scalar, an alias is the anchored object itself, and errors carry marks (also the
errors safe_load lets out unmarked, such as the ValueError of a date 2026-13-45). Merge keys
(`<<`) follow the YAML merge-key spec: explicit keys win, then the earlier mapping (PyYAML
6.0.4 lets the later one win for some keys).

Refused (`Refused`, with the mark of the culprit), where safe_load would go on:
- a key given twice in one mapping: safe_load keeps the last value, so a second `tags:` under
  a device silently replaced the first list. A key that a merge (`<<: *base`) brought in
  and the mapping then sets itself is no duplicate: that is what merging is for.
- aliases that make the document stand for more than `MAX_NODES` values (a "billion
  laughs" bomb: nine nested levels of nine aliases are 387 million strings). The loader
  shares the aliased objects, so it would finish at once; everything after it (the
  `${ENV}` pass, pydantic) walks the tree expanded, and would run out of memory.
- explicit tags on mappings and sequences (`!!set`, `!!omap`, `!!pairs`), and a collection
  that contains itself through an alias: a config has no use for them.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any, cast

import yaml
from yaml.composer import ComposerError
from yaml.constructor import ConstructorError
from yaml.error import Mark, MarkedYAMLError
from yaml.events import (
    AliasEvent,
    Event,
    MappingEndEvent,
    MappingStartEvent,
    ScalarEvent,
    SequenceEndEvent,
    SequenceStartEvent,
    StreamEndEvent,
)
from yaml.nodes import ScalarNode

_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml's parser when installed
_MAP = "tag:yaml.org,2002:map"
_SEQ = "tag:yaml.org,2002:seq"
_MERGE = "tag:yaml.org,2002:merge"
# Tags whose constructors build collections: on a scalar they are an error.
_COLLECTION_TAGS = {_MAP, _SEQ} | {f"tag:yaml.org,2002:{t}" for t in ("set", "omap", "pairs")}
_VALUE = "tag:yaml.org,2002:value"
_NO_KEY = object()  # a mapping awaits its next key
_MERGE_KEY = object()  # the scalar `<<`

# Values (scalars, keys and collections) a document may stand for, every alias expanded.
# The largest configs we know of are the 100,000-tag config of `python -m bench scale`
# (1,000 devices of 100 tags: 715,000 values) and 1,000 devices sharing one anchored list of
# 100 tags (711,000 once expanded); this admits 2.8 times that. What it admits stays cheap:
# 2,800 devices sharing a list of 100 tags (280,000 tags, just under the limit) load in
# 3.3 s with a peak of 306 MB on the 2-core development machine, where the bomb grew by
# 35 MB/s without end. A lower limit would refuse real plants for no gain.
MAX_NODES = 2_000_000


class Refused(MarkedYAMLError):
    """Valid YAML that a config may not contain; `problem_mark` is where it is."""

    def __init__(self, problem: str, mark: Mark) -> None:
        super().__init__(None, None, problem, mark)


class _Mapping:
    """A mapping being built: its explicit pairs, its merges, and a key awaiting its value."""

    __slots__ = ("key", "keys", "merges", "value")

    def __init__(self) -> None:
        self.value: dict[Any, Any] = {}
        self.key: Any = _NO_KEY
        self.merges: list[dict[Any, Any]] = []  # merged mappings, in order of precedence
        # The event of each explicit key, for the line of the first when one comes twice (the
        # event, not its line: that would cost a call per key, and duplicates are rare).
        self.keys: dict[Any, Event] = {}


def load(text: str) -> Any:
    """The single document in `text` (None when there is none), as `yaml.safe_load` builds it.
    Raises `yaml.YAMLError` subclasses with the problem's mark."""
    loader = _LOADER(text)
    try:
        loader.get_event()  # StreamStart
        if loader.check_event(StreamEndEvent):
            return None
        loader.get_event()  # DocumentStart
        value = _document(loader)
        loader.get_event()  # DocumentEnd
        if not loader.check_event(StreamEndEvent):
            event = loader.get_event()
            raise ComposerError(
                "expected a single document in the stream",
                None,
                "but found another document",
                _at(event),
            )
        return value
    finally:
        loader.dispose()


def _document(loader: Any) -> Any:
    """Build the document's root node; an explicit stack, so nesting depth costs no recursion."""
    anchors: dict[str, Any] = {}
    sizes: dict[str, int] = {}  # values each anchored node stands for, aliases in it expanded
    stack: list[list[Any] | _Mapping] = []  # the open collections, innermost last
    starts: list[Any] = []  # and the events that opened them (their anchors and marks)
    # The values of the document so far, every alias expanded, and that count as it was
    # when each open collection began: its size, at its end, is the difference.
    nodes = 0
    before: list[int] = []
    while True:
        event = loader.get_event()
        value: Any
        if isinstance(event, ScalarEvent):
            nodes += 1
            value = _scalar(loader, event)
            if event.anchor is not None:
                _anchor(anchors, event, value)
                sizes[event.anchor] = 1
        elif isinstance(event, AliasEvent):
            if event.anchor not in anchors:
                raise ComposerError(None, None, f"found undefined alias {event.anchor!r}", _at(event))
            if any(start.anchor == event.anchor for start in starts):
                # safe_load builds such a structure; nothing in a config can use one, and
                # everything after the loader would recurse on it forever.
                raise Refused(f"*{event.anchor} refers to a collection from inside it", _at(event))
            nodes += sizes[event.anchor]
            if nodes > MAX_NODES:
                raise Refused(
                    f"with *{event.anchor} expanded, the document stands for more than {MAX_NODES:,} "
                    "values; a config needs far fewer (this is how a YAML alias bomb looks)",
                    _at(event),
                )
            value = anchors[event.anchor]
        elif isinstance(event, SequenceStartEvent | MappingStartEvent):
            default = _SEQ if isinstance(event, SequenceStartEvent) else _MAP
            if event.tag not in (None, "!", default):
                raise Refused(f"the tag {event.tag} is not supported in a config file", _at(event))
            container: list[Any] | _Mapping = [] if default == _SEQ else _Mapping()
            if event.anchor is not None:
                _anchor(anchors, event, container if isinstance(container, list) else container.value)
            stack.append(container)
            starts.append(event)
            before.append(nodes)
            nodes += 1
            continue
        elif isinstance(event, SequenceEndEvent | MappingEndEvent):
            container, event = stack.pop(), starts.pop()
            if event.anchor is not None:
                sizes[event.anchor] = nodes - before.pop()
            else:
                before.pop()
            value = container if isinstance(container, list) else _finish(container)
        else:  # pragma: no cover - the parser emits nothing else inside a document
            raise ComposerError(None, None, f"unexpected {type(event).__name__}", _at(event))
        if not stack:
            if value is _MERGE_KEY:
                _undefined(loader, event)
            return value
        _add(loader, stack[-1], starts[-1], value, event)


def _anchor(anchors: dict[str, Any], event: Any, value: Any) -> None:
    if event.anchor in anchors:  # as safe_load: an anchor names one node
        raise ComposerError(None, None, f"found duplicate anchor {event.anchor!r}", _at(event))
    anchors[event.anchor] = value


def _at(event: Event) -> Mark:
    """Where the event starts. (libyaml's marks stand in for PyYAML's: same attributes.)"""
    return cast(Mark, event.start_mark)


def _end(event: Event) -> Mark:
    return cast(Mark, event.end_mark)


def _scalar(loader: Any, event: ScalarEvent) -> Any:
    tag = event.tag
    if tag is None or tag == "!":
        tag = loader.resolve(ScalarNode, event.value, event.implicit)
    if tag == _MERGE:
        return _MERGE_KEY
    if tag == _VALUE:  # `=`: safe_load reads it as a string key
        tag = "tag:yaml.org,2002:str"
    node = ScalarNode(tag, event.value, _at(event), _end(event), event.style)
    if tag in _COLLECTION_TAGS:
        raise ConstructorError(None, None, f"the tag {tag} does not fit a scalar", _at(event))
    construct = loader.yaml_constructors.get(tag) or loader.yaml_constructors[None]
    try:
        return construct(loader, node)
    except yaml.YAMLError:
        raise
    except Exception as exc:
        # (ValueError), !!int "" (IndexError), !!bool maybe (KeyError), ...
        kind = tag.rsplit(":", 1)[-1]  # tag:yaml.org,2002:timestamp -> timestamp
        detail = f": {exc}" if isinstance(exc, ValueError) else ""
        raise ConstructorError(
            None, None, f"{event.value!r} is not a valid {kind}{detail}", _at(event)
        ) from None


def _undefined(loader: Any, event: Event) -> None:
    """`<<` anywhere but as a key: the error safe_load gives (no constructor for the tag)."""
    loader.construct_undefined(ScalarNode(_MERGE, "<<", _at(event), _end(event)))


def _add(loader: Any, parent: list[Any] | _Mapping, opened: Event, value: Any, event: Event) -> None:
    """Put `value` (made from `event`) into `parent`, the collection that `opened` began."""
    if isinstance(parent, list):
        if value is _MERGE_KEY:
            _undefined(loader, event)
        parent.append(value)
    elif parent.key is _NO_KEY:
        if not isinstance(value, Hashable):
            raise ConstructorError(
                "while constructing a mapping",
                _at(opened),
                "found unhashable key",
                _at(event),
            )
        if value is not _MERGE_KEY and parent.keys.setdefault(value, event) is not event:
            _duplicate(parent, value, event)
        parent.key = value
    else:
        if value is _MERGE_KEY:
            _undefined(loader, event)
        if parent.key is _MERGE_KEY:
            _merge(parent, opened, value, event)
        else:
            parent.value[parent.key] = value
        parent.key = _NO_KEY


def _duplicate(parent: _Mapping, key: Any, event: Event) -> None:
    # The first key may differ from this one and still be equal to it: 1 and true, 1 and 1.0.
    first = next(k for k in parent.keys if k == key)
    same = "" if repr(first) == repr(key) else f" (the same key as {first!r})"
    raise Refused(
        f"duplicate key {key!r}{same}, first given at line {_at(parent.keys[first]).line + 1}: the second "
        "would silently replace the first",
        _at(event),
    )


def _merge(parent: _Mapping, opened: Event, value: Any, event: Event) -> None:
    """`<<: mapping` or `<<: [mappings]`."""
    found = value if isinstance(value, list) else [value]
    for m in found:
        if not isinstance(m, dict):
            kind = "sequence" if isinstance(m, list) else "scalar"
            expected = "a mapping" if m is not value else "a mapping or list of mappings"
            raise ConstructorError(
                "while constructing a mapping",
                _at(opened),
                f"expected {expected} for merging, but found {kind}",
                _at(event),
            )
    parent.merges.extend(found)


def _finish(mapping: _Mapping) -> dict[Any, Any]:
    d = mapping.value
    if mapping.merges:
        merged: dict[Any, Any] = {}
        for m in mapping.merges:  # the first merged mapping wins
            for key, value in m.items():
                merged.setdefault(key, value)
        merged.update(d)
        d.clear()  # the same dict: an alias to this mapping's anchor already points at it
        d.update(merged)
    return d
