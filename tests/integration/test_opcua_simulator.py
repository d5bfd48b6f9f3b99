"""The OPC UA machine simulator, over a real loopback socket, with asyncua's client."""

import asyncio
import hashlib
import stat
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from asyncua import ua
from asyncua.client.client import Client
from asyncua.common.node import Node
from asyncua.common.subscription import DataChangeNotif
from asyncua.crypto import cert_gen
from asyncua.crypto.security_policies import SecurityPolicyBasic256Sha256
from asyncua.ua.object_ids import ObjectIds
from asyncua.ua.status_codes import StatusCodes
from asyncua.ua.uaerrors import BadIdentityTokenRejected, BadUserAccessDenied
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID

from simulators.opcua import OpcUaSimulator, node_id
from simulators.opcua_model import BATCH_GUID, VARIABLES, Plant
from simulators.signals import MachineState
from tests.helpers import eventually

NS = OpcUaSimulator.NAMESPACE
V = ua.VariantType
CLIENT_URI = "urn:millwright:test:client"

# Every variable and the type a read returns: the contract the collector codes against.
TYPES = {
    "s=CNC1.State": V.String,
    "s=CNC1.Alarm": V.Boolean,
    "s=CNC1.AlarmCode": V.UInt16,
    "s=CNC1.PartCount": V.UInt32,
    "s=CNC1.Temperature": V.Double,
    "s=CNC1.FeedOverride": V.Int16,
    "s=CNC1.CycleStart": V.DateTime,
    "s=CNC1.OperatingSeconds": V.Int64,
    "s=CNC1.ToolNumber": V.Byte,
    "s=CNC1.Spindle.Speed": V.Double,
    "s=CNC1.Spindle.Load": V.Float,
    "s=CNC1.Spindle.Direction": V.SByte,
    "s=CNC1.Spindle.Revolutions": V.UInt64,
    "s=CNC1.Axis.X.Position": V.Double,
    "s=CNC1.Axis.Y.Position": V.Double,
    "s=CNC1.Axis.Z.Position": V.Double,
    "s=CNC1.Axis.Positions": V.Double,  # an array of three
    "s=CNC1.Program.Name": V.String,
    "s=CNC1.Program.Block": V.Int32,
    "s=CNC1.Program.Checksum": V.ByteString,
    "s=CNC1.Program.Description": V.LocalizedText,
    "s=Packer1.Speed": V.Double,
    "i=5001": V.UInt32,  # Packer1.Count
    "s=Packer1.Running": V.Boolean,
    "i=5002": V.UInt32,  # Packer1.RejectCount
    "s=Packer1.SealTemperature": V.Double,
    f"g={BATCH_GUID}": V.String,  # Packer1.BatchId
}


@pytest.fixture
async def sim(tmp_path: Path) -> AsyncIterator[OpcUaSimulator]:
    async with OpcUaSimulator(port=0, seed=42, pki_dir=tmp_path / "pki") as simulator:
        yield simulator


@pytest.fixture
async def client(sim: OpcUaSimulator) -> AsyncIterator[Client]:
    async with Client(sim.endpoint, timeout=2) as opcua:
        yield opcua


def node(client: Client, sim: OpcUaSimulator, ident: str) -> Node:
    return client.get_node(f"ns={sim.namespace_index};{ident}")


async def read(client: Client, sim: OpcUaSimulator, *idents: str) -> list[ua.DataValue]:
    """Read values the way the collector polls: read_attributes keeps status and timestamps."""
    return await client.read_attributes([node(client, sim, i) for i in idents])


def good(data: ua.DataValue) -> bool:
    return data.StatusCode is not None and data.StatusCode.is_good()


def status(code: int) -> ua.StatusCode:
    return ua.StatusCode(ua.UInt32(code))


def value(data: ua.DataValue) -> Any:
    """The plain value of a read; None when it carries none (a Bad status)."""
    return None if data.Value is None else data.Value.Value


def client_certificate() -> tuple[bytes, bytes]:
    """A fresh client certificate and key, both DER (asyncua reads paths via worker threads)."""
    key = cert_gen.generate_private_key()
    cert = cert_gen.generate_self_signed_app_certificate(
        key,
        "millwright test client",
        {},
        [x509.UniformResourceIdentifier(CLIENT_URI)],
        [ExtendedKeyUsageOID.CLIENT_AUTH],
    )
    der_key = key.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return cert.public_bytes(serialization.Encoding.DER), der_key


async def secure_client(
    sim: OpcUaSimulator, mode: ua.MessageSecurityMode, user: str | None, password: str | None
) -> Client:
    opcua = Client(sim.endpoint, timeout=2)
    opcua.application_uri = CLIENT_URI
    cert, key = client_certificate()
    await opcua.set_security(
        SecurityPolicyBasic256Sha256, cert, key, server_certificate=sim.certificate.read_bytes(), mode=mode
    )
    if user is not None:
        opcua.set_user(user)
    if password is not None:
        opcua.set_password(password)
    return opcua


# --- the machine models (no server) --------------------------------------------------------------


def test_an_hour_of_the_machines() -> None:
    """The seeded models over an hour: every CNC state shows up, counters only count up, and
    every analog value stays inside the EURange the node advertises."""
    plant = Plant("7", tick=0.5, wall_offset=0.0)
    ranged = [(v, v.eu_range) for v in VARIABLES if v.eu_range is not None]
    counters = [v for v in VARIABLES if v.vtype in (V.UInt32, V.UInt64, V.Int64) and "Count" in v.name]
    states, last, stopped_for = set(), {v.name: -1 for v in counters}, 0
    for second in range(3600):
        plant.advance(float(second))
        states.add(plant.cnc.state)
        for var, (low, high) in ranged:
            reading = var.read(plant)
            assert isinstance(reading, float | int)
            assert low <= reading <= high, (second, var.name)
        for var in counters:
            count = var.read(plant)
            assert isinstance(count, int)
            assert count >= last[var.name], (second, var.name)
            last[var.name] = count
        stopped_for = 0 if plant.cnc.running else stopped_for + 1
        if stopped_for > 5:
            assert plant.cnc.spindle_speed == 0.0, second  # braked to a standstill
    assert states == {"Idle", "Running", "Stopped", "Alarm"}


# --- address space -----------------------------------------------------------------------------


async def test_browse_finds_the_machines(sim: OpcUaSimulator, client: Client) -> None:
    ns = await client.get_namespace_index(NS)
    assert ns == sim.namespace_index == 2
    machines = await client.nodes.objects.get_child(f"{ns}:Machines")
    names = {(await child.read_browse_name()).Name for child in await machines.get_children()}
    assert names == {"CNC1", "Packer1"}
    speed = await machines.get_child([f"{ns}:CNC1", f"{ns}:Spindle", f"{ns}:Speed"])
    assert speed.nodeid == node_id("CNC1.Spindle.Speed", ns)
    count = await machines.get_child([f"{ns}:Packer1", f"{ns}:Count"])
    assert count.nodeid == node_id(5001, ns)
    batch = await machines.get_child([f"{ns}:Packer1", f"{ns}:BatchId"])
    assert batch.nodeid == node_id(BATCH_GUID, ns)
    cnc = await machines.get_child(f"{ns}:CNC1")
    methods = [(await m.read_browse_name()).Name for m in await cnc.get_methods()]
    assert methods == ["ResetCounter"]


def test_the_type_table_covers_every_variable() -> None:
    idents = {f"s={v.name}" if v.ident is None else node_id(v.ident).to_string() for v in VARIABLES}
    assert idents == set(TYPES)


async def test_every_variable_reads_good_with_its_type(sim: OpcUaSimulator, client: Client) -> None:
    values = await read(client, sim, *TYPES)
    for (ident, vtype), data in zip(TYPES.items(), values, strict=True):
        assert good(data), ident
        assert data.Value is not None, ident
        assert data.Value.VariantType is vtype, ident
        assert isinstance(data.SourceTimestamp, datetime), ident
    assert len(value(values[list(TYPES).index("s=CNC1.Axis.Positions")])) == 3


async def test_values_move_and_carry_source_timestamps(sim: OpcUaSimulator, client: Client) -> None:
    moving = ("s=CNC1.Spindle.Speed", "s=CNC1.Axis.X.Position", "s=Packer1.Speed")
    first = await read(client, sim, *moving)
    await asyncio.sleep(0.5)
    second = await read(client, sim, *moving)
    for ident, before, after in zip(moving, first, second, strict=True):
        assert value(before) != value(after), ident
        assert before.SourceTimestamp is not None
        assert after.SourceTimestamp is not None
        assert after.SourceTimestamp > before.SourceTimestamp, ident
    # The machine starts running (seeded): the spindle turns near the program's speed.
    assert value(second[0]) > 1000


async def test_subscription_gets_data_changes(sim: OpcUaSimulator, client: Client) -> None:
    changes: list[object] = []

    class Handler:
        def datachange_notification(self, node: Node, val: object, data: object) -> None:
            changes.append(val)

    subscription = await client.create_subscription(50, Handler())
    await subscription.subscribe_data_change(node(client, sim, "s=CNC1.Spindle.Speed"))
    await eventually(lambda: len(changes) >= 3, what="three data changes")
    await subscription.delete()
    assert len(set(changes)) == len(changes)  # each notification is a new value


async def test_analog_items_carry_engineering_units_and_range(sim: OpcUaSimulator, client: Client) -> None:
    speed = node(client, sim, "s=CNC1.Spindle.Speed")
    assert (await speed.read_type_definition()) == node_id(ObjectIds.AnalogItemType)
    units = await (await speed.get_child("0:EngineeringUnits")).read_value()
    assert isinstance(units, ua.EUInformation)
    assert units.NamespaceUri == "http://www.opcfoundation.org/UA/units/un/cefact"
    assert units.UnitId == int.from_bytes(b"RPM", "big")  # UNECE common code, OPC UA Part 8
    assert units.DisplayName.Text == "1/min"
    eu_range = await (await speed.get_child("0:EURange")).read_value()
    assert (eu_range.Low, eu_range.High) == (0.0, 24_000.0)
    temperature = await node(client, sim, "s=CNC1.Temperature").get_child("0:EngineeringUnits")
    assert (await temperature.read_value()).DisplayName.Text == "Cel"
    # A counter has no unit.
    count = node(client, sim, "s=CNC1.PartCount")
    assert (await count.read_type_definition()) == node_id(ObjectIds.BaseDataVariableType)
    assert await count.get_properties() == []


async def test_reset_counter_zeroes_the_part_count(sim: OpcUaSimulator, client: Client) -> None:
    sim.plant.cnc.machine.force(MachineState.IDLE)  # no part completes meanwhile
    (before,) = await read(client, sim, "s=CNC1.PartCount")
    assert value(before) > 0
    cnc = node(client, sim, "s=CNC1")
    assert await cnc.call_method(f"{sim.namespace_index}:ResetCounter") is None
    (after,) = await read(client, sim, "s=CNC1.PartCount")
    assert value(after) == 0


# --- fault injection ---------------------------------------------------------------------------


async def test_set_status_overrides_the_status_until_cleared(sim: OpcUaSimulator, client: Client) -> None:
    sim.set_status("s=CNC1.Spindle.Speed", StatusCodes.BadSensorFailure)
    sim.set_status(f"nsu={NS};i=5001", StatusCodes.UncertainLastUsableValue)
    speed, count = await read(client, sim, "s=CNC1.Spindle.Speed", "i=5001")
    assert speed.StatusCode == status(StatusCodes.BadSensorFailure)
    assert value(speed) is None  # Bad carries no value
    assert count.StatusCode == status(StatusCodes.UncertainLastUsableValue)
    assert value(count) > 0  # Uncertain keeps it

    sim.set_status(f"ns={sim.namespace_index};s=CNC1.Spindle.Speed", None)
    (speed,) = await read(client, sim, "s=CNC1.Spindle.Speed")
    assert good(speed)
    assert value(speed) > 0


async def test_removed_node_is_unknown_until_restored(sim: OpcUaSimulator, client: Client) -> None:
    await sim.remove_node("s=CNC1.Spindle.Speed")
    (gone,) = await read(client, sim, "s=CNC1.Spindle.Speed")
    assert gone.StatusCode == status(StatusCodes.BadNodeIdUnknown)
    spindle = node(client, sim, "s=CNC1.Spindle")
    assert "Speed" not in {(await c.read_browse_name()).Name for c in await spindle.get_children()}

    await sim.restore_node("s=CNC1.Spindle.Speed")
    (first,) = await read(client, sim, "s=CNC1.Spindle.Speed")
    assert good(first)
    units = await node(client, sim, "s=CNC1.Spindle.Speed").get_child("0:EngineeringUnits")
    assert (await units.read_value()).DisplayName.Text == "1/min"
    await asyncio.sleep(0.3)
    (second,) = await read(client, sim, "s=CNC1.Spindle.Speed")
    assert value(second) != value(first)  # updated again


async def test_removed_node_notifies_its_monitored_items(sim: OpcUaSimulator, client: Client) -> None:
    statuses: list[ua.StatusCode | None] = []

    class Handler:
        def datachange_notification(self, node: Node, val: object, data: DataChangeNotif) -> None:
            statuses.append(data.monitored_item.Value.StatusCode)

    subscription = await client.create_subscription(50, Handler())
    await subscription.subscribe_data_change(node(client, sim, "s=CNC1.Spindle.Speed"))
    await eventually(lambda: len(statuses) > 0, what="a first notification")
    await sim.remove_node("s=CNC1.Spindle.Speed")
    gone = status(StatusCodes.BadNodeIdUnknown)
    await eventually(lambda: gone in statuses, what="a BadNodeIdUnknown notification")
    await subscription.delete()


@pytest.mark.parametrize(
    ("node_arg", "error"),
    [
        ("s=CNC1.NoSuchThing", KeyError),
        ("s=CNC1.Spindle", KeyError),  # an object, not a variable
        ("ns=0;i=2258", ValueError),  # another namespace
        ("nsu=urn:other;s=CNC1.State", ValueError),
        ("CNC1.State", ValueError),  # no identifier type
    ],
)
def test_fault_injection_refuses_unknown_nodes(tmp_path: Path, node_arg: str, error: type[Exception]) -> None:
    sim = OpcUaSimulator(port=0, pki_dir=tmp_path)
    with pytest.raises(error):
        sim.set_status(node_arg, StatusCodes.BadSensorFailure)


async def test_restart_keeps_endpoint_and_certificate(sim: OpcUaSimulator) -> None:
    endpoint, fingerprint = sim.endpoint, sim.fingerprint
    assert fingerprint == hashlib.sha256(sim.certificate.read_bytes()).hexdigest()
    old = Client(sim.endpoint, timeout=1)
    await old.connect()
    # A live subscription makes its session outlive the connection; stop() must end it too.
    await old.create_subscription(100, None)
    start_time = await old.get_node(ObjectIds.Server_ServerStatus_StartTime).read_value()

    await sim.stop()
    with pytest.raises(ConnectionRefusedError):
        await Client(sim.endpoint, timeout=1).connect()
    await sim.start()

    assert (sim.endpoint, sim.fingerprint) == (endpoint, fingerprint)
    with pytest.raises(ConnectionError):
        await old.get_node(ObjectIds.Server_ServerStatus_State).read_value()  # that connection is gone
    await old.disconnect()
    async with Client(sim.endpoint, timeout=2) as fresh:
        endpoints = await fresh.get_endpoints()
        assert {e.ServerCertificate for e in endpoints} == {sim.certificate.read_bytes()}
        assert await fresh.get_node(ObjectIds.Server_ServerStatus_StartTime).read_value() > start_time
        (speed,) = await read(fresh, sim, "s=CNC1.Spindle.Speed")
        assert good(speed)


def test_certificate_is_made_once_per_pki_dir(tmp_path: Path) -> None:
    first = OpcUaSimulator(port=0, pki_dir=tmp_path / "a")
    again = OpcUaSimulator(port=0, pki_dir=tmp_path / "a")
    other = OpcUaSimulator(port=0, pki_dir=tmp_path / "b")
    assert first.fingerprint == again.fingerprint != other.fingerprint
    assert stat.S_IMODE((tmp_path / "a" / "server-key.pem").stat().st_mode) == 0o600


async def test_freeze_stalls_open_connections(sim: OpcUaSimulator, client: Client) -> None:
    sim.freeze()
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(read(client, sim, "s=CNC1.State"), 0.3)
    sim.unfreeze()
    (state,) = await read(client, sim, "s=CNC1.State")
    assert good(state)


# --- security and namespaces ---------------------------------------------------------------------


@pytest.mark.parametrize("mode", [ua.MessageSecurityMode.Sign, ua.MessageSecurityMode.SignAndEncrypt])
async def test_basic256sha256_with_username(sim: OpcUaSimulator, mode: ua.MessageSecurityMode) -> None:
    opcua = await secure_client(sim, mode, sim.USERNAME, sim.PASSWORD)
    async with opcua:
        assert opcua.security_policy.Mode == mode
        (state,) = await read(opcua, sim, "s=CNC1.State")
        assert good(state)


async def test_wrong_password_is_refused(sim: OpcUaSimulator) -> None:
    opcua = await secure_client(sim, ua.MessageSecurityMode.SignAndEncrypt, sim.USERNAME, "wrong")
    with pytest.raises(BadUserAccessDenied):
        await opcua.connect()
    await opcua.disconnect()


async def test_anonymous_can_be_refused(tmp_path: Path) -> None:
    async with OpcUaSimulator(port=0, pki_dir=tmp_path, allow_anonymous=False) as sim:
        anonymous = Client(sim.endpoint, timeout=2)
        with pytest.raises(BadIdentityTokenRejected):
            await anonymous.connect()
        await anonymous.disconnect()
        operator = Client(sim.endpoint, timeout=2)
        operator.set_user(sim.USERNAME)
        operator.set_password(sim.PASSWORD)
        async with operator:
            (state,) = await read(operator, sim, "s=CNC1.State")
            assert good(state)


async def test_extra_namespaces_shift_our_index(tmp_path: Path) -> None:
    async with OpcUaSimulator(port=0, pki_dir=tmp_path, extra_namespaces=2) as sim:
        async with Client(sim.endpoint, timeout=2) as opcua:
            assert await opcua.get_namespace_index(NS) == sim.namespace_index == 4
            (state,) = await read(opcua, sim, "s=CNC1.State")
            assert value(state) in {"Idle", "Running", "Stopped", "Alarm"}
        sim.set_status("ns=4;s=CNC1.State", StatusCodes.BadCommunicationError)
        with pytest.raises(ValueError, match="not in namespace"):
            sim.set_status("ns=2;s=CNC1.State", None)
