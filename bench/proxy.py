"""A TCP proxy on loopback that can stall, for the soak's network fault.

    python -m bench.proxy LISTEN_PORT UPSTREAM_PORT

Forwards every connection to 127.0.0.1:UPSTREAM_PORT, byte for byte. Signals control it:
- SIGUSR1 stalls it: nothing moves in either direction, no socket is closed, and new
  connections are accepted (the kernel completes the handshake) but not forwarded either, as
  on a network path that silently stopped carrying packets. Each side then only learns of it
  from its own timeouts (MQTT keepalive);
- SIGUSR2 resumes forwarding on every connection, as if the path had come back;
- SIGHUP resets every connection (both sides), then forwards again: a path that came back
  after a middlebox forgot the connections.
It prints "ready" once it listens, and a line per change.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys

_CHUNK = 65536
Writer = asyncio.StreamWriter


class Proxy:
    def __init__(self, upstream: int) -> None:
        self.upstream = upstream
        self.flowing = asyncio.Event()
        self.flowing.set()
        # Each connection's task and its sockets (client side, then upstream once connected).
        self.links: dict[asyncio.Task[None], list[Writer]] = {}

    def stall(self) -> None:
        self.flowing.clear()
        print(f"stalled ({len(self.links)} connections)", flush=True)

    def resume(self) -> None:
        self.flowing.set()
        print(f"resumed ({len(self.links)} connections)", flush=True)

    def reset(self) -> None:
        # Aborted sockets (RST, the stalled bytes discarded) end each link's pumps with EOF,
        # so the links finish on their own rather than being cancelled.
        for writers in self.links.values():
            for writer in writers:
                writer.transport.abort()
        self.flowing.set()
        print(f"reset {len(self.links)} connections, forwarding again", flush=True)

    async def handle(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        writers = self.links[task] = [client_w]
        try:
            await self._link(client_r, client_w, writers)
        finally:
            del self.links[task]
            client_w.close()

    async def _link(
        self,
        client_r: asyncio.StreamReader,
        client_w: asyncio.StreamWriter,
        writers: list[asyncio.StreamWriter],
    ) -> None:
        # A connection that arrives during a stall waits here: it is not forwarded either.
        await self.flowing.wait()
        try:
            up_r, up_w = await asyncio.open_connection("127.0.0.1", self.upstream)
        except OSError:
            return  # upstream down (a broker restart): the client sees its connection close
        writers.append(up_w)
        pumps = [
            asyncio.create_task(self._pump(client_r, up_w)),
            asyncio.create_task(self._pump(up_r, client_w)),
        ]
        try:
            # Either side closing ends the link; the other direction is closed with it.
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for pump in pumps:
                pump.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)
            up_w.close()

    async def _pump(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while True:
                await self.flowing.wait()
                data = await src.read(_CHUNK)
                if not data:
                    return
                # Bytes read as the stall began are held with the rest, not delivered.
                await self.flowing.wait()
                dst.write(data)
                await dst.drain()


async def serve(listen: int, upstream: int) -> None:
    proxy = Proxy(upstream)
    loop = asyncio.get_running_loop()
    done = asyncio.Event()
    loop.add_signal_handler(signal.SIGUSR1, proxy.stall)
    loop.add_signal_handler(signal.SIGUSR2, proxy.resume)
    loop.add_signal_handler(signal.SIGHUP, proxy.reset)
    loop.add_signal_handler(signal.SIGTERM, done.set)
    loop.add_signal_handler(signal.SIGINT, done.set)
    server = await asyncio.start_server(proxy.handle, "127.0.0.1", listen)
    print("ready", flush=True)
    async with server:
        await done.wait()
        proxy.reset()
        if proxy.links:
            await asyncio.wait(list(proxy.links), timeout=1)


def main(argv: list[str]) -> int:
    listen, upstream = (int(a) for a in argv)
    asyncio.run(serve(listen, upstream))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
