"""The Sparkplug B edge node: births and deaths, sequence numbers, commands, primary host,
and the readings of the outbox as DDATA.

The node is a `Publisher`: the engine's forward loop (`gateway.app.forward`) calls
`announce()` for the births (and the NDEATH of a session the node ends) and `publish()` for
each batch, so one task sends everything in a session, in order: NBIRTH, the DBIRTHs,
DDATA, DDEATH. So `seq` needs no lock, and a rebirth can never interleave with data.

Decisions, and why:

- **Delivery.** DATA messages are QoS 0, as Sparkplug prescribes; QoS 0 has no
  acknowledgement, so after each batch the node waits for a barrier (see
  `Session.barrier`): only when the broker has processed the batch does `publish` return
  and the loop ack it. A connection lost before that releases the batch: nothing that
  reached the outbox is lost, it is replayed as history in the next session.
- **History.** At every birth (connect, rebirth) the rows not yet published become the
  history lane of the outbox (`Outbox.begin_replay`); the DBIRTHs carry the newest value
  of every metric, and the history is published as DDATA with `is_historical` and the
  original timestamps; the loop alternates history and live batches, so a long backlog
  does not hold live values back.
- **Device state.** Device events (`gateway.model.state_event`) come from the outbox with
  each live batch, each in its place among the readings (`Batch.events`): a down event
  becomes a DDEATH where it falls, after the device's Bad readings; the device's next
  readings bring a DBIRTH first.
  Births read each device's newest event from the outbox (kept across a restart), and
  send a DDEATH for each device that is down. History does not change what the host was
  told: a device down now gets its history between a DBIRTH and a DDEATH.
- **Datatypes.** A Modbus tag's datatype follows from its config. An OPC UA tag's is told
  by a datatype event before its first value (`gateway.model.datatype_event`), and births
  take the newest of those from the outbox; before any, its DBIRTH announces it as a null
  String. A datatype learned (or changed) since the device's last DBIRTH brings a new
  DBIRTH before the value.
- **Primary host.** An offline STATE only sets a flag (`due`); the loop then has the node
  send the NDEATH and reconnect between two batches, never inside one.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import cast

from gateway.collectors import DeviceSettings
from gateway.collectors.registry import protocol
from gateway.config import MqttSettings, Settings, SparkplugSettings
from gateway.errors import BrokerUnavailable, MessagesRefused
from gateway.model import (
    DATATYPE_EVENT,
    DOWN,
    EVENT,
    STATE_EVENT,
    Batch,
    Datatype,
    Entry,
    Quality,
    Reading,
    Status,
    Value,
)
from gateway.outbox import DEFAULT_OUTPUT, Outbox
from gateway.publishers import Published
from gateway.publishers.formats import OutputContext
from gateway.publishers.mqtt import MqttConnection
from gateway.publishers.session import Message
from gateway.publishers.sparkplug.payload import (
    NAMESPACE,
    DataType,
    Metric,
    Payload,
    add_properties,
    datatype_of,
    fits,
    parse,
    set_value,
)

log = logging.getLogger(__name__)

REBIRTH = "Node Control/Rebirth"
# A DDATA's metrics stay under this, or the broker's maximum packet size if it says a lower
# one: AWS IoT Core takes 128 KB, EMQX announces 1 MB; 256 KiB keeps a replay of 2,000 long
# strings in a handful of messages.
_DDATA_BYTES = 256 * 1024
BDSEQ = "bdSeq"
_MAX_WARNINGS = 1000

# The Sparkplug datatype of each neutral one (gateway.model.Datatype), whatever the protocol.
# A value with no datatype known (an OPC UA array) is typed from the value itself: an array
# travels as String (its JSON text).
_DATATYPES: dict[Datatype, DataType] = {
    "bool": DataType.BOOLEAN, "int8": DataType.INT8, "uint8": DataType.UINT8,
    "int16": DataType.INT16, "uint16": DataType.UINT16, "int32": DataType.INT32,
    "uint32": DataType.UINT32, "int64": DataType.INT64, "uint64": DataType.UINT64,
    "float32": DataType.FLOAT, "float64": DataType.DOUBLE, "string": DataType.STRING,
    "datetime": DataType.DATETIME, "bytes": DataType.BYTES,
}  # fmt: skip


@dataclass(slots=True)
class MetricSpec:
    """A device metric: its tag, alias, unit, and datatype (None until learned)."""

    name: str
    alias: int | None
    unit: str | None
    datatype: DataType | None
    sure: bool = False  # the datatype came from the config or the server, not from a value
    born: DataType | None = None  # the datatype announced by the device's last DBIRTH
    learned: DataType | None = None  # the newest the device told (a datatype event)
    configured: bool = False  # the config types it: no datatype event changes it


def metric_types(device: DeviceSettings) -> list[tuple[str, DataType | None, str | None]]:
    """(tag, datatype, unit) of each tag of a configured device, as its protocol knows them
    from the config (None: learned from the values)."""
    return [
        (tag, None if datatype is None else _DATATYPES[datatype], unit)
        for tag, datatype, unit in protocol(device).metric_types(device)
    ]


def build(context: OutputContext) -> SparkplugNode:
    """The Sparkplug B edge node of one output (FORMATS["sparkplug"]); its bdSeq is kept
    beside the outbox."""
    s, output = context.settings, context.output
    sparkplug = output.sparkplug
    # The config requires the section with format: sparkplug, and load fills in the ids.
    assert sparkplug is not None
    assert sparkplug.edge_node_id is not None
    assert output.client_id is not None
    return SparkplugNode(
        output,
        sparkplug,
        context.outbox,
        edge_node_id=sparkplug.edge_node_id,
        devices={device.name: metric_types(device) for device in s.devices},
        bdseq=BdSeqFile(bdseq_path(s, output.name)),
        client_id=output.client_id,
        output=output.name,
    )


def bdseq_path(settings: Settings, output: str = DEFAULT_OUTPUT) -> Path:
    """Beside the outbox: `<outbox>.bdseq` for the output of the `mqtt:` shorthand (as before
    there were several outputs), `<outbox>.<name>.bdseq` for another (one per edge node)."""
    path = settings.outbox.path
    middle = "" if output == DEFAULT_OUTPUT else f".{output}"
    return path.with_name(f"{path.name}{middle}.bdseq")


class BdSeqFile:
    """The bdSeq counter, kept in a small file so that it keeps counting across restarts."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._last: int | None = None  # read from the file once, then counted here
        self._warned = False

    def next(self) -> int:
        """The bdSeq for the next CONNECT: one more than the last (0 after 255, and at first)."""
        if self._last is None:
            try:
                self._last = int(self.path.read_text(encoding="ascii").strip())
            except (OSError, ValueError):
                self._last = -1
        last = self._last
        value = self._last = (last + 1) % 256 if 0 <= last <= 255 else 0
        try:
            # Written and synced before the CONNECT that uses it: a crash right after must
            # not hand out the same bdSeq again.
            tmp = self.path.with_name(self.path.name + ".tmp")
            with tmp.open("w", encoding="ascii") as f:
                f.write(f"{value}\n")
                f.flush()
                os.fsync(f.fileno())
            tmp.replace(self.path)
        except OSError as exc:
            if not self._warned:
                log.error("cannot save the Sparkplug bdSeq in %s: %s; it counts on, but from 0 again "
                          "after a restart", self.path, exc.strerror or exc)  # fmt: skip
                self._warned = True
        return value


def _by_size(entries: list[Entry], limit: int) -> Iterable[list[Entry]]:
    """`entries` in runs whose metrics (estimated) take at most `limit` bytes each; one entry
    alone may take more (the broker refuses it then, and it is counted)."""
    run: list[Entry] = []
    size = 0
    for entry in entries:
        need = _metric_bytes(entry.reading)
        if run and size + need > limit:
            yield run
            run, size = [], 0
        run.append(entry)
        size += need
    if run:
        yield run


def _metric_bytes(r: Reading) -> int:
    """At least what `r` takes as a DDATA metric: name, timestamp, datatype and framing, the
    value (text at up to 4 bytes a character in UTF-8; an array as its JSON text), and the
    Quality and Status properties when not Good."""
    value = r.value
    size = 32 + 4 * len(r.tag)
    if isinstance(value, str):
        size += 4 * len(value)
    elif isinstance(value, list):
        size += 4 * len(str(value))
    else:
        size += 16
    return size if r.quality is Quality.GOOD else size + 64


def _clip(text: str, limit: int = 120) -> str:
    """Text from the network, cut for a log line (a metric name may be megabytes long)."""
    return text if len(text) <= limit else f"{text[:limit]}..."


def _ms(ts: float) -> int:
    return int(ts * 1000)


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


class SparkplugNode:
    """A Sparkplug B edge node publishing one output's share of the outbox: a `Publisher`,
    run by the engine's forward loop. `close()` says NDEATH and disconnects."""

    def __init__(
        self,
        mqtt: MqttSettings,
        sparkplug: SparkplugSettings,
        outbox: Outbox,
        *,
        edge_node_id: str,
        devices: Mapping[str, Sequence[tuple[str, DataType | None, str | None]]],
        bdseq: BdSeqFile,
        client_id: str,
        output: str = DEFAULT_OUTPUT,
    ) -> None:
        self._outbox = outbox
        self._output = output  # its name in the outbox
        self._version = mqtt.version
        self._max_message = mqtt.max_message_bytes  # the platform's, or the output's own
        self._aliases = sparkplug.aliases
        self._host = sparkplug.primary_host_id
        group, node = sparkplug.group_id, edge_node_id
        self._nbirth_topic = f"{NAMESPACE}/{group}/NBIRTH/{node}"
        self._ndeath_topic = f"{NAMESPACE}/{group}/NDEATH/{node}"
        self._ncmd_topic = f"{NAMESPACE}/{group}/NCMD/{node}"
        self._dcmd_filter = f"{NAMESPACE}/{group}/DCMD/{node}/+"
        self._device_topic = f"{NAMESPACE}/{group}/{{}}/{node}/{{}}"
        self._state_topic = f"{NAMESPACE}/STATE/{self._host}" if self._host else None
        self._bdseq_file = bdseq
        self.bdseq = -1

        self._next_alias = 1
        self._metrics: dict[str, dict[str, MetricSpec]] = {}
        for name, specs in devices.items():
            for tag, datatype, unit in specs:
                self._add_metric(name, tag, datatype, unit, configured=True)

        # What the host has been told in this session (in publish order). (The newest reading
        # and event of each metric and device, published or not, the outbox keeps.)
        self._current: dict[str, dict[str, Reading]] = {}
        self._born: set[str] = set()
        self._seq = 0
        self._birth_due = True
        self._generation = -1  # the connection the births went out on
        # Primary host: the newest STATE timestamp seen, and whether it said online.
        self._state_ts: float | None = None
        self._host_online = False
        self._leave_due = False  # the primary host went offline: NDEATH and reconnect
        self._warned: set[str] = set()
        self._wake = asyncio.Event()  # set on a STATE, a connect, a rebirth: births wait for the host

        self.connection = MqttConnection(
            mqtt,
            client_id=client_id,
            will=self._will,
            on_connect=self._on_connect,
            on_message=self._on_message,
            nodelay=True,  # each batch ends with a barrier: see Session.attach
        )

    # -- the connection's side ---------------------------------------------------------

    def _will(self) -> Message:
        """The NDEATH for the next CONNECT, with the next bdSeq (asked before each attempt)."""
        self.bdseq = self._bdseq_file.next()
        return self._ndeath()

    def _ndeath(self) -> Message:
        payload = Payload(timestamp=_now_ms())
        self._node_metric(payload, BDSEQ, DataType.INT64, self.bdseq)
        return self._ndeath_topic, payload.SerializeToString(), 1, False

    async def _on_connect(self) -> None:
        """Subscribe before any birth: the commands, and the primary host's STATE."""
        filters = [(self._ncmd_topic, 1), (self._dcmd_filter, 1)]
        if self._state_topic is not None:
            filters.insert(0, (self._state_topic, 1))
        # A new session must see the host online again (its retained STATE comes right after
        # the SUBACK): the broker may have lost or changed it meanwhile.
        self._host_online = False
        self._leave_due = False
        await self.connection.subscribe(filters)
        self._birth_due = True
        self._woken()

    def _on_message(self, topic: str, data: bytes) -> None:
        if topic == self._state_topic:
            self._on_state(data)
        elif topic == self._ncmd_topic:
            self._on_ncmd(data)
        else:
            # One key for every DCMD: the topics come from the network, and a key per topic
            # would let any client grow the set without bound.
            what = "DCMD on %s ignored: this gateway does not write to devices"
            self._warn_once("dcmd", what, _clip(topic))

    def _on_ncmd(self, data: bytes) -> None:
        try:
            payload = parse(data)
        except ValueError as exc:
            self._warn_once("ncmd-payload", "NCMD ignored: %s", exc)
            return
        for m in payload.metrics:
            if m.name == REBIRTH:
                if m.WhichOneof("value") == "boolean_value" and m.boolean_value:
                    log.info("rebirth requested by NCMD")
                    self._birth_due = True
                    self._woken()
            else:  # (one key for all: the names come from the network)
                name = _clip(m.name) or m.alias
                self._warn_once("ncmd metric", "NCMD metric %r ignored: not supported", name)

    def _on_state(self, data: bytes) -> None:
        try:
            doc = json.loads(data)
            online, ts = doc["online"], doc["timestamp"]
            # (isfinite raises OverflowError for an int past a float's range: not a timestamp)
            number = isinstance(ts, (int, float)) and not isinstance(ts, bool) and math.isfinite(ts)
            if not isinstance(online, bool) or not number:
                raise TypeError("online must be a boolean and timestamp a finite number")
        except (ValueError, KeyError, TypeError, RecursionError, OverflowError) as exc:
            self._warn_once("state", "STATE of primary host %s ignored: not valid (%s)", self._host, exc)
            return
        if self._state_ts is not None and ts < self._state_ts:
            log.debug("older STATE of %s ignored", self._host)
            return
        self._state_ts = ts
        if online:
            if not self._host_online:
                log.info("primary host %s is online", self._host)
            self._host_online = True
            self._woken()
            return
        was_online, self._host_online = self._host_online, False
        if self._generation == self.connection.generation:
            # Births went out on this connection: end the session. The publishing task does
            # it, between two messages, so the NDEATH never lands inside a batch.
            log.warning("primary host %s went offline: NDEATH, disconnecting; readings wait in the outbox",
                        self._host)  # fmt: skip
            self._leave_due = True
            self._woken()
        elif was_online or self._generation == -1:
            log.info("waiting for primary host %s to come online", self._host)

    async def _leave(self) -> None:
        self._leave_due = False
        self._birth_due = True
        self._generation = -1  # no more data on this connection
        final = [] if self._version == "5" else [self._ndeath()]
        await self.connection.reconnect("primary host offline", final, with_will=True)

    async def close(self) -> None:
        """NDEATH, then DISCONNECT: MQTT 5 asks the broker to publish the will (reason 0x04);
        with 3.1.1 the node publishes the NDEATH itself first."""
        final = [] if self._version == "5" else [self._ndeath()]
        await self.connection.close(final, with_will=True)

    def _woken(self) -> None:
        """Something for the loop to do, rows or not: a birth, a leave."""
        self._wake.set()
        self._outbox.wake(self._output)

    # -- the Publisher contract (the engine's forward loop) ------------------------------

    @property
    def due(self) -> bool:
        """Births (after a connect, a rebirth asked for) or a leave (the host went offline)
        must come before the next batch."""
        return self._birth_due or self._leave_due

    async def announce(self) -> None:
        """The NDEATH of a session the primary host left; or the births, once the primary
        host (if one is configured) is online."""
        if self._leave_due:
            await self._leave()
            return
        while self._host is not None and not self._host_online:
            self._wake.clear()
            await self._wake.wait()  # the STATE, or a new connection
            if self._leave_due:
                return
        await self._birth()

    async def publish(self, batch: Batch) -> Published:
        """DDATA (and the DBIRTHs and DDEATHs between) for `batch`, up to a metric that needs
        a rebirth first; returns once the broker has processed them (the barrier)."""
        if batch.resync:  # events were forgotten before this node took them: births again
            self._birth_due = True
            return Published(0)
        messages, done, carried = self._messages(batch, historical=batch.historical)
        try:
            await self._send(messages)
        except BrokerUnavailable as lost:
            # Lost before the barrier: nothing of the batch is confirmed, whatever went out (a
            # QoS 0 message counts as settled once written). The loop releases it all.
            raise BrokerUnavailable(str(lost)) from lost
        except MessagesRefused as exc:
            # Every other message was confirmed (the barrier ran): the readings of a refused
            # DDATA are dropped, counted and logged (once per topic, by the loop), like a
            # refused UNS message. A refused DBIRTH leaves its device unborn: its next
            # readings bring another.
            for i in exc.indices:
                self._unborn(messages[i][0])
            return Published(done, sum(carried.get(i, 0) for i in exc.indices), exc.refused)
        return Published(done)

    async def _birth(self) -> None:
        """NBIRTH and every DBIRTH (and a DDEATH for each device that is down); the rows not
        yet published become history."""
        self._birth_due = False
        generation = self.connection.generation
        boundary = self._outbox.begin_replay(self._output)
        # The newest value of each metric and the newest event of each device, also from
        # before a restart, not nulls. Read after the split: a value the outbox takes
        # meanwhile is announced and then published again as live DDATA, rather than
        # announced older while it goes out as history.
        self._current = {}
        down: set[str] = set()
        for r in await self._outbox.newest():
            if r.tag[0] != EVENT:
                self._current.setdefault(r.device, {})[r.tag] = r
            elif r.tag == STATE_EVENT:
                if r.value == DOWN:
                    down.add(r.device)
            else:
                self._told_datatype(r)
        now = _now_ms()
        self._seq = 255  # the NBIRTH takes 0
        nbirth = Payload(timestamp=now, seq=self._next_seq())
        self._node_metric(nbirth, BDSEQ, DataType.INT64, self.bdseq)
        self._node_metric(nbirth, REBIRTH, DataType.BOOLEAN, False)
        messages: list[Message] = [(self._nbirth_topic, nbirth.SerializeToString(), 0, False)]
        self._born.clear()
        for device in self._metrics:
            messages.append(self._dbirth(device, now))
        messages.extend(self._ddeath(d) for d in self._metrics if d in down)
        self._generation = generation
        try:
            await self._send(messages, barrier=False)
        except MessagesRefused as exc:
            # A device the broker cannot take (a name buffered by an older version that no
            # topic may carry, a birth larger than the broker takes): the other births went
            # out; it stays unborn, and its readings bring another DBIRTH.
            for topic, _ in exc.refused:
                self._unborn(topic)
            self._warn_once("births refused", "births refused by the broker: %s", exc)
        if self._outbox.replaying(self._output):
            log.info(
                "births sent (bdSeq %d); replaying readings up to seq %d as historical", self.bdseq, boundary
            )
        else:
            log.info("births sent (bdSeq %d)", self.bdseq)

    async def _send(self, messages: list[Message], *, barrier: bool = True) -> None:
        if not messages:
            return
        if self._generation != self.connection.generation:
            # Reconnected since the births: this session needs its own births first.
            raise BrokerUnavailable("reconnected: births first")
        try:
            await self.connection.publish_many(messages)
        except MessagesRefused:
            if barrier:  # the others went out: confirm them before the caller acks
                await self.connection.barrier()
            raise
        if barrier:
            await self.connection.barrier()

    # -- messages ----------------------------------------------------------------------

    def _messages(self, batch: Batch, *, historical: bool) -> tuple[list[Message], int, dict[int, int]]:
        """DDATA per device, in seq order, with the DBIRTHs and DDEATHs that fall between;
        and how many entries they carry.

        Live: the batch's device events are taken where they fall: a down event becomes a
        DDEATH, a datatype event updates its metric. History has no events (the births told
        the current state); a device
        that is down now gets its history between a DBIRTH and a DDEATH, so the host never
        gets data for a dead device. A metric of a live device that the host does not know
        yet (a new tag, a datatype learned) cuts the batch short: the node must rebirth
        first, since a DBIRTH announces every metric for the whole session. `carried` maps
        the index of each DDATA to the number of entries in it.
        """
        messages: list[Message] = []
        carried: dict[int, int] = {}
        group: dict[str, list[Entry]] = {}
        revived: list[str] = []
        events, e = batch.events, 0
        done = 0
        for entry in batch.entries:
            while e < len(events) and events[e].after < entry.seq:
                self._event(events[e].reading, group, messages, carried)
                e += 1
            r = entry.reading
            changed = self._learn(r, historical=historical)
            if r.device not in self._born:
                self._flush(group, messages, carried, historical=historical)
                messages.append(self._dbirth(r.device, _now_ms()))
                if historical:
                    revived.append(r.device)
            elif changed:
                log.info("%s: metric %r is new or has a new datatype: rebirth", r.device, r.tag)
                self._birth_due = True
                break
            group.setdefault(r.device, []).append(entry)
            done += 1
        if done == len(batch):
            for event in events[e:]:
                self._event(event.reading, group, messages, carried)
        self._flush(group, messages, carried, historical=historical)
        messages.extend(self._ddeath(device) for device in revived if device in self._born)
        return messages, done, carried

    def _event(
        self, event: Reading, group: dict[str, list[Entry]], messages: list[Message], carried: dict[int, int]
    ) -> None:
        """A device event of the live lane, where it falls among the readings."""
        if event.tag == STATE_EVENT:
            if event.value == DOWN:
                self._flush(group, messages, carried, historical=False)
                self._died(event.device, messages)
        elif event.tag.startswith(DATATYPE_EVENT):
            self._told_datatype(event)

    def _told_datatype(self, event: Reading) -> None:
        """A datatype event: what the device says the tag's values are, from now on."""
        specs = self._metrics.get(event.device)
        spec = specs.get(event.tag[len(DATATYPE_EVENT) :]) if specs is not None else None
        datatype = _DATATYPES.get(cast("Datatype", event.value))
        if spec is None or spec.configured or datatype is None or spec.learned is datatype:
            return  # (configured: a stale event of a device that had another protocol)
        spec.learned = datatype
        if spec.datatype is not None:
            spec.sure = False  # the next value is typed again: by the learned datatype if it fits

    def _died(self, device: str, messages: list[Message]) -> None:
        if device in self._born:  # once per outage
            messages.append(self._ddeath(device))

    def _flush(
        self, group: dict[str, list[Entry]], messages: list[Message], carried: dict[int, int], *,
        historical: bool,
    ) -> None:  # fmt: skip
        """A DDATA per device for `group`; as many as it takes to stay under the broker's
        maximum packet size (a replay leases thousands of readings at once)."""
        limit = self._ddata_bytes()
        for device, entries in group.items():
            for chunk in _by_size(entries, limit):
                carried[len(messages)] = len(chunk)
                messages.append(self._ddata(device, chunk, historical=historical))
        group.clear()

    def _ddata_bytes(self) -> int:
        """What the metrics of one DDATA may take: under the broker's announced maximum
        packet size and the output's max_message_bytes (the rest is room for the topic and
        the headers), and under _DDATA_BYTES."""
        limits = [_DDATA_BYTES]
        for largest in (self.connection.max_packet, self._max_message):
            if largest is not None:
                limits.append(largest - 512)
        return max(1, min(limits))

    def _unborn(self, topic: str) -> None:
        """A DBIRTH on `topic` did not go out: the device has to be born again."""
        parts = topic.split("/")
        if len(parts) == 5 and parts[2] == "DBIRTH":
            self._born.discard(parts[4])

    def _learn(self, r: Reading, *, historical: bool) -> bool:
        """Note `r`'s metric and datatype; True when the host has not been told them: a new
        metric, or a datatype learned (or, from a live value, changed) since the last DBIRTH.
        An old value does not change a known datatype: it goes out as null if it does not fit."""
        specs = self._metrics.get(r.device)
        spec = specs.get(r.tag) if specs is not None else None
        if spec is None:
            self._warn_once(f"adopt {r.device}", "publishing readings of %r, which is not configured (any "
                            "more): its metrics are added as they appear", r.device)  # fmt: skip
            self._add_metric(r.device, r.tag, datatype_of(r.value), r.unit)
            return True
        value = r.value
        if value is not None and (
            spec.datatype is None
            # A live value may correct a datatype: one that does not fit, or one guessed from
            # a value before the server's type was known (a backlog after a restart).
            or (not historical and (not fits(spec.datatype, value) or not spec.sure))
        ):
            self._infer(spec, value)
        return spec.datatype is not None and spec.born != spec.datatype

    @staticmethod
    def _infer(spec: MetricSpec, value: Value) -> None:
        """Type a metric the config does not type: by the datatype its device told (a
        datatype event) where the value fits it, else from the value itself."""
        learned = spec.learned
        if learned is not None and (value is None or fits(learned, value)):
            spec.datatype, spec.sure = learned, True
        elif value is not None and (spec.datatype is None or not fits(spec.datatype, value)):
            spec.datatype, spec.sure = datatype_of(value), False

    def _dbirth(self, device: str, now: int) -> Message:
        payload = Payload(timestamp=now, seq=self._next_seq())
        values = self._current.get(device, {})
        for tag, spec in self._metrics[device].items():
            r = values.get(tag)
            # Typed from the newest value if not known yet; by the datatype the device told
            # if there is one (a datatype guessed from a value stays until a live value).
            if spec.datatype is None or (spec.learned is not None and not spec.sure):
                self._infer(spec, None if r is None else r.value)
            # Not known yet (no value seen): announced as a null String; the first value
            # that is not a string brings a new DBIRTH with its datatype.
            spec.born = spec.datatype or DataType.STRING
            m = payload.metrics.add(name=spec.name, datatype=spec.born)
            if spec.alias is not None:
                m.alias = spec.alias
            if r is None:
                m.timestamp = now
                m.is_null = True
                add_properties(m, Quality.BAD, Status.BAD_WAITING_FOR_INITIAL_DATA, spec.unit)
            else:
                m.timestamp = _ms(r.timestamp)
                self._set(m, spec.born, r)
                add_properties(m, r.quality, r.status, spec.unit)
        self._born.add(device)
        return self._device_topic.format("DBIRTH", device), payload.SerializeToString(), 0, False

    def _ddata(self, device: str, entries: Iterable[Entry], *, historical: bool) -> Message:
        payload = Payload(timestamp=_now_ms(), seq=self._next_seq())
        specs = self._metrics[device]
        current = self._current.setdefault(device, {})
        for entry in entries:
            r = entry.reading
            spec = specs[r.tag]
            m = payload.metrics.add()
            if spec.alias is not None:
                m.alias = spec.alias
            else:
                m.name = spec.name
            m.timestamp = _ms(r.timestamp)
            assert spec.born is not None
            if historical:
                self._set(m, spec.born, r)
                m.is_historical = True
                if r.quality is not Quality.GOOD:
                    add_properties(m, r.quality, r.status)
            else:
                # No second check of the datatype: _learn cut the batch for a live value
                # that does not fit what the last DBIRTH announced.
                set_value(m, spec.born, r.value)
                previous = current.get(r.tag)
                # The host keeps a metric's quality until told otherwise: say it when it is
                # not Good, and once more when it is Good again.
                was_good = previous is None or previous.quality is Quality.GOOD
                if r.quality is not Quality.GOOD or not was_good:
                    add_properties(m, r.quality, r.status)
                current[r.tag] = r
        return self._device_topic.format("DDATA", device), payload.SerializeToString(), 0, False

    def _ddeath(self, device: str) -> Message:
        self._born.discard(device)
        payload = Payload(timestamp=_now_ms(), seq=self._next_seq())
        return self._device_topic.format("DDEATH", device), payload.SerializeToString(), 0, False

    @staticmethod
    def _set(m: Metric, datatype: DataType, r: Reading) -> None:
        value = r.value
        if value is not None and not fits(datatype, value):
            # Only history older than its metric's datatype gets here (a tag whose type
            # changed): published as null rather than as a wrong number.
            value = None
        set_value(m, datatype, value)

    @staticmethod
    def _node_metric(payload: Payload, name: str, datatype: DataType, value: int | bool) -> None:
        m = payload.metrics.add(name=name, timestamp=payload.timestamp, datatype=datatype)
        set_value(m, datatype, value)

    def _next_seq(self) -> int:
        self._seq = (self._seq + 1) & 0xFF
        return self._seq

    def _add_metric(
        self, device: str, tag: str, datatype: DataType | None, unit: str | None, *, configured: bool = False
    ) -> None:
        alias = None
        if self._aliases:
            alias, self._next_alias = self._next_alias, self._next_alias + 1
        self._metrics.setdefault(device, {})[tag] = MetricSpec(
            tag,
            alias,
            unit,
            datatype,
            sure=datatype is not None,
            configured=configured and datatype is not None,
        )

    def _warn_once(self, key: str, msg: str, *args: object) -> None:
        # (keys name kinds, and the devices the outbox holds: a few; bounded all the same)
        if key not in self._warned and len(self._warned) < _MAX_WARNINGS:
            self._warned.add(key)
            log.warning(msg, *args)
