"""`python -m bench SCENARIO [options]`: run a scenario, print its summary, save its result
to bench/results/SCENARIO.json (the machine, versions and parameters included)."""

from __future__ import annotations

import argparse
import sys

from bench import scenarios
from bench.harness import bench, save


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    p.add_argument("scenario", choices=["throughput", "opcua", "outage", "scale", "all"])
    p.add_argument(
        "--format", choices=["uns", "sparkplug"], default="uns", help="gateway output (default uns)"
    )
    p.add_argument("--devices", type=int, default=4, help="simulated presses (default 4)")
    p.add_argument("--tags", type=int, default=100, help="tags per press, at most 100 (default 100)")
    p.add_argument("--poll", type=float, default=0.05, help="poll interval in seconds (default 0.05)")
    p.add_argument("--items", type=int, default=500, help="opcua: monitored items (default 500)")
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
    p.add_argument("--name", help="add -NAME to the result file name (for a run with other parameters)")
    p.add_argument("--keep", action="store_true", help="keep the working directory (logs, outbox)")
    args = p.parse_args(argv)
    load = {"devices": args.devices, "tags": args.tags, "poll": args.poll, "fmt": args.format}
    suffix = ("" if args.format == "uns" else f"-{args.format}") + (f"-{args.name}" if args.name else "")
    if args.scenario in ("throughput", "all"):
        with bench(args.keep) as b:
            result = scenarios.throughput(b, warmup=args.warmup, duration=args.duration, **load)
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
                b, items=args.items, fmt=args.format, warmup=args.warmup, duration=args.duration
            )
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
