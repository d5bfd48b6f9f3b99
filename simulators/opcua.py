"""A CNC machine and a packaging line served over OPC UA, with fault injection. Node list: OPCUA.md.

One asyncua `Server` per simulator, built on the first `start()`. `stop()` closes the
listener, every connection and every session (and with them the subscriptions); `start()`
listens on the same port again with the same certificate. A real server process would also
rebuild its address space on restart, but asyncua needs about a second to load the standard
nodes, and tests restart the simulator often; to a client the two look the same: the
connection drops, the old session is gone, the node ids are unchanged.

A background task advances the machine models every `tick` and writes the values that
changed, with a SourceTimestamp, so both polling reads and subscriptions see them move.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import shutil
import tempfile
import time
import weakref
from pathlib import Path
from types import TracebackType

from asyncua import ua
from asyncua.common.node import Node
from asyncua.server.server import Server
from asyncua.ua.attribute_ids import AttributeIds
from asyncua.ua.object_ids import ObjectIds
from asyncua.ua.status_codes import StatusCodes
from asyncua.ua.uaerrors import UaStringParsingError

from simulators.opcua_model import CNC_RESET, VARIABLES, Plant, Var
from simulators.opcua_server import (
    APPLICATION_URI,
    CERT_FILE,
    NAMESPACE,
    PASSWORD,
    POLICIES,
    UNECE,
    USERNAME,
    CachedInternalServer,
    Users,
    free_port,
    node_id,
    now,
    server_certificate,
)

log = logging.getLogger(__name__)


class OpcUaSimulator:
    """Serves the CNC machine and the packer (`simulators.opcua_model`) over OPC UA.

    Node arguments of the fault injection methods are ids in our namespace: the identifier
    alone (`"s=CNC1.Spindle.Speed"`, `"i=5001"`, `"g=..."`), or with `nsu=urn:millwright:simulator;`
    or `ns=<namespace_index>;` in front. Only variables can be targeted.
    """

    NAMESPACE = NAMESPACE
    USERNAME = USERNAME
    PASSWORD = PASSWORD

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 4840,
        *,
        seed: int | None = None,
        tick: float = 0.1,
        pki_dir: Path | None = None,
        allow_anonymous: bool = True,
        extra_namespaces: int = 0,
    ) -> None:
        self.host = host
        self.port = port or free_port(host)
        self.endpoint = f"opc.tcp://{host}:{self.port}"
        self.tick = tick
        self.allow_anonymous = allow_anonymous
        self.extra_namespaces = extra_namespaces
        # Namespace 0 is OPC UA's, 1 the server's application URI, then the dummies, then ours.
        self.namespace_index = 2 + extra_namespaces
        if pki_dir is None:
            pki_dir = Path(tempfile.mkdtemp(prefix="millwright-opcua-sim-"))
            weakref.finalize(self, shutil.rmtree, pki_dir, ignore_errors=True)
        self.pki_dir = pki_dir
        self._der, self._pem = server_certificate(pki_dir, host)
        self.certificate = pki_dir / CERT_FILE
        self.fingerprint = hashlib.sha256(self._der).hexdigest()
        name = None if seed is None else str(seed)
        self.plant = Plant(name, tick, wall_offset=time.time() - time.monotonic())
        self._vars = {self._node_id(var): var for var in VARIABLES}
        self._status: dict[ua.NodeId, int] = {}
        self._removed: set[ua.NodeId] = set()
        self._written: dict[ua.NodeId, tuple[object, int]] = {}  # last (value, status) per node
        self._server: Server | None = None
        self._ticker: asyncio.Task[None] | None = None
        self._writes: set[asyncio.Task[None]] = set()
        self._frozen = False

    @property
    def connections(self) -> int:
        """How many client connections (sockets) the server has open."""
        return 0 if self._server is None else len(self._server.iserver.asyncio_transports)

    # --- lifecycle ---

    async def start(self) -> None:
        """Listen on `endpoint`; returns once clients can connect. Restartable after `stop()`."""
        if self._ticker is not None:
            return
        began = time.perf_counter()
        self.plant.advance(time.monotonic())
        if self._server is None:
            server = await self._build()
            await server.start()  # on failure (port taken) asyncua has cleaned up; we rebuild next time
            self._server = server
        else:
            assert self._server.bserver is not None  # set by the first Server.start()
            await self._server.bserver.start()
            await self._server.get_node(ObjectIds.Server_ServerStatus_StartTime).write_value(now())
        await self._publish()
        self._ticker = asyncio.create_task(self._run(), name=f"opcua-sim-tick-{self.port}")
        self._ticker.add_done_callback(self._ticker_ended)
        log.info(
            "opcua simulator listening on %s (certificate sha256 %s), started in %.2f s",
            self.endpoint,
            self.fingerprint,
            time.perf_counter() - began,
        )

    async def stop(self) -> None:
        """Close the listener, every connection and every session; no task or thread is left."""
        ticker, self._ticker = self._ticker, None
        if ticker is None or self._server is None:
            return
        ticker.cancel()
        await asyncio.wait([ticker, *self._writes])
        self._frozen = False
        iserver = self._server.iserver
        assert self._server.bserver is not None
        await self._server.bserver.stop()
        # Sessions with subscriptions outlive their connection (OPC UA Part 4 §6.7) and each
        # keeps a timeout task; a restarted server has no sessions, so close them all.
        for session in list(iserver._external_sessions.values()):
            await session.close_session(True)
        log.info("opcua simulator on %s stopped", self.endpoint)

    async def __aenter__(self) -> OpcUaSimulator:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    # --- fault injection ---

    def set_status(self, node: str, status: int | None) -> None:
        """Make `node` report `status` (a StatusCode value, e.g. `ua.StatusCodes.BadSensorFailure`)
        until called again with None. Bad codes carry a null value, others the live value.
        Takes effect at once: a read issued after this call sees it."""
        nodeid = self._resolve(node)
        if status is None:
            self._status.pop(nodeid, None)
        else:
            self._status[nodeid] = status
        if self._ticker is not None and nodeid not in self._removed:
            task = asyncio.create_task(self._write(nodeid, now()), name="opcua-sim-write")
            self._writes.add(task)
            task.add_done_callback(self._writes.discard)

    async def remove_node(self, node: str) -> None:
        """Delete a variable (and its properties); reads then fail with BadNodeIdUnknown.

        Monitored items on it get one last notification with BadNodeIdUnknown (OPC UA Part 4
        §5.8.4) and then nothing, not even after `restore_node`: a client must create them anew.
        """
        nodeid = self._resolve(node)
        if nodeid in self._removed:
            return
        self._removed.add(nodeid)
        self._written.pop(nodeid, None)
        if self._server is None:
            return
        gone = ua.DataValue(
            StatusCode=ua.StatusCode(ua.UInt32(StatusCodes.BadNodeIdUnknown)), SourceTimestamp=now()
        )
        await self._server.write_attribute_value(nodeid, gone)
        # asyncua 2.1 would call the monitored items' async callbacks without awaiting them
        # when the node goes (a "never awaited" RuntimeWarning, and no notification); the
        # write above has notified them, so detach them first.
        aspace = self._server.iserver.aspace
        for handle in list(aspace[nodeid].attributes[AttributeIds.Value].datachange_callbacks):
            aspace.delete_datachange_callback(handle)
        await self._server.delete_nodes([self._server.get_node(nodeid)], recursive=True)

    async def restore_node(self, node: str) -> None:
        """Recreate a removed variable with the same id, properties and the current value."""
        nodeid = self._resolve(node)
        if nodeid not in self._removed:
            return
        self._removed.discard(nodeid)
        if self._server is not None:
            await self._add_variable(self._server, self._vars[nodeid])
            await self._write(nodeid, now())

    async def drop_subscriptions(self) -> None:
        """Silently forget every subscription; connections and sessions stay up, so clients
        get no more notifications or keep-alives (a server that lost them, e.g. on failover).

        The publish requests the clients have queued stay unanswered (no StatusChange, no
        BadNoSubscription) until the session closes; the subscription ids become invalid.
        """
        if self._server is None:
            return
        service = self._server.iserver.subscription_service
        dropped = list(service.subscriptions.values())
        service.subscriptions.clear()
        # stop() cancels and awaits the publish loop and detaches the monitored items.
        await asyncio.gather(*(sub.stop() for sub in dropped))

    def freeze(self) -> None:
        """Stop answering on the open connections and stop updating values; sockets stay open.

        Connections opened while frozen are served normally, so this models a stalled
        connection (a NAT or firewall silently dropping it), not a hung server process.
        """
        self._frozen = True
        if self._server is not None:
            for transport in self._server.iserver.asyncio_transports:
                transport.pause_reading()

    def unfreeze(self) -> None:
        self._frozen = False
        if self._server is not None:
            for transport in self._server.iserver.asyncio_transports:
                if not transport.is_closing():
                    transport.resume_reading()

    # --- internals ---

    def _node_id(self, var: Var) -> ua.NodeId:
        return node_id(var.ident if var.ident is not None else var.name, self.namespace_index)

    def _resolve(self, node: str) -> ua.NodeId:
        ident = node
        prefix, sep, rest = node.partition(";")
        if sep:
            if prefix not in (f"nsu={NAMESPACE}", f"ns={self.namespace_index}"):
                raise ValueError(f"{node!r}: not in namespace {NAMESPACE} (index {self.namespace_index})")
            ident = rest
        try:
            nodeid = ua.NodeId.from_string(f"ns={self.namespace_index};{ident}")
        except UaStringParsingError as exc:
            raise ValueError(f"{node!r}: not a node id such as 's=CNC1.Spindle.Speed'") from exc
        if nodeid not in self._vars:
            raise KeyError(f"{node!r}: no such variable in the simulator")
        return nodeid

    async def _build(self) -> Server:
        server = Server(iserver=CachedInternalServer(user_manager=Users(self.allow_anonymous)))
        await server.init()
        # asyncua's clock task sleeps a whole second before it notices a stop; _run()
        # updates ServerStatus.CurrentTime instead.
        server.disable_clock()
        server.set_endpoint(self.endpoint)
        server.set_server_name("Millwright OPC UA machine simulator")
        await server.set_application_uri(APPLICATION_URI)
        # No certificate validator: any client certificate is accepted (fine for a simulator).
        server.set_security_policy(POLICIES)
        tokens: list[type] = [ua.UserNameIdentityToken]
        if self.allow_anonymous:
            tokens.append(ua.AnonymousIdentityToken)
        server.set_identity_tokens(tokens)
        # Bytes, not paths: asyncua reads paths through anyio's worker threads.
        await server.load_certificate(self._der)
        await server.load_private_key(self._pem, format="pem")
        for n in range(1, self.extra_namespaces + 1):
            await server.register_namespace(f"{NAMESPACE}:extra:{n}")
        index = await server.register_namespace(NAMESPACE)
        if index != self.namespace_index:
            raise RuntimeError(f"namespace {NAMESPACE} got index {index}, expected {self.namespace_index}")
        folder = node_id("Machines", index)
        await server.nodes.objects.add_folder(folder, ua.QualifiedName("Machines", index))
        for nodeid, var in self._vars.items():
            if nodeid not in self._removed:
                await self._add_variable(server, var)
        cnc = server.get_node(node_id("CNC1", index))
        await cnc.add_method(
            node_id(CNC_RESET, index), ua.QualifiedName("ResetCounter", index), self._reset_counter, [], []
        )
        return server

    async def _add_variable(self, server: Server, var: Var) -> None:
        index = self.namespace_index
        parent = await self._ensure_parents(server, var.path[:-1])
        item = ua.AddNodesItem()
        item.RequestedNewNodeId = self._node_id(var)
        item.BrowseName = ua.QualifiedName(var.path[-1], index)
        item.NodeClass = ua.NodeClass.Variable
        item.ParentNodeId = parent.nodeid
        item.ReferenceTypeId = node_id(ObjectIds.HasComponent)
        analog = ObjectIds.AnalogItemType if var.eu_range else ObjectIds.BaseAnalogType
        item.TypeDefinition = node_id(analog if var.unit else ObjectIds.BaseDataVariableType)
        attrs = ua.VariableAttributes()
        attrs.DisplayName = ua.LocalizedText(var.path[-1])
        attrs.Description = ua.LocalizedText(var.description, "en")
        attrs.DataType = node_id(getattr(ObjectIds, var.vtype.name))
        attrs.Value = ua.Variant(var.read(self.plant), var.vtype)
        attrs.ValueRank = ua.ValueRank.OneDimension if var.array else ua.ValueRank.Scalar
        if var.array:
            attrs.ArrayDimensions = [ua.UInt32(0)]  # one dimension of any length
        attrs.AccessLevel = attrs.UserAccessLevel = ua.AccessLevel.CurrentRead.mask
        item.NodeAttributes = attrs
        (result,) = await server.iserver.isession.add_nodes([item])
        result.StatusCode.check()
        node = server.get_node(result.AddedNodeId)
        if var.unit is not None:
            eu = ua.EUInformation(
                NamespaceUri=UNECE,
                UnitId=var.unit.unit_id,
                DisplayName=ua.LocalizedText(var.unit.symbol),
                Description=ua.LocalizedText(var.unit.description, "en"),
            )
            await self._add_property(node, var, "EngineeringUnits", eu, ObjectIds.EUInformation)
        if var.eu_range is not None:
            low, high = var.eu_range
            await self._add_property(node, var, "EURange", ua.Range(low, high), ObjectIds.Range)

    async def _add_property(self, node: Node, var: Var, name: str, value: object, datatype: int) -> None:
        await node.add_property(
            node_id(f"{var.name}.{name}", self.namespace_index),
            ua.QualifiedName(name, 0),
            value,
            datatype=datatype,
        )

    async def _ensure_parents(self, server: Server, path: tuple[str, ...]) -> Node:
        """The object at `path` below Machines, created (with its parents) if missing."""
        node = server.get_node(node_id("Machines", self.namespace_index))
        for depth in range(1, len(path) + 1):
            nodeid = node_id(".".join(path[:depth]), self.namespace_index)
            if nodeid in server.iserver.aspace:
                node = server.get_node(nodeid)
            else:
                node = await node.add_object(nodeid, ua.QualifiedName(path[depth - 1], self.namespace_index))
        return node

    async def _reset_counter(self, parent: ua.NodeId) -> list[ua.Variant]:
        self.plant.cnc.reset_counter()
        await self._publish()
        return []

    def _ticker_ended(self, task: asyncio.Task[None]) -> None:
        # A crash here is a bug in the simulator; say so loudly, values have stopped moving.
        if not task.cancelled() and task.exception() is not None:
            log.error("opcua simulator stopped updating values", exc_info=task.exception())

    async def _run(self) -> None:
        last_clock = 0.0
        loop = asyncio.get_running_loop()
        due = loop.time()
        while True:
            # Every `tick` from the start, not `tick` after each round of writes: with many
            # monitored items a round takes a while, and the values would change less often.
            due = max(due + self.tick, loop.time())  # a late round is not made up in a burst
            await asyncio.sleep(due - loop.time())
            if self._frozen:
                continue
            await self._publish()
            if time.monotonic() - last_clock >= 1.0:
                last_clock = time.monotonic()
                assert self._server is not None
                await self._server.get_node(ObjectIds.Server_ServerStatus_CurrentTime).write_value(now())

    async def _publish(self) -> None:
        """Advance the models to now and write every value that changed."""
        self.plant.advance(time.monotonic())
        stamp = now()
        for nodeid in self._vars:
            if nodeid not in self._removed:
                await self._write(nodeid, stamp)

    async def _write(self, nodeid: ua.NodeId, stamp: ua.DateTime) -> None:
        var, status = self._vars[nodeid], self._status.get(nodeid, StatusCodes.Good)
        value = None if ua.StatusCode(ua.UInt32(status)).is_bad() else var.read(self.plant)
        if self._written.get(nodeid) == (value, status) or self._server is None:
            return  # unchanged: the SourceTimestamp stays the time of the last change
        self._written[nodeid] = (value, status)
        variant = ua.Variant() if value is None else ua.Variant(value, var.vtype)
        datavalue = ua.DataValue(variant, StatusCode=ua.StatusCode(ua.UInt32(status)), SourceTimestamp=stamp)
        await self._server.write_attribute_value(nodeid, datavalue)


async def serve(host: str, port: int, seed: int | None, pki_dir: Path | None = None) -> None:
    """Run the simulator until cancelled (`millwright simulate opcua`). Pass a `pki_dir` that
    persists, so clients that pinned the certificate's fingerprint keep trusting it."""
    async with OpcUaSimulator(host, port, seed=seed, pki_dir=pki_dir):
        await asyncio.Event().wait()  # parked until cancelled; __aexit__ closes everything
