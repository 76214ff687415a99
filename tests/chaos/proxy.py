"""A TCP proxy the nemesis can break: reset every connection, stall (forward nothing for a while), add delay.

It sits in front of RabbitMQ and in front of the simulator; rwatch is configured with the proxy's address
and never knows. ``reset`` aborts both sides of every open connection (an RST, as a dying middlebox
sends); ``stall`` keeps the connections open but forwards no byte in either direction, and accepts new
connections without dialling upstream, until ``heal`` (a network partition that TCP itself does not
notice); ``delay`` holds every chunk that long before forwarding it (a slow link).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from urllib.parse import urlsplit

_CHUNK = 64 * 1024


class Proxy:
    def __init__(self, name: str, upstream_host: str, upstream_port: int) -> None:
        self.name = name
        self.upstream = (upstream_host, upstream_port)
        self.port = 0
        self.delay = 0.0
        self.counts: Counter[str] = Counter()  # connections, resets, stalls
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._server: asyncio.Server | None = None
        self._links: set[tuple[asyncio.StreamWriter, ...]] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    @classmethod
    def before(cls, name: str, url: str, default_port: int = 5672) -> Proxy:
        """A proxy in front of the server ``url`` names; ``via(url)`` is the URL that goes through it."""
        parts = urlsplit(url)
        return cls(name, parts.hostname or "127.0.0.1", parts.port or default_port)

    def via(self, url: str) -> str:
        """``url`` (credentials, path and query kept) pointed at this proxy instead of its server."""
        parts = urlsplit(url)
        auth = parts.netloc.rpartition("@")[0]
        return parts._replace(netloc=f"{auth}@127.0.0.1:{self.port}" if auth else f"127.0.0.1:{self.port}").geturl()

    async def __aenter__(self) -> Proxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.heal()
        if self._server is not None:
            self._server.close()
        self.reset(count=False)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)

    def url(self, scheme: str, rest: str = "") -> str:
        return f"{scheme}://127.0.0.1:{self.port}{rest}"

    # --- the faults ------------------------------------------------------------------------------------------

    def reset(self, *, count: bool = True) -> int:
        """Abort every open connection, both sides; returns how many."""
        links = list(self._links)
        self._links.clear()
        for writers in links:
            for writer in writers:
                writer.transport.abort()
        if count:
            self.counts["resets"] += 1
        return len(links)

    def stall(self) -> None:
        self._flowing.clear()
        self.counts["stalls"] += 1

    def heal(self) -> None:
        self.delay = 0.0
        self._flowing.set()

    # --- forwarding ------------------------------------------------------------------------------------------

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.ensure_future(self._serve(reader, writer))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        self.counts["connections"] += 1
        await self._flowing.wait()
        try:
            up_r, up_w = await asyncio.open_connection(*self.upstream)
        except OSError:
            client_w.transport.abort()
            return
        link = (client_w, up_w)
        self._links.add(link)
        pumps = [asyncio.ensure_future(self._pump(client_r, up_w)), asyncio.ensure_future(self._pump(up_r, client_w))]
        try:
            # Either side closing ends the connection: neither HTTP keep-alive nor AMQP needs a half-close.
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for pump in pumps:
                pump.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)
            self._links.discard(link)
            for w in link:
                w.close()

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while True:
                await self._flowing.wait()
                data = await reader.read(_CHUNK)
                if not data:
                    return
                if self.delay > 0:
                    await asyncio.sleep(self.delay)
                await self._flowing.wait()  # a chunk read just before a stall waits out the stall too
                writer.write(data)
                await writer.drain()
