"""Coalescing of a device's tags into as few Modbus requests as the protocol allows.

Every request is a round trip, often over a slow serial gateway, so tags of one table merge
when the unused registers between them are few (`max_gap`) and the request stays within
the protocol limits: 125 registers or 2000 bits per read. A tag never straddles two
requests.

Some devices reject a read that covers an address they do not implement (exception 02),
even when no tag lives there. Such a request is split, and the split is remembered for the
life of the collector: first into runs of adjacent tags, then, if a run is still
rejected, into single tags.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass

from gateway.collectors.modbus.settings import BIT_TABLES, ModbusTag, Table

log = logging.getLogger(__name__)

MAX_REGISTERS = 125  # read holding/input registers, Modbus spec 6.3/6.4
MAX_BITS = 2000  # read coils/discrete inputs, Modbus spec 6.1/6.2


@dataclass(slots=True, frozen=True)
class Request:
    """One read: `count` registers (or bits) of `table` from `start`, covering `tags`."""

    table: Table
    start: int
    count: int
    tags: tuple[ModbusTag, ...]

    @property
    def end(self) -> int:
        """Last address read (inclusive)."""
        return self.start + self.count - 1

    def __str__(self) -> str:
        return f"{self.table} {self.start}-{self.end}"


def limit(table: Table) -> int:
    """Most registers (or bits) one read of `table` may cover."""
    return MAX_BITS if table in BIT_TABLES else MAX_REGISTERS


def plan(tags: Iterable[ModbusTag], max_gap: int) -> list[Request]:
    """Requests that read every tag once, in table then address order.

    Tags merge across at most `max_gap` unread registers (bits). Tags that overlap (bits of
    one status register) always land in the same request.
    """
    by_table: dict[Table, list[ModbusTag]] = {}
    for tag in tags:
        by_table.setdefault(tag.table, []).append(tag)
    requests: list[Request] = []
    for table in sorted(by_table):
        requests.extend(_coalesce(table, by_table[table], max_gap))
    return requests


def _coalesce(table: Table, tags: list[ModbusTag], max_gap: int) -> list[Request]:
    most = limit(table)
    requests: list[Request] = []
    group: list[ModbusTag] = []
    start = end = 0
    for tag in sorted(tags, key=lambda t: (t.address, t.size)):
        tag_end = tag.address + tag.size - 1
        new_end = max(end, tag_end)
        if group and tag.address - end - 1 <= max_gap and new_end - start + 1 <= most:
            group.append(tag)
            end = new_end
            continue
        if group:
            requests.append(Request(table, start, end - start + 1, tuple(group)))
        group, start, end = [tag], tag.address, tag_end
    if group:
        requests.append(Request(table, start, end - start + 1, tuple(group)))
    return requests


def split(request: Request) -> list[Request]:
    """Smaller requests that read the same tags; empty when it cannot be split any more.

    A request with gaps becomes one request per run of adjacent tags (the gaps are what a
    device most often rejects); a run without gaps becomes one request per tag.
    """
    runs = _coalesce(request.table, list(request.tags), max_gap=0)
    if len(runs) > 1:
        return runs
    # No gap: one request per address. Tags that share a register (bits) stay together,
    # which is also why a run of bits of one register cannot be split at all.
    singles = [
        Request(request.table, group[0].address, max(t.address + t.size for t in group) - group[0].address,
                tuple(group))
        for group in _by_start(request.tags)
    ]  # fmt: skip
    return singles if len(singles) > 1 else []


def _by_start(tags: Iterable[ModbusTag]) -> list[list[ModbusTag]]:
    groups: dict[int, list[ModbusTag]] = {}
    for tag in sorted(tags, key=lambda t: t.address):
        groups.setdefault(tag.address, []).append(tag)
    return list(groups.values())


class Plan:
    """The requests of one device, which learn from exception 02 for the collector's life."""

    def __init__(self, device: str, tags: Iterable[ModbusTag], max_gap: int) -> None:
        self.device = device
        self.requests = plan(tags, max_gap)

    def split(self, request: Request) -> list[Request]:
        """Replace `request` by smaller ones and return them; empty if it cannot be split.

        Logs once per split: the plan keeps the smaller requests, so the same rejection
        does not happen again.
        """
        pieces = split(request)
        if not pieces:
            return []
        at = self.requests.index(request)
        self.requests[at : at + 1] = pieces
        log.warning(
            "device %s: %s rejected with exception 02; reading it as %d smaller requests",
            self.device, request, len(pieces),
        )  # fmt: skip
        return pieces
