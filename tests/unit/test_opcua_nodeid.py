"""Node id strings: every form parses to what it says, formats back, and mistakes are named."""

from __future__ import annotations

import re
import uuid

import pytest

from gateway.collectors.opcua.nodeid import NodeRef, format_node, parse_node

GUID = "09087e75-8e5e-499b-954f-f2a9603db28a"
URI = "urn:millwright:simulator"
BYTES = bytes.fromhex("33f45b281b1156478f09e3dcc76e2844")

VALID = [
    # text                                     namespace       kind  identifier
    ("i=2258",                                  0,              "i",  2258),
    ("ns=0;i=85",                               0,              "i",  85),
    ("ns=2;i=5001",                             2,              "i",  5001),
    ("ns=65535;i=4294967295",                   65535,          "i",  4294967295),
    ("ns=2;s=CNC1.Spindle.Speed",               2,              "s",  "CNC1.Spindle.Speed"),
    ("s=NoNamespace",                           0,              "s",  "NoNamespace"),
    # s= runs to the end: ';' and '=' belong to the identifier, no escaping needed
    ("ns=3;s=Line;1=Motor",                     3,              "s",  "Line;1=Motor"),
    ("ns=3;s=ns=4;i=5",                         3,              "s",  "ns=4;i=5"),
    ("ns=2;s=Größe °C",                         2,              "s",  "Größe °C"),
    (f"ns=2;g={GUID}",                          2,              "g",  uuid.UUID(GUID)),
    (f"ns=2;g={GUID.upper()}",                  2,              "g",  uuid.UUID(GUID)),
    ("ns=2;b=M/RbKBsRVkePCePcx24oRA==",         2,              "b",  BYTES),
    (f"nsu={URI};s=CNC1.PartCount",             URI,            "s",  "CNC1.PartCount"),
    (f"nsu={URI};i=5001",                       URI,            "i",  5001),
    ("nsu=http://acme.com/UA/;g=" + GUID,       "http://acme.com/UA/", "g", uuid.UUID(GUID)),
    # a URI holding ';' or '%' writes them escaped
    ("nsu=urn:a%3Bb;s=X",                       "urn:a;b",      "s",  "X"),
    ("nsu=urn:a%3bb;s=X",                       "urn:a;b",      "s",  "X"),
    ("nsu=urn:100%25;s=X",                      "urn:100%",     "s",  "X"),
    ("nsu=urn:a%20b;s=X",                       "urn:a%20b",    "s",  "X"),  # other escapes stay as written
]  # fmt: skip


@pytest.mark.parametrize(("text", "namespace", "kind", "identifier"), VALID)
def test_valid_node_ids_parse(text: str, namespace: int | str, kind: str, identifier: object) -> None:
    assert parse_node(text) == NodeRef(namespace, kind, identifier)  # type: ignore[arg-type]


@pytest.mark.parametrize("text", [row[0] for row in VALID])
def test_format_round_trips(text: str) -> None:
    node = parse_node(text)
    assert parse_node(format_node(node)) == node


@pytest.mark.parametrize(
    ("node", "text"),
    [
        (NodeRef(0, "i", 85), "i=85"),
        (NodeRef(2, "s", "A;B"), "ns=2;s=A;B"),
        (NodeRef("urn:a;b%", "i", 1), "nsu=urn:a%3Bb%25;i=1"),
        (NodeRef(2, "g", uuid.UUID(GUID)), f"ns=2;g={GUID}"),
        (NodeRef(2, "b", b"\x00\xff"), "ns=2;b=AP8="),
    ],
)
def test_format(node: NodeRef, text: str) -> None:
    assert format_node(node) == text
    assert str(node) == text


INVALID = [
    # text                          what the message says
    ("",                            "non-empty"),
    (" ns=2;s=X",                   "surrounding spaces"),
    ("ns=2;s=X ",                   "surrounding spaces"),
    ("ns=2",                        "expected ';' after ns=<index>"),
    ("ns=x;s=A",                    "namespace index 'x' is not a number"),
    ("ns=-1;s=A",                   "namespace index '-1' is not a number"),
    ("ns=65536;i=1",                "namespace index 65536 is above 65535"),
    ("nsu=;s=A",                    "expected nsu=<uri>;"),
    ("nsu=urn:x",                   "expected nsu=<uri>;"),
    ("ns=2;x=5",                    "expected i=<number>, s=<string>, g=<guid> or b=<base64>"),
    ("ns=2;S=Upper",                "expected i=<number>"),
    ("CNC1.Speed",                  "expected i=<number>"),
    ("ns=2;i=",                     "i= takes a number"),
    ("ns=2;i=12a",                  "i= takes a number"),
    ("i=4294967296",                "i= takes a number from 0 to 4294967295"),
    ("ns=2;s=",                     "s= needs a string identifier"),
    ("ns=2;g=1234",                 "g= takes a GUID"),
    ("ns=2;g={" + GUID + "}",       "g= takes a GUID"),
    ("ns=2;b=not base64!",          "b= takes a non-empty base64 ByteString"),
    ("ns=2;b=",                     "b= takes a non-empty base64 ByteString"),
    ("ns=2;nsu=urn:x;s=A",          "expected i=<number>"),
]  # fmt: skip


@pytest.mark.parametrize(("text", "message"), INVALID)
def test_invalid_node_ids_say_what_is_wrong(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_node(text)
