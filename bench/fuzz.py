"""Coverage-guided fuzzing (atheris, libFuzzer) of what reaches the gateway from outside.

    python -m bench.fuzz config [--seconds 60]     config files: a Settings or a ConfigError
    python -m bench.fuzz sparkplug [--seconds 60]  `millwright sparkplug decode`: JSON or ValueError
    python -m bench.fuzz commands [--seconds 60]   NCMD/DCMD/STATE to the edge node: never raises

`make fuzz` runs all three. The property-based tests in tests/ check the same properties on
every test run with a bounded number of examples; this goes deeper for as long as you let
it. A failure prints the input and writes it to `crash-*` in the working directory; replay
it with `python -m bench.fuzz TARGET --replay FILE`. Needs `pip install atheris`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import atheris

with atheris.instrument_imports(include=["gateway"]):
    from gateway import config
    from gateway.config import MqttSettings, SparkplugSettings
    from gateway.errors import ConfigError
    from gateway.outbox import Outbox
    from gateway.publishers.sparkplug.node import BdSeqFile, SparkplugNode
    from gateway.publishers.sparkplug.payload import DataType, Decoder

SEEDS = Path(__file__).resolve().parent.parent / "config"


def _config(data: bytes) -> None:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return  # config.load refuses those before parsing (tested in tests/)
    try:
        config.parse(text, "fuzz.yaml", env={})
    except ConfigError as exc:
        for problem in exc.problems:
            if "\n" in problem:
                raise AssertionError(f"a problem on more than one line: {problem!r}") from None


def _sparkplug(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    kind = fdp.PickValueInList(["NBIRTH", "DBIRTH", "DDATA", "NDATA", "NCMD", "STATE"])
    topic = f"spBv1.0/g/{kind}/n/d" if kind != "STATE" else "spBv1.0/STATE/h"
    with contextlib.suppress(ValueError):  # the decoder's one way of saying "not Sparkplug"
        Decoder().decode(fdp.ConsumeBytes(fdp.remaining_bytes()), topic)


def _commands() -> Callable[[bytes], None]:
    loop = asyncio.new_event_loop()
    folder = Path(tempfile.mkdtemp(prefix="millwright-fuzz-"))
    box = loop.run_until_complete(Outbox.open(folder / "outbox.db"))
    sparkplug = SparkplugSettings(group_id="g", primary_host_id="h")
    node = SparkplugNode(
        MqttSettings(url="mqtt://127.0.0.1:1", format="sparkplug", sparkplug=sparkplug),
        sparkplug,
        box,
        edge_node_id="n",
        devices={"d": [("t", DataType.DOUBLE, None)]},
        bdseq=BdSeqFile(folder / "bdseq"),
        client_id="fuzz",
    )
    topics = ["spBv1.0/g/NCMD/n", "spBv1.0/g/DCMD/n/d", "spBv1.0/STATE/h"]

    def one(data: bytes) -> None:
        fdp = atheris.FuzzedDataProvider(data)
        node._on_message(fdp.PickValueInList(topics), fdp.ConsumeBytes(fdp.remaining_bytes()))
        if len(node._warned) > 8:
            raise AssertionError(f"the node's state grows with what it is sent: {node._warned}")

    return one


TARGETS: dict[str, Callable[[], Callable[[bytes], None]]] = {
    "config": lambda: _config,
    "sparkplug": lambda: _sparkplug,
    "commands": _commands,
}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.fuzz", description=__doc__.split("\n\n")[0])
    p.add_argument("target", choices=sorted(TARGETS))
    p.add_argument("--seconds", type=int, default=60, help="how long to fuzz (default 60)")
    p.add_argument("--replay", type=Path, default=None, help="run one input file and stop")
    args = p.parse_args(argv)
    target = TARGETS[args.target]()
    if args.replay is not None:
        target(args.replay.read_bytes())
        print(f"{args.replay}: no failure")
        return
    corpus: list[str] = []
    if args.target == "config":  # start from the bundled examples
        seeds = Path(tempfile.mkdtemp(prefix="millwright-seeds-"))
        for example in SEEDS.glob("*.yaml"):
            (seeds / example.name).write_bytes(example.read_bytes())
        corpus = [str(seeds)]
    libfuzzer: list[Any] = [sys.argv[0], f"-max_total_time={args.seconds}", "-rss_limit_mb=2048", *corpus]
    atheris.Setup(libfuzzer, target)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
