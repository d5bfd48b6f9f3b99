"""`python -m bench SCENARIO [options]`: run a scenario, print its summary, save its result
to bench/results/SCENARIO.json (the machine, versions and parameters included)."""

from __future__ import annotations

import argparse
import random
import sys

from bench import rtu, scenarios, soak, startup, state
from bench.harness import bench, save


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    p.add_argument(
        "scenario",
        choices=["throughput", "opcua", "outage", "scale", "startup", "soak", "state", "rtu", "all"],
    )
    p.add_argument(
        "--format", choices=["uns", "batch", "sparkplug"], default="uns", help="gateway output (default uns)"
    )
    p.add_argument("--devices", type=int, default=4, help="simulated presses (default 4)")
    p.add_argument("--tags", type=int, default=100, help="tags per press, at most 100 (default 100)")
    p.add_argument(
        "--poll", type=float, default=None, help="poll interval in seconds (default 0.05; soak 0.5)"
    )
    p.add_argument(
        "--items", type=int, default=None, help="opcua, soak: monitored items (default 500; soak 10, 0: none)"
    )
    p.add_argument(
        "--outputs", type=int, default=1, help="throughput: outputs, each to a broker of its own (default 1)"
    )
    p.add_argument("--warmup", type=float, default=5.0, help="seconds before measuring (default 5)")
    p.add_argument("--duration", type=float, default=20.0, help="measuring window, seconds (default 20)")
    p.add_argument("--down", type=float, default=30.0, help="outage: broker down for this long (default 30)")
    p.add_argument(
        "--sizes",
        default="1000,10000,100000",
        help="scale: configured tags, comma-separated (default 1000,10000,100000)",
    )
    p.add_argument("--rate", type=float, default=5000, help="scale: readings/s to aim for (default 5000)")
    p.add_argument("--hold", type=float, default=120, help="scale: seconds each size runs (default 120)")
    p.add_argument(
        "--rows", type=int, default=2_000_000, help="startup: readings in the outbox (default 2,000,000)"
    )
    p.add_argument("--minutes", type=float, default=60, help="soak: how long (default 60)")
    p.add_argument("--seed", type=int, default=None, help="soak: seed of the fault schedule (default random)")
    p.add_argument(
        "--pause",
        default=None,
        metavar="LOW-HIGH",
        help="soak: seconds between faults (default 20-40 up to 10 minutes, else 60-120)",
    )
    p.add_argument(
        "--faults",
        default=",".join(soak.KINDS),
        help=f"soak: fault kinds, comma-separated, or none (default {','.join(soak.KINDS)})",
    )
    p.add_argument("--registers", type=int, default=10, help="rtu: holding registers per unit (default 10)")
    p.add_argument("--baudrate", type=int, default=19200, help="rtu: the line's baud rate (default 19200)")
    p.add_argument("--name", help="add -NAME to the result file name (for a run with other parameters)")
    p.add_argument("--keep", action="store_true", help="keep the working directory (logs, outbox)")
    args = p.parse_args(argv)
    poll = 0.05 if args.poll is None else args.poll
    load = {"devices": args.devices, "tags": args.tags, "poll": poll, "fmt": args.format}
    suffix = ("" if args.format == "uns" else f"-{args.format}") + (f"-{args.name}" if args.name else "")
    if args.scenario in ("throughput", "all"):
        with bench(args.keep) as b:
            result = scenarios.throughput(
                b, warmup=args.warmup, duration=args.duration, outputs=args.outputs, **load
            )
        with bench(args.keep) as b:
            modbus = scenarios.modbus_ceiling(b, devices=args.devices, tags=args.tags, duration=10)
        with bench(args.keep) as b:
            mqtt, mqtt_us = scenarios.mqtt_ceiling(b)
        lower = min(modbus, mqtt)
        result["ceilings"] = {
            "pymodbus_registers_per_s": round(modbus),
            "paho_qos1_messages_per_s": round(mqtt),
            "paho_cpu_us_per_message": round(mqtt_us, 1),
            "gateway_share_of_lower": round(result["readings_per_s"] / lower, 2),
        }
        share = result["ceilings"]["gateway_share_of_lower"]
        print(f"ceilings: bare pymodbus {modbus:.0f} registers/s, bare paho QoS 1 {mqtt:.0f} messages/s "
              f"({mqtt_us:.1f} us CPU each); the gateway reached {share:.0%} of the lower")  # fmt: skip
        print("saved", save(f"throughput{suffix}", result))
    if args.scenario in ("opcua", "all"):
        with bench(args.keep) as b:
            result = scenarios.opcua(
                b, items=500 if args.items is None else args.items, fmt=args.format,
                warmup=args.warmup, duration=args.duration,
            )  # fmt: skip
        print("saved", save(f"opcua{suffix}", result))
    if args.scenario in ("outage", "all"):
        with bench(args.keep) as b:
            result = scenarios.outage(b, down=args.down, warmup=args.warmup, **load)
        print("saved", save(f"outage{suffix}", result))
    if args.scenario in ("scale", "all"):
        sizes = []
        for size in (int(x) for x in args.sizes.split(",")):
            with bench(args.keep) as b:
                sizes.append(scenarios.scale(b, size=size, rate=args.rate, fmt=args.format, hold=args.hold))
        print("saved", save(f"scale{suffix}", {"sizes": sizes}))
    if args.scenario in ("startup", "all"):
        with bench(args.keep) as b:
            result = startup.startup(b, rows=args.rows, fmt=args.format)
        print("saved", save(f"startup{suffix}", result))
    if args.scenario == "soak":
        return _soak(p, args, suffix)
    if args.scenario in ("rtu", "all"):
        with bench(args.keep) as b:
            result = rtu.rtu(b, units=args.devices, tags=args.registers, baudrate=args.baudrate,
                             warmup=args.warmup, duration=args.duration)  # fmt: skip
        print("saved", save(f"rtu{'-' + args.name if args.name else ''}", result))
    if args.scenario == "state":  # in process, a few seconds: not worth a place in `all`
        print("saved", save("state", state.fold(devices=args.devices, tags=args.tags)))
    return 0


def _soak(p: argparse.ArgumentParser, args: argparse.Namespace, suffix: str) -> int:
    """Run the soak; exit status 1 when a committed reading is missing at the subscriber."""
    if args.format != "uns":
        p.error("soak: UNS only (its accounting is by seq)")
    kinds = [] if args.faults == "none" else args.faults.split(",")
    if unknown := set(kinds) - set(soak.KINDS):
        p.error(f"--faults: unknown {', '.join(sorted(unknown))} (known: {', '.join(soak.KINDS)})")
    pause = args.pause or ("20-40" if args.minutes <= 10 else "60-120")
    try:
        low, high = (float(x) for x in pause.split("-"))
    except ValueError:
        p.error(f"--pause {pause!r}: expected LOW-HIGH in seconds, e.g. 20-40")
    seed = random.randrange(2**31) if args.seed is None else args.seed
    with bench(args.keep) as b:
        result = soak.soak(
            b, minutes=args.minutes, seed=seed, pause=(low, high), kinds=kinds, devices=args.devices,
            tags=args.tags, poll=0.5 if args.poll is None else args.poll,
            items=10 if args.items is None else args.items, keep=args.keep,
        )  # fmt: skip
    print("saved", save(f"soak{suffix}", result))
    return 1 if result["readings"]["missing"] else 0


if __name__ == "__main__":
    sys.exit(main())
