"""`millwright browse`: walk a server's address space; print it as a tree or as `tags:`.

The walk follows hierarchical references forward (Organizes, HasComponent, ...) level by
level, with one batched Browse and one batched Read per level, so a deep tree costs a few
round trips rather than one per node. Properties (HasProperty) are not listed; a
variable's EngineeringUnits property becomes its unit. The connection uses the same
security settings, and the same refusal of an untrusted server, as the collector.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, cast

from asyncua import ua
from asyncua.client.client import Client
from asyncua.ua.attribute_ids import AttributeIds
from asyncua.ua.object_ids import ObjectIdNames, ObjectIds
from asyncua.ua.uaerrors import UaError

from gateway.collectors.opcua.convert import Unsupported, status_name, to_value
from gateway.collectors.opcua.nodeid import Identifier, Kind, NodeRef, format_node, parse_node
from gateway.collectors.opcua.security import open_client
from gateway.collectors.opcua.settings import OpcUaSecurity
from gateway.errors import DeviceTimeout, NotConnected
from gateway.model import Value

T = TypeVar("T")
BATCH = 500  # nodes per request: servers cap MaxNodesPerBrowse / MaxNodesPerRead
TIMEOUT = 10.0
_HAS_PROPERTY = ua.NodeId(ua.Int32(ObjectIds.HasProperty))
_HIERARCHICAL = ua.NodeId(ua.Int32(ObjectIds.HierarchicalReferences))
_CLASSES = ua.NodeClass.Object | ua.NodeClass.Variable


@dataclass(frozen=True, slots=True)
class BrowseRow:
    """One node found by `browse`. `node_id` is the stable form (nsu=<uri>;... outside
    namespace 0); `path` are the browse names from the start node down to this one."""

    node_id: str
    browse_name: str
    node_class: str
    data_type: str | None
    value: Value
    depth: int
    path: tuple[str, ...]
    unit: str | None = None
    status: int = 0  # of the value read; not Good: `value` is None
    supported: bool = True  # False: the data type has no JSON form (it would read Uncertain)


async def browse(
    endpoint: str, security: OpcUaSecurity, pki_dir: Path, node: str | None, depth: int
) -> list[BrowseRow]:
    """The nodes under `node` (default: the Objects folder) down to `depth` levels, in
    tree order. Raises NotConnected (also for an untrusted server) or DeviceTimeout."""
    start = parse_node(node) if node else NodeRef(0, "i", ObjectIds.ObjectsFolder)
    try:
        client = await open_client(endpoint, endpoint, security, pki_dir, TIMEOUT)
    except TimeoutError as exc:
        raise DeviceTimeout(endpoint, f"no answer within {TIMEOUT:g} s") from exc
    except (OSError, UaError) as exc:
        raise NotConnected(endpoint, str(exc) or type(exc).__name__) from exc
    try:
        return await _Walk(client).run(start, depth)
    except TimeoutError as exc:
        raise DeviceTimeout(endpoint, f"no answer within {TIMEOUT:g} s") from exc
    except (OSError, UaError) as exc:
        raise NotConnected(endpoint, str(exc) or type(exc).__name__) from exc
    finally:
        await client.disconnect()


@dataclass(slots=True)
class _Node:
    id: ua.NodeId
    name: str
    node_class: ua.NodeClass
    depth: int
    path: tuple[str, ...]
    children: list[_Node]
    data_type: str | None = None
    value: Value = None
    status: int = 0
    supported: bool = True
    unit: str | None = None
    units_node: ua.NodeId | None = None  # its EngineeringUnits property


class _Walk:
    def __init__(self, client: Client) -> None:
        self._client = client
        self._namespaces: list[str] = []
        self._seen: set[ua.NodeId] = set()
        self._types: dict[ua.NodeId, str] = {}  # custom DataType -> its browse name

    async def run(self, start: NodeRef, depth: int) -> list[BrowseRow]:
        self._namespaces = await self._client.get_namespace_array()
        root = await self._root(start)
        self._seen.add(root.id)
        level = [root]
        while level:
            await self._describe([n for n in level if n.node_class == ua.NodeClass.Variable])
            level = await self._expand(level, descend=level[0].depth < depth)
        return [self._row(n) for n in _tree(root)]

    async def _root(self, start: NodeRef) -> _Node:
        where = self._client.server_url.geturl()
        ns = start.namespace
        if isinstance(ns, str):
            if ns not in self._namespaces:
                raise NotConnected(where, f"the server has no namespace {ns}")
            ns = self._namespaces.index(ns)
        node_id = ua.NodeId(cast(Any, start.identifier), ua.Int16(ns))
        pairs = [(node_id, AttributeIds.BrowseName), (node_id, AttributeIds.NodeClass)]
        name, node_class = await self._read_pairs(pairs)
        if name.StatusCode is not None and not name.StatusCode.is_good():
            raise NotConnected(where, f"node {format_node(start)}: {name.StatusCode.name}")
        qn = name.Value.Value if name.Value else None
        text = qn.Name if isinstance(qn, ua.QualifiedName) and qn.Name else format_node(start)
        cls = node_class.Value.Value if node_class.Value else None
        return _Node(node_id, text, ua.NodeClass(cls or ua.NodeClass.Object), 0, (), [])

    async def _expand(self, level: list[_Node], descend: bool) -> list[_Node]:
        """Browse every node of a level; return the next level (empty when not descending).
        Variables are browsed even at the last level, for their EngineeringUnits."""
        todo = level if descend else [n for n in level if n.node_class == ua.NodeClass.Variable]
        nxt: list[_Node] = []
        for node, refs in zip(todo, await self._browse([n.id for n in todo]), strict=True):
            for ref in refs:
                if ref.ReferenceTypeId == _HAS_PROPERTY:
                    if ref.BrowseName.Name == "EngineeringUnits":
                        node.units_node = _local(ref.NodeId)
                    continue
                target = _local(ref.NodeId)
                # Another server's node, or one already listed (address spaces have cycles).
                remote = isinstance(ref.NodeId, ua.ExpandedNodeId) and ref.NodeId.ServerIndex
                if not descend or remote or target in self._seen:
                    continue
                self._seen.add(target)
                child = _Node(target, ref.BrowseName.Name or "", ref.NodeClass,
                              node.depth + 1, (*node.path, ref.BrowseName.Name or ""), [])  # fmt: skip
                node.children.append(child)
                nxt.append(child)
        await self._units([n for n in level if n.units_node is not None])
        return nxt

    async def _describe(self, variables: list[_Node]) -> None:
        if not variables:
            return
        pairs = [(n.id, AttributeIds.Value) for n in variables]
        results = await self._read_pairs(pairs + [(n.id, AttributeIds.DataType) for n in variables])
        values, types = results[: len(variables)], results[len(variables) :]
        for node, dv, dt in zip(variables, values, types, strict=True):
            node.data_type = await self._type_name(dt.Value.Value if dt.Value else None)
            node.status = dv.StatusCode.value if dv.StatusCode is not None else 0
            try:
                node.value = to_value(dv.Value)
            except Unsupported:
                node.supported = False
            except OverflowError:
                node.value = None  # NaN or infinity: shown as null
            if isinstance(node.value, list) and node.data_type:
                node.data_type += "[]"

    async def _units(self, nodes: list[_Node]) -> None:
        if not nodes:
            return
        values = await self._read([n.units_node for n in nodes if n.units_node], AttributeIds.Value)
        for node, dv in zip(nodes, values, strict=True):
            eu = dv.Value.Value if dv.Value else None
            if isinstance(eu, ua.EUInformation) and eu.DisplayName and eu.DisplayName.Text:
                node.unit = eu.DisplayName.Text

    async def _type_name(self, node: Any) -> str | None:
        if not isinstance(node, ua.NodeId):
            return None
        if node.NamespaceIndex == 0 and isinstance(node.Identifier, int):
            return ObjectIdNames.get(node.Identifier, str(node.Identifier))
        if node not in self._types:  # a server's own type: one read per type, not per variable
            names = await self._read([node], AttributeIds.BrowseName)
            qn = names[0].Value.Value if names[0].Value else None
            self._types[node] = qn.Name if isinstance(qn, ua.QualifiedName) and qn.Name else node.to_string()
        return self._types[node]

    async def _browse(self, ids: Sequence[ua.NodeId]) -> list[list[ua.ReferenceDescription]]:
        out: list[list[ua.ReferenceDescription]] = []
        for chunk in _chunks(ids):
            params = ua.BrowseParameters(NodesToBrowse=[
                ua.BrowseDescription(i, ua.BrowseDirection.Forward, _HIERARCHICAL, True, _CLASSES,
                                     ua.BrowseResultMask.All)
                for i in chunk
            ])  # fmt: skip
            for result in await self._client.uaclient.browse(params):
                refs = list(result.References)
                point = result.ContinuationPoint
                while point:  # the server split a long answer
                    more = await self._client.uaclient.browse_next(ua.BrowseNextParameters(False, [point]))
                    refs.extend(more[0].References)
                    point = more[0].ContinuationPoint
                out.append(refs)
        return out

    async def _read(self, ids: Sequence[ua.NodeId], attribute: AttributeIds) -> list[ua.DataValue]:
        return await self._read_pairs([(i, attribute) for i in ids])

    async def _read_pairs(self, pairs: Sequence[tuple[ua.NodeId, AttributeIds]]) -> list[ua.DataValue]:
        out: list[ua.DataValue] = []
        for chunk in _chunks(pairs):
            params = ua.ReadParameters(
                TimestampsToReturn=ua.TimestampsToReturn.Neither,
                NodesToRead=[ua.ReadValueId(i, a) for i, a in chunk],
            )
            out.extend(await self._client.uaclient.read(params))
        return out

    def _row(self, node: _Node) -> BrowseRow:
        nid = node.id
        ref = NodeRef(
            self._stable(nid.NamespaceIndex), _KIND[nid.NodeIdType], cast(Identifier, nid.Identifier)
        )
        return BrowseRow(
            format_node(ref), node.name, node.node_class.name, node.data_type, node.value, node.depth,
            node.path, node.unit, node.status, node.supported,
        )  # fmt: skip

    def _stable(self, index: int) -> int | str:
        # Namespace 0 is fixed by the standard; every other index is the server's to renumber.
        if index == 0 or index >= len(self._namespaces):
            return index
        return self._namespaces[index]


_KIND: dict[ua.NodeIdType, Kind] = {
    ua.NodeIdType.TwoByte: "i", ua.NodeIdType.FourByte: "i", ua.NodeIdType.Numeric: "i",
    ua.NodeIdType.String: "s", ua.NodeIdType.Guid: "g", ua.NodeIdType.ByteString: "b",
}  # fmt: skip


def _local(node: ua.NodeId) -> ua.NodeId:
    # asyncua decodes an ExpandedNodeId without namespace URI or server index as a NodeId.
    return ua.NodeId(node.Identifier, node.NamespaceIndex, node.NodeIdType)


def _chunks(items: Sequence[T]) -> Iterator[Sequence[T]]:
    for i in range(0, len(items), BATCH):
        yield items[i : i + BATCH]


def _tree(node: _Node) -> Iterator[_Node]:
    yield node
    for child in node.children:
        yield from _tree(child)


# -- output ------------------------------------------------------------------------------


def format_tree(rows: Sequence[BrowseRow]) -> str:
    """An indented tree: browse name, node id, and for variables the data type and value."""
    lines = []
    for row in rows:
        text = f"{'  ' * row.depth}{row.browse_name}  [{row.node_id}]"
        if row.node_class == "Variable":
            value = json.dumps(row.value, ensure_ascii=False)
            if row.status & 0xC0000000:
                value = f"<{status_name(row.status)}>"
            elif not row.supported:
                value = "<no JSON form>"
            if len(value) > 60:
                value = value[:57] + "..."
            unit = f" {row.unit}" if row.unit else ""
            text += f"  {row.data_type or '?'} = {value}{unit}"
        lines.append(text)
    return "\n".join(lines) + "\n"


def format_tags(rows: Sequence[BrowseRow]) -> str:
    """A `tags:` block for the variables among `rows`, ready to paste under a device.

    Names come from the browse path below the start node, in snake_case, made safe for
    an MQTT topic segment and unique; node ids are in the stable nsu= form."""
    lines = ["tags:"]
    used: set[str] = set()
    for row in rows:
        if row.node_class != "Variable":
            continue
        name = _unique(tag_name(row.path or (row.browse_name,)), used)
        entry = f"  - {{name: {json.dumps(name)}, node: {json.dumps(row.node_id)}"
        if row.unit:
            entry += f", unit: {json.dumps(row.unit)}"
        entry += "}"
        if not row.supported:
            # Listed for completeness, but commented out: it would only ever read Uncertain.
            entry = f"  # {entry.lstrip()}  # {row.data_type}: no JSON form, not supported"
        elif row.data_type:
            entry += f"  # {row.data_type}"
        lines.append(entry)
    if len(lines) == 1:
        lines.append("  []  # no variables under this node")
    return "\n".join(lines) + "\n"


_CAMEL = re.compile(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])")
_UNSAFE = re.compile(r"[^a-z0-9]+")


def tag_name(path: Sequence[str]) -> str:
    """`("Spindle", "ActualSpeed")` -> `spindle_actual_speed`."""
    words = "_".join(_CAMEL.sub("_", part) for part in path).lower()
    return _UNSAFE.sub("_", words).strip("_")[:100] or "tag"


def _unique(name: str, used: set[str]) -> str:
    candidate, n = name, 2
    while candidate in used:
        candidate, n = f"{name}_{n}", n + 1
    used.add(candidate)
    return candidate
