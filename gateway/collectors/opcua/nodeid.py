"""OPC UA node ids in their string form (OPC 10000-6 §5.3.1.10), parsed without asyncua.

    [ns=<index>;|nsu=<namespace uri>;]<kind>=<identifier>

    kind  identifier
    i     an unsigned 32-bit number                      i=2258
    s     a string: everything after `s=`, `;` included   ns=2;s=CNC1.Spindle.Speed
    g     a GUID, 8-4-4-4-12 hex digits                  g=09087e75-8e5e-499b-954f-f2a9603db28a
    b     a ByteString in base64                         b=M/RbKBsRVkePCePcx24oRA==

Without a namespace the index is 0 (the OPC UA namespace). A namespace URI (`nsu=`) is
the stable way to name a node: servers may renumber their namespace indexes after a
restart or an update, so the collector resolves URIs to indexes on every connect. A `;`
or `%` inside the URI is written percent-escaped (`%3B`, `%25`); the `s=` identifier
needs no escaping because it always runs to the end of the string.

Parsing lives here, free of asyncua, so that `millwright check` validates node ids without
importing the protocol stack.
"""

from __future__ import annotations

import base64
import binascii
import re
import uuid
from dataclasses import dataclass
from typing import Literal, cast

Kind = Literal["i", "s", "g", "b"]
Identifier = int | str | uuid.UUID | bytes

_GUID = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")
_KINDS = ("i", "s", "g", "b")
# Only the two escapes format_node writes are undone, so any other %XX in a URI stays as is.
_ESCAPED = re.compile(r"%(3B|25)", re.IGNORECASE)
_UNESCAPE = {"%3B": ";", "%25": "%"}
_MAX_INDEX = 0xFFFF
_MAX_NUMERIC = 0xFFFFFFFF


@dataclass(frozen=True, slots=True)
class NodeRef:
    """A parsed node id. `namespace` is an index (int) or a namespace URI (str)."""

    namespace: int | str
    kind: Kind
    identifier: Identifier

    def __str__(self) -> str:
        return format_node(self)


def parse_node(text: str) -> NodeRef:
    """Parse the string form of a node id; raise ValueError saying what is wrong."""
    if not text or text != text.strip():
        raise ValueError("a node id must be non-empty, without surrounding spaces, e.g. ns=2;s=Machine.Speed")
    namespace: int | str = 0
    rest = text
    if rest.startswith("ns="):
        index, sep, rest = rest[3:].partition(";")
        if not sep:
            raise ValueError(f"{text!r}: expected ';' after ns=<index>, then i=, s=, g= or b=")
        namespace = _index(index, text)
    elif rest.startswith("nsu="):
        uri, sep, rest = rest[4:].partition(";")
        if not sep or not uri:
            raise ValueError(f"{text!r}: expected nsu=<uri>; then i=, s=, g= or b= (write ';' as %3B)")
        namespace = _ESCAPED.sub(lambda m: _UNESCAPE[m.group(0).upper()], uri)
    kind, sep, value = rest.partition("=")
    if not sep or kind not in _KINDS:
        raise ValueError(
            f"{text!r}: expected i=<number>, s=<string>, g=<guid> or b=<base64> after the namespace"
        )
    return NodeRef(namespace, cast(Kind, kind), _identifier(kind, value, text))


def format_node(node: NodeRef) -> str:
    """The string form of `node`; `parse_node(format_node(n)) == n`."""
    if isinstance(node.namespace, str):
        # Escape what would end the URI early, and the escape character itself.
        uri = node.namespace.replace("%", "%25").replace(";", "%3B")
        prefix = f"nsu={uri};"
    elif node.namespace:
        prefix = f"ns={node.namespace};"
    else:
        prefix = ""
    ident = node.identifier
    value = base64.b64encode(ident).decode("ascii") if isinstance(ident, bytes) else str(ident)
    return f"{prefix}{node.kind}={value}"


def _index(text: str, whole: str) -> int:
    if not text.isdigit():
        raise ValueError(f"{whole!r}: namespace index {text!r} is not a number")
    index = int(text)
    if index > _MAX_INDEX:
        raise ValueError(f"{whole!r}: namespace index {index} is above {_MAX_INDEX}")
    return index


def _identifier(kind: str, value: str, whole: str) -> Identifier:
    if kind == "i":
        if not value.isdigit() or int(value) > _MAX_NUMERIC:
            raise ValueError(f"{whole!r}: i= takes a number from 0 to {_MAX_NUMERIC}")
        return int(value)
    if kind == "s":
        if not value:
            raise ValueError(f"{whole!r}: s= needs a string identifier")
        return value
    if kind == "g":
        if not _GUID.match(value):
            raise ValueError(f"{whole!r}: g= takes a GUID like 09087e75-8e5e-499b-954f-f2a9603db28a")
        return uuid.UUID(value)
    try:
        decoded = base64.b64decode(value, validate=True)
    except binascii.Error:
        decoded = b""
    if not decoded:
        raise ValueError(f"{whole!r}: b= takes a non-empty base64 ByteString")
    return decoded
