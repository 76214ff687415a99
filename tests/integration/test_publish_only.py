"""``bus.publish_only``: a watcher whose consumers live elsewhere (issue 12, point 8).

Its configuration names no sink, so it declares no queue. Until the consumers have bound theirs, the broker returns
its publishes: it waits without saving a cursor (nothing lost), and ``/readyz`` says why (``route:<resource>``)
instead of looking healthy. Once a queue is bound, the events flow and the check clears.
"""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import Any

import aio_pika
import orjson
import pytest

from rwatch.app import run_async
from rwatch.config import load_config
from rwatch.sim.parts import SimOptions
from rwatch.sim.server import Simulator
from rwatch.store.base import open_store
from tests.configs import only
from tests.test_refusals import readyz, until

pytestmark = pytest.mark.amqp


async def test_a_publish_only_watcher_waits_for_a_queue_and_says_so(tmp_path: Path, amqp_url: str) -> None:
    unique = uuid.uuid4().hex[:10]
    exchange, queue_name = f"po-{unique}", f"po-{unique}.elsewhere.host"
    async with Simulator(SimOptions(port=0, hold=0.5, error_delay=0.0, hosts=4)) as sim:
        path = tmp_path / "watcher.toml"
        path.write_text(f"""
[cmdb]
base_url = "{sim.url}"
rate_limit = 0
{only("host")}
[bus]
url = "{amqp_url}"
exchange = "{exchange}"
queue_prefix = "po-{unique}"
publish_only = true
[store]
url = "sqlite:///{tmp_path}/state.db"
[http]
listen = "127.0.0.1:0"
""")
        stop = asyncio.Event()
        port: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        daemon = asyncio.create_task(run_async(load_config(path, environ={}), stop, role="watcher",
                                               http_port=port))
        connection = await aio_pika.connect(amqp_url)
        try:
            http = await asyncio.wait_for(port, 30)

            async def unrouted() -> dict[str, Any] | None:
                status, body = await readyz(http)
                return body if status == 503 and "route:host" in body.get("failing", []) else None

            body = await until(unrouted)
            check = body["checks"]["route:host"]
            assert body["status"] == "not_ready" and check["routing_key"] == "cmdb.host.*"
            assert exchange in check["fix"]
            store = open_store(f"sqlite:///{tmp_path}/state.db")
            await store.open()
            try:
                assert await store.load("0", "host") is None  # waiting: nothing saved, nothing lost
            finally:
                await store.close()

            # The consumers elsewhere start and declare their queue.
            channel = await connection.channel()
            queue = await channel.declare_queue(queue_name, durable=True)
            await queue.bind(exchange, routing_key="cmdb.host.*")

            async def routed() -> bool:
                status, body = await readyz(http)
                return status == 200 and "route:host" not in body["checks"]

            await until(routed)
            sim.state.update("host", next(iter(sim.state.objects("host"))), {"bk_host_name": "delivered"})
            newest = sim.state.chain("host")[-1].cursor
            received: list[dict[str, Any]] = []

            async def arrived() -> bool:
                while (message := await queue.get(no_ack=True, fail=False)) is not None:
                    received.append(orjson.loads(message.body))
                return any(e["cursor"] == newest for e in received)

            await until(arrived)
        finally:
            stop.set()
            await asyncio.wait_for(daemon, 30)
            async with connection.channel() as channel:
                await channel.queue_delete(queue_name)
                await channel.exchange_delete(exchange)
            await connection.close()
