"""The `millwright` command line."""

from __future__ import annotations

import argparse
import asyncio
import errno
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gateway import __version__, config, logs
from gateway.errors import ConfigError, GatewayError, OutboxError, OutboxLocked

EXIT_FAILURE = 1  # the gateway cannot go on (e.g. its outbox is unusable): systemd restarts it
EXIT_CONFIG = 2  # bad config or usage: systemd must not restart into the same error
# An error the gateway did not expect (a bug), as sysexits' EX_SOFTWARE: told apart from the
# expected failures above, so that a supervisor or a user can see it asks for a bug report.
EXIT_INTERNAL = 70
# Certificates of the interactive commands (browse, simulate opcua); the service keeps its
# own next to its outbox (gateway.pki_dir).
STATE = Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state") / "millwright"

log = logging.getLogger("gateway")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="millwright",
        description="Industrial edge gateway: Modbus and OPC UA to MQTT (UNS JSON or Sparkplug B), "
        "with a durable local buffer.",
    )
    p.add_argument("--version", action="version", version=f"millwright {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging (overrides the config)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run the gateway with a config file until SIGTERM/Ctrl-C")
    run.add_argument("config", type=Path, help="YAML config file")
    run.add_argument(
        "--log-format", choices=["text", "json"], default="text",
        help="text (default; under systemd without timestamps, which the journal adds) or json: "
        "one object a line, for log shippers",
    )  # fmt: skip

    check = sub.add_parser("check", help="validate config files; exit 0 if all are valid, 2 if not")
    check.add_argument("config", type=Path, nargs="+", help="YAML config file(s)")

    sub.add_parser("schema", help="print the JSON Schema of the config file")

    outbox = sub.add_parser("outbox", help="inspect an outbox database")
    osub = outbox.add_subparsers(dest="outbox_command", required=True, metavar="ACTION")
    stats = osub.add_parser("stats", help="print an outbox file's depth, drops and each output's position")
    stats.add_argument("file", type=Path, help="the outbox SQLite file (outbox.path in the config)")
    stats.add_argument("--json", action="store_true", help="print JSON instead of text")

    _sparkplug_parser(sub)

    sim = sub.add_parser("simulate", help="run a bundled device simulator")
    ssub = sim.add_subparsers(dest="protocol", required=True, metavar="PROTOCOL")
    _simulate_modbus_parser(ssub)

    opcua = ssub.add_parser(
        "opcua", help="OPC UA CNC machine and packaging line (nodes: simulators/OPCUA.md)"
    )
    opcua.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    opcua.add_argument("--port", type=int, default=4840, help="TCP port (default 4840)")
    opcua.add_argument("--seed", type=int, default=None, help="random seed, for repeatable signals")
    opcua.add_argument(
        "--pki", type=Path, default=STATE / "opcua-simulator", metavar="DIR",
        help="where the server certificate is kept, so its fingerprint stays the same "
        f"(default {STATE}/opcua-simulator)",
    )  # fmt: skip

    browse = sub.add_parser(
        "browse", help="print an OPC UA server's address space, or a tags: block for a config (--config)"
    )
    browse.add_argument("endpoint", help="opc.tcp://HOST:PORT")
    browse.add_argument("--node", default=None, help="start node id (default: the Objects folder)")
    browse.add_argument("--depth", type=int, default=3, help="levels below the start node (default 3)")
    browse.add_argument("--config", action="store_true", help="print a YAML tags: block for the variables")
    browse.add_argument(
        "--policy", default="None",
        choices=["None", "Basic256Sha256", "Aes128_Sha256_RsaOaep", "Aes256_Sha256_RsaPss"],
        help="security policy (default None)",
    )  # fmt: skip
    browse.add_argument(
        "--mode", default=None, choices=["None", "Sign", "SignAndEncrypt"],
        help="message security (default: SignAndEncrypt with a policy, else None)",
    )  # fmt: skip
    browse.add_argument(
        "--server-certificate", default=None, metavar="FINGERPRINT|PATH",
        help="trust the server by SHA-256 fingerprint, certificate file or trust directory",
    )  # fmt: skip
    browse.add_argument(
        "--user", default=None, help="user name (password from $OPCUA_PASSWORD or --password-file)"
    )
    browse.add_argument(
        "--password-file", type=Path, default=None, help="file whose first line is the password"
    )
    browse.add_argument(
        "--pki", type=Path, default=STATE / "pki", metavar="DIR",
        help=f"where the client certificate is kept (default {STATE}/pki)",
    )  # fmt: skip

    demo = sub.add_parser("demo", help="simulator + gateway + broker together; readings shown live")
    demo.add_argument(
        "--broker", default=None, metavar="URL",
        help="publish to this broker (mqtt://host:port); default: start a private mosquitto, "
        "or the embedded broker when mosquitto is not installed; 'embedded' forces the latter",
    )  # fmt: skip
    demo.add_argument(
        "--duration",
        type=float,
        default=None,
        metavar="SECONDS",
        help="stop after this long (default: Ctrl-C)",
    )
    return p


def _simulate_modbus_parser(ssub: Any) -> None:
    modbus = ssub.add_parser(
        "modbus", help="Modbus TCP or RTU stamping press (register map: simulators/MODBUS.md)"
    )
    # (None: not given, which --serial needs to know.)
    modbus.add_argument("--host", default=None, help="address to listen on (default 127.0.0.1)")
    modbus.add_argument("--port", type=int, default=None, help="TCP port (default 5020)")
    line = modbus.add_argument_group("Modbus RTU on a serial line (instead of TCP)")
    line.add_argument(
        "--serial", default=None, metavar="PATH",
        help="serve RTU on this serial port, or on one end of a virtual line (socat pty pair)",
    )  # fmt: skip
    line.add_argument("--baudrate", type=_baudrate, default=19200, help="bits per second (default 19200)")
    line.add_argument("--parity", default="E", choices=["N", "E", "O"], help="parity (default E)")
    line.add_argument("--stopbits", type=int, default=1, choices=[1, 2], help="stop bits (default 1)")
    line.add_argument(
        "--pace", action="store_true",
        help="hold each answer back by the time its frames take at --baudrate (a virtual line has no speed)",
    )  # fmt: skip
    modbus.add_argument(
        "--units", default="1,2", help="comma-separated unit ids, one press each (default 1,2)"
    )
    modbus.add_argument("--seed", type=int, default=None, help="random seed, for repeatable signals")
    faults = modbus.add_argument_group("fault injection (to see how a gateway copes)")
    faults.add_argument("--latency", type=float, default=0.0, metavar="SECONDS", help="delay every response")
    faults.add_argument(
        "--exception",
        type=int,
        default=None,
        metavar="CODE",
        help="answer with this Modbus exception code (e.g. 2, 4)",
    )
    faults.add_argument(
        "--exception-range", action="append", default=[], metavar="TABLE:FIRST-LAST",
        help="only for requests touching this range, e.g. holding:0-9 (repeatable; default: every request)",
    )  # fmt: skip
    faults.add_argument(
        "--drop-connections", action="store_true",
        help="accept connections and close them at once (on a serial line: answer nothing)",
    )  # fmt: skip
    faults.add_argument(
        "--busy", type=int, default=0, metavar="N", help="answer the next N requests with exception 06 (busy)"
    )


def _sparkplug_parser(sub: Any) -> None:
    sparkplug = sub.add_parser("sparkplug", help="Sparkplug B tools")
    spsub = sparkplug.add_subparsers(dest="sparkplug_command", required=True, metavar="ACTION")
    decode = spsub.add_parser(
        "decode",
        help="decode captured Sparkplug B payloads to JSON",
        description="Decode Sparkplug B payloads to JSON: raw payload files (one payload each; "
        "'-' or none: standard input), or with --hex lines of 'TOPIC HEX' as printed by "
        "mosquitto_sub -t 'spBv1.0/#' -F '%t %x'. Datatypes announced by births in the same "
        "input are used to decode later DATA messages (names for aliases, signed values).",
    )
    decode.add_argument("file", nargs="*", type=Path, help="raw payload file(s); default: standard input")
    decode.add_argument("--hex", action="store_true", help="input is text lines: [TOPIC ]HEX")
    decode.add_argument(
        "--topic", default=None, help="the topic the raw payloads came from (e.g. its NBIRTH)"
    )


def _logging(level: str, log_format: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logs.formatter(log_format, os.environ))
    logging.basicConfig(level=level.upper(), handlers=[handler])
    # pymodbus logs every failed connect at ERROR, asyncua a traceback per lost connection;
    # our poller reports each state change once.
    logging.getLogger("pymodbus").setLevel(logging.CRITICAL)
    logging.getLogger("asyncua").setLevel(logging.CRITICAL)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return _dispatch(args)
    except BrokenPipeError:  # e.g. `millwright sparkplug decode ... | head`
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115  (no flush error at exit)
        return 141
    except BaseException as exc:  # every way out gets one line and an exit status
        return report_failure(exc)


def report_failure(exc: BaseException) -> int:
    """Print one line for what ended the command and return its exit status.

    The TaskGroup of `millwright run` wraps whatever ended it in an exception group; the
    user is shown the first real cause, not the group's traceback. A GatewayError is
    expected (its message says it all); anything else is a bug: its traceback goes to the
    log, for a report, and the line says so."""
    leaves = _leaves(exc)
    if any(isinstance(e, KeyboardInterrupt) for e in leaves):
        return 130
    if exits := [e for e in leaves if isinstance(e, SystemExit)]:
        code = exits[0].code
        if code is None or isinstance(code, int):
            return code or 0
        print(code, file=sys.stderr)  # sys.exit("message"): the message, and status 1
        return EXIT_FAILURE
    bugs = [e for e in leaves if not isinstance(e, GatewayError)]
    if not bugs:
        first = next((e for e in leaves if isinstance(e, ConfigError)), leaves[0])
        # Its message names the cause already (e.g. SQLite's); the traceback only with -v.
        log.debug("stopping", exc_info=first)
        print(f"millwright: {first}", file=sys.stderr)
        return EXIT_CONFIG if isinstance(first, ConfigError | OutboxLocked) else EXIT_FAILURE
    first_bug = bugs[0]  # a bug beside an expected error is still a bug: it is what to report
    log.critical("internal error, stopping", exc_info=first_bug)
    print(
        f"millwright: internal error: {type(first_bug).__name__}: {first_bug} "
        "(the traceback is in the log above; please report it)",
        file=sys.stderr,
    )
    return EXIT_INTERNAL


def _leaves(exc: BaseException) -> list[BaseException]:
    """The exceptions inside (nested) exception groups, in order; `exc` itself if none."""
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in _leaves(inner)]
    return [exc]


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "check":
        return _check(args.config)
    if args.command == "schema":
        sys.stdout.write(config.schema())
        return 0
    if args.command == "outbox":
        return _outbox_stats(args.file, as_json=args.json)
    if args.command == "run":
        settings = config.load(args.config)
        _logging("debug" if args.verbose else settings.gateway.log_level, args.log_format)
        from gateway.app import run

        asyncio.run(run(settings, str(args.config.resolve())))
        return 0
    if args.command == "sparkplug":
        return _sparkplug_decode(args.file, hex_lines=args.hex, topic=args.topic)
    if args.command == "simulate":
        _logging("debug" if args.verbose else "info")
        try:
            if args.protocol == "opcua":
                from simulators.opcua import serve as serve_opcua

                asyncio.run(serve_opcua(args.host, args.port, args.seed, args.pki))
                return 0
            return _simulate(args)
        except OSError as exc:
            if exc.errno in (errno.EADDRINUSE, errno.EADDRNOTAVAIL, errno.EACCES):
                # The port is taken, or not ours to bind: what a user most often gets wrong here.
                reason = os.strerror(exc.errno)
                print(f"millwright: cannot listen on {args.host}:{args.port}: {reason}", file=sys.stderr)
            else:  # e.g. a --pki folder that cannot be made
                print(f"millwright: {exc}", file=sys.stderr)
            return EXIT_FAILURE
    if args.command == "browse":
        _logging("debug" if args.verbose else "warning")
        return _browse(args)
    if args.command == "demo":
        _logging("debug" if args.verbose else "warning")
        from gateway.demo import demo

        return asyncio.run(demo(broker=args.broker, duration=args.duration))
    raise AssertionError(args.command)  # argparse allows no other command


def _check(files: list[Path]) -> int:
    failed = False
    for file in files:
        try:
            settings = config.load(file)
        except ConfigError as exc:
            print(f"millwright: {exc}", file=sys.stderr)
            failed = True
            continue
        tags = sum(len(d.tags) for d in settings.devices)
        print(f"{file}: ok ({len(settings.devices)} device(s), {tags} tag(s))")
        for output in settings.outputs:
            if output.platform != "generic":
                print(f"  output {output.name}: {_platform_rules(output)}")
    return EXIT_CONFIG if failed else 0


def _platform_rules(output: config.OutputSettings) -> str:
    """What the output's platform makes of it, for `check`: e.g. `aws-iot-core, format batch,
    at most 100 messages/s, 131072 bytes a message, status and _meta retained`."""
    p = output.profile
    parts = [p.name, f"format {output.format}"]
    if output.max_rate is not None:
        parts.append(f"at most {output.max_rate:g} messages/s")
    if output.max_message_bytes is not None:
        parts.append(f"{output.max_message_bytes} bytes a message")
    if output.format != "sparkplug":
        parts.append(
            "status and _meta " + ("retained" if p.retain else "not retained" if p.status else "left out")
        )
    if output.offered_alpn is not None:
        parts.append(f"ALPN {output.offered_alpn}")
    return ", ".join(parts)


def _outbox_stats(file: Path, *, as_json: bool) -> int:
    from gateway.outbox import read_stats

    try:
        stats = read_stats(file)
    except OutboxError as exc:
        print(f"millwright: {exc}", file=sys.stderr)
        return 1
    outputs = {
        name: {"depth": o.depth, "dropped": o.dropped, "position": o.position}
        for name, o in stats.outputs.items()
    }
    if as_json:
        print(json.dumps({
            "depth": stats.depth, "oldest_age": stats.oldest_age, "dropped": stats.dropped,
            "bytes": stats.bytes, "last_seq": stats.last_seq, "outputs": outputs,
        }))  # fmt: skip
        return 0
    age = "-" if stats.oldest_age is None else f"{stats.oldest_age:.1f} s"
    print(f"file:        {file}")
    print(f"depth:       {stats.depth} reading(s) waiting for at least one output")
    print(f"oldest age:  {age}")
    print(f"dropped:     {stats.dropped} reading(s) since the file was created")
    print(f"last seq:    {stats.last_seq}")
    print(f"size:        {stats.bytes} bytes")
    for name, o in stats.outputs.items():
        print(f"output {name}: {o.depth} waiting, {o.dropped} dropped, delivered up to seq {o.position}")
    return 0


def _sparkplug_decode(files: list[Path], *, hex_lines: bool, topic: str | None) -> int:
    """One JSON document per payload on stdout, as each arrives; undecodable input is
    reported on stderr (exit 1) and the rest still decoded."""
    from gateway.publishers.sparkplug.payload import Decoder

    decoder = Decoder()
    failed = False
    for source in files or [Path("-")]:
        name = "standard input" if str(source) == "-" else str(source)
        try:
            if hex_lines:
                failed |= _decode_lines(decoder, source, name, topic)
                continue
            data = sys.stdin.buffer.read() if str(source) == "-" else source.read_bytes()
        except OSError as exc:
            print(f"millwright: {name}: {exc.strerror or exc}", file=sys.stderr)
            failed = True
            continue
        try:
            print(json.dumps(decoder.decode(data, topic), indent=2, ensure_ascii=False))
        except ValueError as exc:
            print(f"millwright: {name}: {exc}", file=sys.stderr)
            failed = True
    return 1 if failed else 0


def _decode_lines(decoder: Any, source: Path, name: str, topic: str | None) -> bool:
    """Decode `[TOPIC ]HEX` lines as they come (a live `mosquitto_sub` pipe); True if any failed.
    A host's STATE message (JSON) is shown as it is."""
    failed = False
    stdin = str(source) == "-"
    stream = sys.stdin if stdin else source.open(encoding="utf-8", errors="replace")
    try:
        for number, line in enumerate(stream, 1):
            if not line.strip():
                continue
            where, _, text = line.strip().rpartition(" ")
            where = where or topic or ""
            try:
                data = bytes.fromhex(text)
                if where.startswith("spBv1.0/STATE/"):
                    doc = {"topic": where, "state": json.loads(data)}
                else:
                    doc = decoder.decode(data, where or None)
            except ValueError as exc:
                print(f"millwright: {name} line {number}: {exc}", file=sys.stderr)
                failed = True
                continue
            print(json.dumps(doc, ensure_ascii=False), flush=True)
    finally:
        if not stdin:
            stream.close()
    return failed


def _baudrate(text: str) -> int:
    if not text.isdigit() or not 50 <= int(text) <= 4_000_000:
        raise argparse.ArgumentTypeError(f"{text!r}: expected bits per second, 50 to 4000000")
    return int(text)


def _simulate(args: argparse.Namespace) -> int:
    from simulators.modbus import Faults, serve, serve_serial

    try:
        units = [int(u) for u in args.units.split(",") if u.strip()]
    except ValueError:
        print(f"millwright: --units {args.units!r}: expected numbers like 1,2", file=sys.stderr)
        return EXIT_CONFIG
    if args.serial is not None and not all(1 <= u <= 247 for u in units):
        print(f"millwright: --units {args.units!r}: a unit on a serial line is 1-247", file=sys.stderr)
        return EXIT_CONFIG
    if args.serial is not None and (args.host is not None or args.port is not None):
        print("millwright: --serial serves a serial line: --host and --port do not apply", file=sys.stderr)
        return EXIT_CONFIG
    args.host = "127.0.0.1" if args.host is None else args.host
    args.port = 5020 if args.port is None else args.port
    try:
        faults = Faults(
            latency=args.latency,
            exception=args.exception,
            exception_ranges=[_table_range(text) for text in args.exception_range],
            drop_connections=args.drop_connections,
            busy=args.busy,
        )
    except ValueError as exc:
        print(f"millwright: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    if args.serial is not None:
        log.warning("Modbus RTU simulator on %s (%d %s%d), unit(s) %s; Ctrl-C to stop",
                    args.serial, args.baudrate, args.parity, args.stopbits, units)  # fmt: skip
        asyncio.run(serve_serial(args.serial, units, args.seed, faults, baudrate=args.baudrate,
                                 parity=args.parity, stopbits=args.stopbits, pace=args.pace))  # fmt: skip
        return 0
    log.warning("Modbus simulator on %s:%d, unit(s) %s; Ctrl-C to stop", args.host, args.port, units)
    asyncio.run(serve(args.host, args.port, units, args.seed, faults))
    return 0


def _table_range(text: str) -> tuple[str, int, int]:
    """`holding:0-9` -> ("holding", 0, 9); `coil:3` -> ("coil", 3, 3)."""
    table, _, span = text.partition(":")
    first, _, last = span.partition("-")
    try:
        return table, int(first), int(last or first)
    except ValueError:
        raise ValueError(f"--exception-range {text!r}: expected TABLE:FIRST-LAST, e.g. holding:0-9") from None


def _browse(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from gateway.collectors.opcua.browse import browse, format_tags, format_tree
    from gateway.collectors.opcua.settings import OpcUaSecurity
    from gateway.errors import DeviceError

    mode = args.mode or ("None" if args.policy == "None" else "SignAndEncrypt")
    password = None
    if args.user is not None and args.password_file is None:
        password = os.environ.get("OPCUA_PASSWORD")
        if password is None:
            print("millwright: --user needs $OPCUA_PASSWORD or --password-file", file=sys.stderr)
            return EXIT_CONFIG
    # With a policy and no trust given yet, trust nothing: the refusal then prints the
    # server's fingerprint and how to pin it, which is how a user learns it.
    trusted = args.server_certificate or ("0" * 64 if args.policy != "None" else None)
    try:
        security = OpcUaSecurity.model_validate({
            "policy": args.policy, "mode": mode, "server_certificate": trusted,
            "username": args.user, "password": password, "password_file": args.password_file,
        })  # fmt: skip
    except ValidationError as exc:
        for error in exc.errors():
            print(f"millwright: {str(error['msg']).removeprefix('Value error, ')}", file=sys.stderr)
        return EXIT_CONFIG
    try:
        rows = asyncio.run(browse(args.endpoint, security, args.pki, args.node, args.depth))
    except DeviceError as exc:
        print(f"millwright: {exc.reason}", file=sys.stderr)
        if "not trusted" in exc.reason:
            print(
                "millwright: to browse it, pass --server-certificate with that fingerprint", file=sys.stderr
            )
        return 1
    except ValueError as exc:  # a malformed --node
        print(f"millwright: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    print(format_tags(rows) if args.config else format_tree(rows))
    return 0
