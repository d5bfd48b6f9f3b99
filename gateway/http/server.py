"""The status server: `/livez`, `/readyz`, `/metrics`, `/api/status`, `/api/devices/{name}`.

aiohttp in the gateway's event loop (its own signal handling off: the gateway has its own).
Everything is read from the engine's `State`, and the outbox figures from `Outbox.stats()` at
each request that shows them. Nothing here can hold up delivery: a handler that fails
answers 500, and a port that is taken leaves the gateway running without the server.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import CollectorRegistry

from gateway import __version__
from gateway.http.metrics import registry
from gateway.http.settings import HttpSettings
from gateway.model import Reading, iso_millis
from gateway.outbox import Outbox
from gateway.state import DeviceState, OutputState, State

log = logging.getLogger(__name__)

# Paths anyone may call: probes (systemd, a load balancer, Kubernetes) carry no credentials.
OPEN = frozenset({"/livez", "/readyz"})

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(slots=True)
class Sources:
    """What the server reads, each asked at every request: the engine makes them as it
    starts (the state once the collectors exist, the outbox once its file is open)."""

    state: Callable[[], State | None]
    outbox: Callable[[], Outbox | None]
    not_ready: Callable[[], list[str]]  # why the gateway is not ready; empty when it is


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
        app = web.Application(middlewares=[self._auth])
        app.router.add_get("/livez", self._livez)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/api/status", self._status)
        app.router.add_get("/api/devices/{name}", self._device)
        self.app = app

    async def start(self) -> bool:
        """Listen; False (logged) if the address cannot be had: the gateway runs on without."""
        runner = web.AppRunner(self.app, access_log=None, handle_signals=False)
        await runner.setup()
        s = self._settings
        try:
            await web.TCPSite(runner, s.host, s.port).start()
        except OSError as exc:
            await runner.cleanup()
            log.error("http: cannot listen on %s: %s; the gateway runs without its status server",
                      s.listen, exc.strerror or exc)  # fmt: skip
            return False
        self._runner = runner
        log.info("http: status server on http://%s/ (health /livez /readyz, metrics /metrics)", s.listen)
        return True

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    @web.middleware
    async def _auth(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path in OPEN or (self._user is None and self._token is None):
            return await handler(request)
        if self._allowed(request.headers.get("Authorization", "")):
            return await handler(request)
        return web.Response(
            status=401,
            text="credentials required\n",
            headers={"WWW-Authenticate": 'Basic realm="millwright"'},
        )

    def _allowed(self, header: str) -> bool:
        scheme, _, value = header.partition(" ")
        if scheme.lower() == "bearer" and self._token is not None:
            return hmac.compare_digest(value.strip().encode(), self._token.encode())
        if scheme.lower() == "basic" and self._user is not None and self._password is not None:
            try:
                user, _, password = base64.b64decode(value.strip(), validate=True).decode().partition(":")
            except (binascii.Error, UnicodeDecodeError):
                return False
            # Both compared, whatever the first says: the time taken tells nothing.
            same_user = hmac.compare_digest(user.encode(), self._user.encode())
            same_password = hmac.compare_digest(password.encode(), self._password.encode())
            return same_user and same_password
        return False

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
        outbox = self._sources.outbox()
        if outbox is not None:
            state.refresh(await outbox.stats())
        return state

    async def _metrics(self, request: web.Request) -> web.Response:
        state = await self._state()
        if self._registry is None or self._registry[0] is not state:
            self._registry = state, registry(state)
        body = generate_latest(self._registry[1])
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _status(self, request: web.Request) -> web.Response:
        state = await self._state()
        now = time.time()
        o = state.outbox
        outbox = None if o is None else {
            "depth": o.depth, "oldest_age": o.oldest_age, "dropped": o.dropped, "bytes": o.bytes,
            "last_seq": o.last_seq,
        }  # fmt: skip
        return web.json_response({
            "gateway": {"id": self._id, "version": __version__, "started": iso_millis(state.started),
                        "uptime": round(now - state.started, 3), "readings": state.readings},
            "devices": [_device(d, state) for d in state.devices.values()],
            "outputs": [_output(out) for out in state.outputs.values()],
            "outbox": outbox,
        })  # fmt: skip

    async def _device(self, request: web.Request) -> web.Response:
        state = await self._state()
        name = request.match_info["name"]
        device = state.devices.get(name)
        if device is None:
            raise web.HTTPNotFound(text=f"no device {name!r}\n")
        tags = [_reading(r) for (d, _), r in state.latest.items() if d == name]
        return web.json_response({**_device(device, state), "tags": tags})


def _device(d: DeviceState, state: State) -> dict[str, Any]:
    return {
        "name": d.name, "protocol": d.protocol, "up": d.up, "since": iso_millis(d.since),
        "last_error": d.last_error, "reads": d.reads, "read_errors": d.read_errors, "missed": d.missed,
        "connections": d.connections, "readings": state.readings_of.get(d.name, 0),
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
    elif isinstance(value, bytes | bytearray):
        value = value.hex()
    doc: dict[str, Any] = {"tag": r.tag, "value": value, "quality": r.quality.value,
                           "timestamp": iso_millis(r.timestamp), "unit": r.unit}  # fmt: skip
    if r.status:
        doc["status"] = f"0x{r.status:08X}"
    return doc
