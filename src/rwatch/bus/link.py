"""The publisher's link to RabbitMQ: one connection and confirm channel, opened (with the bus's retry policy)
on demand and again as soon as the broker drops it.

Reconnection is ours over a plain ``aio_pika.connect`` rather than a robust connection: the robust connection
restores channels in the background but does not replay failed publishes, and the publisher must know exactly
which messages were confirmed on which connection.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import aio_pika
import aiormq
from aio_pika.abc import AbstractChannel, AbstractConnection
from aiormq.exceptions import AMQPError, ChannelInvalidStateError
from tenacity.wait import wait_base

from rwatch.bus.topology import declare_topology
from rwatch.config import Config, mask_url
from rwatch.errors import BusError, Stopping, TopologyConflict
from rwatch.logs import get_logger
from rwatch.metrics import BUS_CONNECTED, BUS_RECONNECTS
from rwatch.retry import Policy, close_quietly, log_retry, retrying


def connection_gone(connection: AbstractConnection) -> bool:
    """The connection is closed, by us or under us: aio-pika marks only the first at once, its transport both
    (the close callbacks that would tell the owner run a moment later)."""
    transport = getattr(connection, "transport", None)
    return connection.is_closed or transport is None or transport.connection.is_closed


class Link:
    """One connection, its channel, and the publishes in flight on that channel.

    ``abort`` fails every publish in flight on the link at once; it runs when the channel closes (the
    broker or the network closed it, or we dropped it). aiormq only rejects the futures it tracks (the
    confirmations): a publish still waiting inside ``basic_publish`` for the channel lock, or for room in
    the connection's bounded write queue whose writer died with the socket, is never woken and would
    wait for its ``publish_timeout``, holding window slots and stalling every publish behind it.
    """

    __slots__ = ("channel", "connection", "inflight", "raw")

    def __init__(self, connection: AbstractConnection, channel: AbstractChannel, raw: aiormq.Channel) -> None:
        self.connection = connection
        self.channel = channel
        self.raw = raw
        self.inflight: set[asyncio.Task[None]] = set()

    @property
    def usable(self) -> bool:
        return not self.connection.is_closed and not self.channel.is_closed and not self.raw.is_closed

    def abort(self, *_: Any) -> None:
        for task in list(self.inflight):
            task.cancel("rwatch: connection or channel lost")


class Connector:
    """Keeps the one link of a bus: ``ready`` returns it, connecting first when there is none; ``drop`` forgets
    a link found broken; a link the broker closes is replaced at once, not at the next publish."""

    def __init__(self, config: Config, *, stop: asyncio.Event, closed: asyncio.Event, policy: Policy | wait_base,
                 connection_name: str, connect_timeout: float) -> None:
        self._config = config
        self._url = config.bus.url.get_secret_value()
        self._connection_name = connection_name  # shown by the broker; lets ops (and tests) find it
        self._connect_timeout = connect_timeout  # connect, open the channel, declare the topology
        self._close_timeout = config.run.close_timeout  # a close handshake the broker does not answer
        self._stop = stop
        self._closed = closed
        self._policy = policy
        self._lock = asyncio.Lock()
        self._link: Link | None = None  # the connection and channel (and aio-pika's channel's aiormq one)
        self._reconnecting: asyncio.Task[None] | None = None  # after the broker closed it (kept: not collected)
        self._ever_connected = False
        self._log = get_logger("rwatch.bus", exchange=config.bus.exchange)

    @property
    def link(self) -> Link | None:
        """The current link, usable or not; None while there is none."""
        return self._link

    @property
    def connected(self) -> bool:
        link = self._link
        return link is not None and link.usable

    async def ready(self) -> Link:
        """The current link, connecting (with backoff, until stop or close) when there is none."""
        link = self._link
        if link is not None and link.usable:
            return link
        async with self._lock:
            connecting = retrying(self._policy, stop=[self._stop, self._closed],
                                  before_sleep=log_retry(self._log, "bus_connect_failed", url=mask_url(self._url)))
            return await connecting(self._current_or_connect)

    async def close(self) -> None:
        """Close the link (``closed`` is already set: nothing reconnects)."""
        if self._reconnecting is not None:
            self._reconnecting.cancel()
            await asyncio.gather(self._reconnecting, return_exceptions=True)
        link, self._link = self._link, None
        BUS_CONNECTED.set(0)
        if link is not None:
            link.abort()
            await close_quietly(link.connection.close(), self._close_timeout)

    async def drop(self, link: Link | None, reason: str) -> None:
        """Forget ``link`` (if it is still the current one) and close it; the next ``ready`` reconnects."""
        if link is None or link is not self._link:
            return
        self._link = None
        BUS_CONNECTED.set(0)
        conn = link.connection
        if not conn.is_closed:  # else the close callback has already logged it
            self._log.warning("bus_connection_lost", reason=reason)
        # Publishes of other rounds still in flight on it fail now, not when the close handshake is done.
        link.abort()
        await close_quietly(conn.close(), self._close_timeout)

    async def _current_or_connect(self) -> Link:
        """One attempt: the link another caller made meanwhile, or a new one."""
        if self._closed.is_set():
            raise Stopping("bus closed")
        link = self._link
        if link is not None and link.usable:
            return link
        await self.drop(link, "channel_closed")  # a half-dead connection: channel gone, socket open
        try:
            return await self._connect()
        except (AMQPError, ChannelInvalidStateError) as exc:  # aio-pika's words for broker trouble: ours, transient
            raise BusError(repr(exc)) from exc

    async def _connect(self) -> Link:
        conn = await aio_pika.connect(
            self._url,
            timeout=self._connect_timeout,
            client_properties={"connection_name": self._connection_name},
        )
        try:
            async with asyncio.timeout(self._connect_timeout):
                channel = await conn.channel(publisher_confirms=True, on_return_raises=True)
                await declare_topology(channel, self._config)
                raw = await channel.get_underlay_channel()
            if not isinstance(raw, aiormq.Channel):  # pragma: no cover - aio-pika always builds on aiormq
                raise TypeError(f"unexpected channel type {type(raw).__name__}")
            if self._closed.is_set():
                raise Stopping("bus closed while connecting")
        except BaseException as exc:
            gone = isinstance(exc, RuntimeError) and connection_gone(conn)
            await close_quietly(conn.close(), self._close_timeout)
            if gone:  # aio-pika's bare RuntimeError("... closed"): the broker dropped it as we opened the channel
                raise BusError(f"connection closed while opening its channel: {exc!r}") from exc
            raise
        link = Link(conn, channel, raw)
        # The aiormq channel's closing future completes whenever the channel goes, with its connection
        # too (the connection rejects its channels' futures), so this one hook covers every way to lose it.
        raw.closing.add_done_callback(link.abort)
        conn.close_callbacks.add(self._on_connection_closed)
        self._link = link
        BUS_CONNECTED.set(1)
        if self._ever_connected:
            BUS_RECONNECTS.inc()
        self._log.info("bus_connected", url=mask_url(self._url), reconnect=self._ever_connected,
                       sinks=self._config.queue_sinks)
        self._ever_connected = True
        return link

    def _on_connection_closed(self, sender: Any, exc: BaseException | None = None, *_: Any) -> None:
        link = self._link
        if link is None or sender is not link.connection or self._closed.is_set():
            return
        # The broker or the network closed it. Reconnect now, not at the next publish: an idle watcher may not
        # publish for a long time, and meanwhile /readyz would report the broker down after it came back.
        BUS_CONNECTED.set(0)
        self._log.warning("bus_connection_lost", reason="closed", error=repr(exc))
        if self._reconnecting is None or self._reconnecting.done():
            self._reconnecting = asyncio.get_running_loop().create_task(self._reconnect(), name="bus:reconnect")

    async def _reconnect(self) -> None:
        with contextlib.suppress(Stopping, TopologyConflict):  # stopping; a conflict is reported by the next publish
            await self.ready()
