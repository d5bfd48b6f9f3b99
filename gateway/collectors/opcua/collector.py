"""The OPC UA collector: one server, one session, subscribed or polled.

asyncua is used with its automatic reconnect off: the poller owns reconnecting, and a
second, hidden retry loop would fight it. asyncua's connection watchdog stays on, because
it notices a server that stopped answering while the socket stays open; when it fires,
the next `read()` raises NotConnected and the poller rebuilds the session, the namespace
table and the subscription from scratch.

Subscribe mode talks to asyncua's low-level session API (`client.uaclient`) rather than
its `Subscription` class: that class runs a task per notification in callback mode, or
an unbounded-policy queue of its own in iterator mode, and re-creates subscriptions behind
our back. Here the publish callback only turns each notification into a Reading and
appends it to a bounded buffer that `read()` drains.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, cast

from asyncua import ua
from asyncua.client.client import Client
from asyncua.client.ua_client import UaClientState
from asyncua.ua.attribute_ids import AttributeIds
from asyncua.ua.object_ids import ObjectIds
from asyncua.ua.status_codes import StatusCodes
from asyncua.ua.uaerrors import UaError

from gateway.collectors.deadband import Deadband
from gateway.collectors.opcua.buffer import Buffer
from gateway.collectors.opcua.convert import DATATYPES, reading, status_name
from gateway.collectors.opcua.nodeid import NodeRef
from gateway.collectors.opcua.security import open_client
from gateway.collectors.opcua.settings import OpcUaDevice, OpcUaTag
from gateway.errors import DeviceTimeout, NotConnected
from gateway.model import Datatype, Reading, Status, bad, datatype_event

log = logging.getLogger(__name__)
T = TypeVar("T")

UNKNOWN: int = Status.BAD_NODE_ID_UNKNOWN
# Nodes that are missing (removed, or not there yet) are tried again at most this often:
# every cycle would mean a request per publishing interval for a node that may never come.
RETRY_EVERY = 1.0
# Our cap on nodes per Read and monitored items per call, below whatever the server allows:
# a server that advertises no limit (0) may still choke on one huge request.
BATCH = 1000
LIMITS = (
    ObjectIds.Server_ServerCapabilities_OperationLimits_MaxNodesPerRead,
    ObjectIds.Server_ServerCapabilities_OperationLimits_MaxMonitoredItemsPerCall,
)
# A server that cannot apply our absolute deadband to a node (a string, say, or no
# deadband support at all): monitor it without one; our own Deadband still filters.
FILTER_REFUSED = {
    StatusCodes.BadFilterNotAllowed, StatusCodes.BadMonitoredItemFilterUnsupported,
    StatusCodes.BadDeadbandFilterInvalid, StatusCodes.BadMonitoredItemFilterInvalid,
}  # fmt: skip

# The neutral datatype of each built-in type, looked up per value (the enum, not its name).
_BY_VARIANT: dict[ua.VariantType, Datatype] = {ua.VariantType[name]: dt for name, dt in DATATYPES.items()}


@dataclass(slots=True)
class _Tag:
    """A configured tag and what the current session knows about it."""

    handle: int  # our ClientHandle: the tag's index
    config: OpcUaTag
    ref: NodeRef
    node: ua.NodeId | None = None  # None: its namespace URI is not on the server (yet)
    item: int | None = None  # the server's MonitoredItemId, while monitored
    filtered: bool = True  # whether to ask the server for the deadband filter
    datatype: Datatype | None = None  # of its last scalar value, as the server typed it

    @property
    def name(self) -> str:
        return self.config.name


class OpcUaCollector:
    """One OPC UA server. Implements `gateway.collectors.Collector`.

    A tag whose node does not exist (at connect, or removed later) is reported Bad with
    BadNodeIdUnknown once, and tried again on later cycles (at most every `retry_every`
    seconds); the other tags keep flowing. Reads and monitored items are sent in batches
    of at most `batch`, or fewer if the server's OperationLimits say so.
    """

    def __init__(
        self,
        device: OpcUaDevice,
        pki_dir: Path,
        clock: Callable[[], float] = time.time,
        *,
        retry_every: float = RETRY_EVERY,
    ) -> None:
        self.name = device.name
        self.retry_every = retry_every
        self.batch = BATCH
        self._device = device
        self._pki_dir = pki_dir
        self._clock = clock
        self._subscribe = device.mode == "subscribe"
        self._tags = [_Tag(i, t, t.ref) for i, t in enumerate(device.tags)]
        self._deadband = Deadband({t.name: t.deadband for t in device.tags})
        self.buffer = Buffer(device.name, max(1024, 2 * sum(t.queue_size for t in device.tags)))
        self._client: Client | None = None
        self._reads: list[ua.ReadParameters] | None = None  # poll mode: the prepared batched reads
        self._per_read = self._per_call = 0  # the server's operation limits; 0: none
        self._subscription: int | None = None
        self._stale_after = math.inf
        self._last_publish = 0.0
        self._lost: str | None = None  # set by the publish callback: the subscription ended
        self._vanished: set[int] = set()  # handles whose node disappeared while monitored
        self._missing: dict[int, int] = {}  # handle -> status reported for it, while not monitored
        self._retry_at = 0.0  # monotonic time of the next attempt at missing tags
        self._told: list[Reading] = []  # datatype events not yet handed to the poller

    def told(self) -> list[Reading]:
        """The datatype events since the last call: a tag's first value, or the server
        changed a node's type (see `gateway.model.datatype_event`)."""
        told, self._told = self._told, []
        return told

    @property
    def monitored(self) -> int:
        """How many tags are monitored by the current subscription."""
        return sum(1 for t in self._tags if t.item is not None)

    async def connect(self) -> None:
        """Open a session (checking the server's certificate first), resolve namespace URIs
        and, in subscribe mode, create the subscription. Raises NotConnected/DeviceTimeout."""
        await self.close()
        d = self._device
        try:
            with self._translate("connecting"):
                self._client = await open_client(d.name, d.endpoint, d.security, self._pki_dir, d.timeout)
                await self._read_limits()
                await self._resolve(self._tags)
                if self._subscribe:
                    await self._create_subscription()
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        """Close the session; safe to call when not connected."""
        client, self._client = self._client, None
        self._reads, self._subscription, self._lost = None, None, None
        self._vanished.clear()
        self._missing.clear()
        for tag in self._tags:
            tag.node = tag.item = None
        if client is None:
            return
        try:
            # CloseSession also deletes the subscription on the server.
            async with asyncio.timeout(self._device.timeout):
                await client.disconnect()
        except (TimeoutError, OSError, UaError) as exc:
            log.debug("device %s: closing the session: %r", self.name, exc)
        finally:
            client.disconnect_socket()
            # When asyncua's watchdog gave up on a stalled connection it marked the client
            # DISCONNECTED without closing the socket, and disconnect_socket() then returns
            # early (asyncua 2.1.0; worth reporting upstream): close it here, or every stall
            # leaks a socket to the server. `protocol` is asyncua-internal.
            protocol = client.uaclient.protocol
            if protocol is not None and protocol.transport is not None:
                protocol.transport.close()  # a no-op when already closing

    async def read(self) -> list[Reading]:
        """Subscribe mode: the readings notified since the last call. Poll mode: every
        tag, read in batches. Deadband applied. Raises NotConnected or DeviceTimeout."""
        client = self._connected()
        with self._translate("reading"):
            if self._subscribe:
                await self._maintain(client)
                readings = self.buffer.drain()
            else:
                readings = await self._poll(client)
        admit = self._deadband.admit
        return [r for r in readings if admit(r)]

    def unavailable(self, status: int, now: float) -> list[Reading]:
        """Bad readings with `status` for every tag not already reported Bad with it,
        preceded by the notifications still buffered (deadband applied): they are older,
        and delivering them after a reconnect would put a Good reading after the Bad one."""
        admit, admit_state = self._deadband.admit, self._deadband.admit_state
        buffered = [r for r in self.buffer.drain() if admit(r)]
        readings = (bad(self.name, t.name, status, now, t.config.unit) for t in self._tags)
        return buffered + [r for r in readings if admit_state(r)]

    def summary(self) -> str:
        """`12 tags, 12 monitored items` (subscribe mode) or `12 tags, 1 read per poll`."""
        tags = f"{len(self._tags)} tag{'s' if len(self._tags) != 1 else ''}"
        if self._subscribe:
            items = self.monitored
            return f"{tags}, {items} monitored item{'s' if items != 1 else ''}"
        reads = len(self._reads or ())
        return f"{tags}, {reads} read{'s' if reads != 1 else ''} per poll"

    def describe(self) -> dict[str, Any]:
        """Metadata for the retained `_meta` message. The endpoint (plant network topology)
        and the credentials are left out on purpose."""
        return {
            "protocol": "opcua",
            "type": self._device.type,
            "tags": [
                {"name": t.name, "node": t.node, "unit": t.unit, "description": t.description}
                for t in self._device.tags
            ],
        }

    # -- connection ---------------------------------------------------------------------

    def _connected(self) -> Client:
        client = self._client
        if client is None:
            raise NotConnected(self.name, "not connected")
        if client.state is not UaClientState.CONNECTED:
            # asyncua's socket callback or its watchdog noticed the loss.
            raise NotConnected(self.name, f"connection to the server lost ({client.state.value})")
        return client

    @contextmanager
    def _translate(self, doing: str) -> Iterator[None]:
        """asyncua's exceptions, translated once, here."""
        try:
            yield
        except TimeoutError as exc:
            wait = self._device.timeout
            raise DeviceTimeout(self.name, f"no answer within {wait:g} s while {doing}") from exc
        except (OSError, UaError) as exc:
            raise NotConnected(self.name, f"{doing}: {_reason(exc)}") from exc

    async def _read_limits(self) -> None:
        """The server's MaxNodesPerRead and MaxMonitoredItemsPerCall. Requests above them
        fail as a whole (BadTooManyOperations), which would look like a lost connection."""
        assert self._client is not None
        nodes = [ua.ReadValueId(ua.NodeId(ua.Int32(i)), AttributeIds.Value) for i in LIMITS]
        neither = ua.TimestampsToReturn.Neither
        params = ua.ReadParameters(MaxAge=0, TimestampsToReturn=neither, NodesToRead=nodes)
        self._per_read, self._per_call = (_limit(v) for v in await self._client.uaclient.read(params))

    def _batch(self, limit: int) -> int:
        return min(limit, self.batch) if limit > 0 else self.batch

    async def _resolve(self, tags: Iterable[_Tag]) -> None:
        """Map node refs to NodeIds. Namespace URIs are looked up in the server's table on
        every connect, since servers renumber namespaces across restarts."""
        tags = list(tags)
        table: list[str] = []
        if any(isinstance(t.ref.namespace, str) for t in tags):
            assert self._client is not None
            table = await self._client.get_namespace_array()
        for tag in tags:
            ns = tag.ref.namespace
            index = ns if isinstance(ns, int) else (table.index(ns) if ns in table else None)
            tag.node = None if index is None else _node_id(tag.ref, index)
        self._reads = None  # rebuilt with the new NodeIds

    # -- poll mode ----------------------------------------------------------------------

    async def _poll(self, client: Client) -> list[Reading]:
        if any(t.node is None for t in self._tags) and self._retry_due():
            await self._resolve(t for t in self._tags if t.node is None)
        if self._reads is None:
            nodes = [ua.ReadValueId(t.node, AttributeIds.Value) for t in self._tags if t.node]
            self._reads = [
                ua.ReadParameters(MaxAge=0, TimestampsToReturn=ua.TimestampsToReturn.Both, NodesToRead=batch)
                for batch in _chunks(nodes, self._batch(self._per_read))
            ]
        values: list[ua.DataValue] = []
        for params in self._reads:
            values += await client.uaclient.read(params)
        now = self._clock()
        readings: list[Reading] = []
        results = iter(values)
        for tag in self._tags:
            if tag.node is None:
                readings.append(bad(self.name, tag.name, UNKNOWN, now, tag.config.unit))
            else:
                dv = next(results)
                if (learned := _learned(tag, dv)) is not None:
                    self._told.append(datatype_event(self.name, tag.name, learned, now))
                readings.append(reading(self.name, tag.name, tag.config.unit, dv, now))
        return readings

    # -- subscribe mode -----------------------------------------------------------------

    async def _create_subscription(self) -> None:
        assert self._client is not None
        d = self._device
        # Keep-alives about every `timeout` when nothing changes; the lifetime is the
        # 3 keep-alives the specification asks for at least.
        keepalive = max(1, math.ceil(d.timeout / d.publishing_interval))
        params = ua.CreateSubscriptionParameters(
            RequestedPublishingInterval=d.publishing_interval * 1000,
            RequestedLifetimeCount=3 * keepalive,
            RequestedMaxKeepAliveCount=keepalive,
            MaxNotificationsPerPublish=0,
            PublishingEnabled=True,
        )
        result = await self._client.uaclient.create_subscription(params, self._on_publish)
        self._subscription = result.SubscriptionId
        self._stale_after = result.RevisedPublishingInterval / 1000 * result.RevisedLifetimeCount
        self._last_publish = time.monotonic()
        self._missing = {t.handle: 0 for t in self._tags}
        await self._monitor(self._tags)

    def _on_publish(self, result: ua.PublishResult) -> None:
        """asyncua's publish loop calls this for every PublishResponse, keep-alives included.
        The hot path: build Readings, append them, nothing else."""
        if result.SubscriptionId != self._subscription:
            return  # an earlier session's subscription
        self._last_publish = time.monotonic()
        for notification in result.NotificationMessage.NotificationData or ():
            if isinstance(notification, ua.DataChangeNotification):
                now, tags, append, name = self._clock(), self._tags, self.buffer.append, self.name
                for item in notification.MonitoredItems:
                    handle = item.ClientHandle
                    if handle >= len(tags):
                        continue
                    tag = tags[handle]
                    if (learned := _learned(tag, item.Value)) is not None:
                        self._told.append(datatype_event(name, tag.name, learned, now))
                    r = reading(name, tag.name, tag.config.unit, item.Value, now)
                    if r.status == UNKNOWN:
                        self._vanished.add(handle)
                    append(r)
            elif isinstance(notification, ua.StatusChangeNotification):
                # The subscription timed out, was transferred, or asyncua saw the connection
                # go (BadShutdown). Whatever the code, start over from a fresh session.
                self._lost = f"subscription status changed: {status_name(notification.Status.value)}"

    async def _maintain(self, client: Client) -> None:
        """Everything a subscription needs between notifications: notice that it died, and
        re-create monitored items for nodes that vanished or never existed."""
        if self._lost is not None:
            raise NotConnected(self.name, self._lost)
        silent = time.monotonic() - self._last_publish
        if silent > self._stale_after:
            raise NotConnected(self.name, f"no notification or keep-alive for {silent:.0f} s")
        if self._vanished:
            await self._forget(client, [self._tags[h] for h in sorted(self._vanished)])
        if self._missing and self._retry_due():
            missing = [self._tags[h] for h in self._missing]
            if any(t.node is None for t in missing):
                await self._resolve(t for t in missing if t.node is None)
            await self._monitor(missing)

    async def _forget(self, client: Client, tags: list[_Tag]) -> None:
        """Delete the monitored items of vanished nodes; they are re-created once the node is back."""
        self._vanished.clear()
        ids = [t.item for t in tags if t.item is not None]
        for tag in tags:
            tag.item = None
            self._missing[tag.handle] = UNKNOWN  # already reported by the notification
            log.warning("device %s: the node of tag %s (%s) is gone; trying again",
                        self.name, tag.name, tag.config.node)  # fmt: skip
        for batch in _chunks(ids, self._batch(self._per_call)):
            params = ua.DeleteMonitoredItemsParameters(self._subscription, batch)
            await client.uaclient.delete_monitored_items(params)  # results: gone either way

    async def _monitor(self, tags: list[_Tag]) -> None:
        """Create monitored items; a node the server refuses is reported Bad once and stays
        missing, to be tried again on the next cycle."""
        assert self._client is not None
        now = self._clock()
        for tag in tags:
            if tag.node is None:
                self._report_missing(tag, UNKNOWN, now)
        todo = [t for t in tags if t.node is not None]
        retry: list[_Tag] = []
        for batch in _chunks(todo, self._batch(self._per_call)):
            params = ua.CreateMonitoredItemsParameters(
                self._subscription, ua.TimestampsToReturn.Both, [self._item(t) for t in batch]
            )
            results = await self._client.uaclient.create_monitored_items(params)
            for tag, result in zip(batch, results, strict=True):
                code = result.StatusCode.value
                if code in FILTER_REFUSED and tag.filtered:
                    tag.filtered = False
                    retry.append(tag)
                elif result.StatusCode.is_good():
                    tag.item = result.MonitoredItemId
                    if self._missing.pop(tag.handle, 0):  # 0: not reported missing, first attempt
                        log.info("device %s: tag %s is monitored again", self.name, tag.name)
                else:
                    self._report_missing(tag, code, now)
        if retry:
            await self._monitor(retry)

    def _retry_due(self) -> bool:
        now = time.monotonic()
        if now < self._retry_at:
            return False
        self._retry_at = now + self.retry_every
        return True

    def _report_missing(self, tag: _Tag, status: int, now: float) -> None:
        if self._missing.get(tag.handle) != status:
            self.buffer.append(bad(self.name, tag.name, status, now, tag.config.unit))
            log.warning("device %s: tag %s (%s) cannot be monitored: %s; trying again", self.name,
                        tag.name, tag.config.node, status_name(status))  # fmt: skip
        self._missing[tag.handle] = status

    def _item(self, tag: _Tag) -> ua.MonitoredItemCreateRequest:
        config = tag.config
        interval = config.sampling_interval or self._device.publishing_interval
        params = ua.MonitoringParameters(
            ClientHandle=tag.handle, SamplingInterval=interval * 1000, QueueSize=config.queue_size,
            DiscardOldest=True,
        )  # fmt: skip
        if config.deadband is not None and tag.filtered:
            params.Filter = ua.DataChangeFilter(
                ua.DataChangeTrigger.StatusValue, ua.DeadbandType.Absolute, config.deadband
            )
        return ua.MonitoredItemCreateRequest(
            ua.ReadValueId(tag.node, AttributeIds.Value), ua.MonitoringMode.Reporting, params
        )


def _node_id(ref: NodeRef, index: int) -> ua.NodeId:
    # asyncua annotates its fields with NewTypes (Int16, String, ...) of the plain values.
    return ua.NodeId(cast(Any, ref.identifier), ua.Int16(index))


def _chunks(items: list[T], size: int) -> Iterator[list[T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _limit(value: ua.DataValue) -> int:
    """An operation limit as read: 0 (no limit) when the server does not say."""
    good = value.StatusCode is None or value.StatusCode.is_good()  # absent means Good
    number = value.Value.Value if good and value.Value is not None else None
    return number if isinstance(number, int) and number > 0 else 0


def _reason(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) < 300 else text[:300] + "..."


def _learned(tag: _Tag, dv: ua.DataValue) -> Datatype | None:
    """The datatype `dv` tells for `tag` if it is new (the first value, or the server changed
    the node's type), else None. An array has no neutral datatype and tells nothing."""
    variant = dv.Value
    if variant is None or variant.is_array:
        return None
    datatype = _BY_VARIANT.get(variant.VariantType)
    if datatype is None or datatype == tag.datatype:
        return None
    tag.datatype = datatype
    return datatype
