"""The status server: the page `/` (live by Server-Sent Events from `/api/events`), `/livez`,
`/readyz`, `/metrics`, `/api/status`, `/api/devices/{name}`.

aiohttp in the gateway's event loop (its own signal handling off: the gateway has its own).
Everything is read from the engine's `State`, and the outbox figures from `Outbox.stats()`,
once a second at most for every request together. A handler that fails answers 500, a tick
that fails is logged, and a port that is taken leaves the gateway running without the server.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import json
import logging
import math
import shutil
import ssl
import time
from collections.abc import Awaitable, Callable
from contextlib import suppress
from dataclasses import dataclass
from importlib import resources
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import CollectorRegistry

from gateway import __version__
from gateway.http.metrics import registry
from gateway.http.settings import HttpSettings
from gateway.model import Reading, iso_millis
from gateway.outbox import Outbox, OutboxStats
from gateway.state import DeviceState, OutputState, State

log = logging.getLogger(__name__)

# Paths anyone may call: probes (systemd, a load balancer, Kubernetes) carry no credentials.
OPEN = frozenset({"/livez", "/readyz"})

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


# The page and the event stream move on once a second; so does the trend lines' sampling.
TICK = 1.0
# Pages open at once (event streams): each costs the loop a write a tick.
MAX_STREAMS = 8
PAGE = resources.files("gateway.http").joinpath("static", "index.html")


@dataclass(slots=True)
class Sources:
    """What the server reads, each asked at every request: the engine makes them as it
    starts (the state once the collectors exist, the outbox once its file is open)."""

    state: Callable[[], State | None]
    outbox: Callable[[], Outbox | None]
    not_ready: Callable[[], list[str]]  # why the gateway is not ready; empty when it is
    config_file: str | None = None


class StatusServer:
    """The aiohttp application of `settings`, reading `sources`."""

    def __init__(self, settings: HttpSettings, sources: Sources, gateway_id: str) -> None:
        self._settings = settings
        self._sources = sources
        self._id = gateway_id
        # Read once at the start: a request must not wait for a file.
        self._user = settings.username
        self._password = settings.password() if settings.username is not None else None
        self._token = settings.token()
        self._runner: web.AppRunner | None = None
        self._registry: tuple[State, CollectorRegistry] | None = None
        self._ticker: asyncio.Task[None] | None = None
        self._tick = asyncio.Event()  # set, and replaced, at every tick
        self._listeners = 0  # open event streams
        self._event: bytes | None = None  # the streams' next event, made once a tick
        self._stats: asyncio.Future[OutboxStats] | None = None  # the outbox query under way, or the last
        self._stats_at = 0.0
        self._closing = False
        app = web.Application(middlewares=[self._auth])
        app.router.add_get("/", self._page)
        app.router.add_get("/api/events", self._events)
        app.router.add_get("/livez", self._livez)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/api/status", self._status)
        app.router.add_get("/api/devices/{name}", self._device)
        self.app = app

    async def start(self) -> bool:
        """Listen; False (logged) if the address cannot be had: the gateway runs on without."""
        # A page left open must not hold up the gateway's stop: its stream ends at once.
        runner = web.AppRunner(self.app, access_log=None, handle_signals=False, shutdown_timeout=1.0)
        await runner.setup()
        s = self._settings
        try:
            context = None
            if s.cert is not None and s.key is not None:
                context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
                context.load_cert_chain(s.cert, s.key, password="")  # (checked at load)
            await web.TCPSite(runner, s.host, s.port, ssl_context=context).start()
        except OSError as exc:
            await runner.cleanup()
            log.error("http: cannot listen on %s: %s; the gateway runs without its status server",
                      s.listen, exc.strerror or exc)  # fmt: skip
            return False
        self._runner = runner
        self._ticker = asyncio.create_task(self._ticking(), name="http ticker")
        log.info(
            "http: status server on %s://%s/ (health /livez /readyz, metrics /metrics)", s.scheme, s.listen
        )
        return True

    async def stop(self) -> None:
        """Close every connection (event streams end at once) and stop listening. Never
        raises: the gateway's own shutdown goes on after it."""
        self._closing = True
        self._tick.set()  # the event streams see it and end
        if self._ticker is not None:
            self._ticker.cancel()
            with suppress(asyncio.CancelledError):
                await self._ticker
            self._ticker = None
        if self._stats is not None and not self._stats.done():
            self._stats.cancel()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    @web.middleware
    async def _auth(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path in OPEN:
            return await handler(request)
        if self._user is None and self._token is None:
            # No credentials: loopback only (the config refuses more), and by a loopback
            # name, so that a web page in a browser on this machine cannot reach it through a
            # name of its own that resolves here (DNS rebinding).
            host = request.host
            if host not in _LOOPBACK_NAMES and host.rpartition(":")[0] not in _LOOPBACK_NAMES:
                return web.Response(
                    status=403, text="this server answers to 127.0.0.1, localhost or [::1] only\n"
                )
            return await handler(request)
        if self._allowed(request.headers.get("Authorization", "")):
            return await handler(request)
        # A browser asks for a user name and password only when offered Basic: a token is for
        # machines (Prometheus, scripts).
        offer = {"WWW-Authenticate": 'Basic realm="millwright"'} if self._user is not None else {}
        return web.Response(status=401, text="credentials required\n", headers=offer)

    def _allowed(self, header: str) -> bool:
        scheme, _, value = header.partition(" ")
        if scheme.lower() == "bearer" and self._token:  # (an empty secret lets nobody in)
            return _same(value.strip(), self._token)
        if scheme.lower() == "basic" and self._user is not None and self._password:
            try:
                user, _, password = base64.b64decode(value.strip(), validate=True).decode().partition(":")
            except (binascii.Error, UnicodeDecodeError):
                return False
            # Both compared, whatever the first says: the time taken tells nothing.
            same_user = _same(user, self._user)
            same_password = _same(password, self._password)
            return same_user and same_password
        return False

    async def _ticking(self) -> None:
        """Once a second: sample the trend lines, and make the event streams' next event
        (once for all of them, with fresh outbox figures). A tick that fails is logged and the
        next one tries again: the page may freeze, the gateway must not care."""
        failed = False
        while not self._closing:
            started = time.monotonic()
            try:
                if (sampled := self._sources.state()) is not None:
                    sampled.sample()
                if self._listeners:
                    await self._fresh_outbox()
                    state = self._sources.state()
                    if state is not None:
                        self._event = _event(self._snapshot(state))
            except Exception:
                if not failed:
                    log.exception("http: the status page's update failed; trying again every second")
                failed = True
            else:
                failed = False
            tick, self._tick = self._tick, asyncio.Event()
            tick.set()
            # A large gateway's snapshot takes long to make: then the page moves on less often,
            # so that the event loop spends a tenth of its time on it at most.
            await asyncio.sleep(max(TICK, 10 * (time.monotonic() - started)))

    async def _fresh_outbox(self) -> None:
        """Fresh outbox figures in the state: one query a second at most, shared by every
        request that wants them (the query holds the outbox's lock, which appends need)."""
        state, outbox = self._sources.state(), self._sources.outbox()
        if state is None or outbox is None:
            return
        if self._stats is None or (self._stats.done() and time.monotonic() - self._stats_at >= TICK):
            self._stats_at = time.monotonic()
            self._stats = asyncio.ensure_future(outbox.stats())
        state.refresh(await asyncio.shield(self._stats))

    async def _page(self, request: web.Request) -> web.Response:
        return web.Response(text=PAGE.read_text(encoding="utf-8"), content_type="text/html", charset="utf-8")

    async def _events(self, request: web.Request) -> web.StreamResponse:
        """`event: status` with the page's snapshot at every tick, until the client goes."""
        state = await self._state()
        if self._listeners >= MAX_STREAMS:
            raise web.HTTPServiceUnavailable(text=f"{MAX_STREAMS} pages are open already\n")
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        await response.prepare(request)
        self._listeners += 1
        try:
            await response.write(_event(self._snapshot(state)))  # the first at once
            while not self._closing:
                await self._tick.wait()
                if self._event is not None and not self._closing:
                    await response.write(self._event)
        except ConnectionResetError:
            pass  # the page was closed
        finally:
            self._listeners -= 1
        return response

    def _snapshot(self, state: State) -> dict[str, Any]:
        """Everything the page shows: the status, each device's tags, their trend lines."""
        doc = self._status_of(state)
        tags: dict[str, list[dict[str, Any]]] = {}
        for (device, tag), r in state.latest.items():
            entry = _reading(r)
            ring = state.history.get((device, tag))
            if ring is not None:
                entry["trend"] = ring.values()
            tags.setdefault(device, []).append(entry)
        for device in doc["devices"]:
            device["tags"] = tags.get(device["name"], [])
        return doc

    async def _livez(self, request: web.Request) -> web.Response:
        return web.Response(text="ok\n")  # it answers: the event loop turns

    async def _readyz(self, request: web.Request) -> web.Response:
        reasons = self._sources.not_ready()
        if reasons:
            return web.Response(status=503, text="".join(f"{r}\n" for r in reasons))
        return web.Response(text="ready\n")

    async def _state(self) -> State:
        """The state with fresh outbox figures; 503 before the gateway has one."""
        state = self._sources.state()
        if state is None:
            raise web.HTTPServiceUnavailable(text="starting\n")
        await self._fresh_outbox()
        return state

    async def _metrics(self, request: web.Request) -> web.Response:
        state = await self._state()
        if self._registry is None or self._registry[0] is not state:
            self._registry = state, registry(state)
        body = generate_latest(self._registry[1])
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _status(self, request: web.Request) -> web.Response:
        return web.json_response(self._status_of(await self._state()))

    def _status_of(self, state: State) -> dict[str, Any]:
        now = time.time()
        o = state.outbox
        outbox = None if o is None else {
            "depth": o.depth, "oldest_age": o.oldest_age, "dropped": o.dropped, "bytes": o.bytes,
            "last_seq": o.last_seq,
        }  # fmt: skip
        if outbox is not None and (opened := self._sources.outbox()) is not None:
            with suppress(OSError):
                outbox["free_disk"] = shutil.disk_usage(opened.path.parent).free
        return {
            "gateway": {"id": self._id, "version": __version__, "started": iso_millis(state.started),
                        "uptime": round(now - state.started, 3), "readings": state.readings,
                        "now": iso_millis(now),
                        "config_file": self._sources.config_file},
            "devices": [_device(d) for d in state.devices.values()],
            "outputs": [_output(out) for out in state.outputs.values()],
            "outbox": outbox,
        }  # fmt: skip

    async def _device(self, request: web.Request) -> web.Response:
        state = await self._state()
        name = request.match_info["name"]
        device = state.devices.get(name)
        if device is None:
            raise web.HTTPNotFound(text=f"no device {name!r}\n")
        tags = [_reading(r) for (d, _), r in state.latest.items() if d == name]
        return web.json_response({**_device(device), "tags": tags})


# How a server without credentials may be named in a request's Host (with its port).
_LOOPBACK_NAMES = frozenset({"127.0.0.1", "localhost", "[::1]"})


def _same(given: str, secret: str) -> bool:
    """Whether `given` is `secret`, in a time that tells neither it nor its length."""
    return hmac.compare_digest(
        hashlib.sha256(given.encode()).digest(), hashlib.sha256(secret.encode()).digest()
    )


def _event(snapshot: dict[str, Any]) -> bytes:
    data = json.dumps(snapshot, separators=(",", ":"), allow_nan=False)
    return f"event: status\ndata: {data}\n\n".encode()


def _device(d: DeviceState) -> dict[str, Any]:
    return {
        "name": d.name, "protocol": d.protocol, "up": d.up, "since": iso_millis(d.since),
        "last_error": d.last_error, "reads": d.reads, "read_errors": d.read_errors, "missed": d.missed,
        "connections": d.connections, "readings": d.readings,
        "last_read": d.last_read,
    }  # fmt: skip


def _output(o: OutputState) -> dict[str, Any]:
    return {
        "name": o.name, "connected": o.connected, "since": iso_millis(o.since), "published": o.published,
        "refused": o.refused, "dropped": o.dropped, "depth": o.depth,
    }  # fmt: skip


def _reading(r: Reading) -> dict[str, Any]:
    value = r.value
    if isinstance(value, float) and not math.isfinite(value):
        value = None  # JSON has no NaN: as the UNS payload does
    doc: dict[str, Any] = {"tag": r.tag, "value": value, "quality": r.quality.value,
                           "timestamp": iso_millis(r.timestamp), "unit": r.unit}  # fmt: skip
    if r.status:
        doc["status"] = f"0x{r.status:08X}"
    return doc
