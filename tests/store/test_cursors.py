"""Saved cursor positions, on both backends: round trips, per tenant and resource, forgetting, and a kill -9
that never loses an acknowledged save."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import sys
import textwrap

import pytest

from rwatch.cmdb.protocol import NO_EVENT_CURSOR
from rwatch.store.base import CursorStore, open_store
from rwatch.store.records import CursorState
from tests.store.helpers import state


async def test_load_of_an_unknown_resource_is_none(store: CursorStore) -> None:
    assert await store.load("0", "host") is None
    assert await store.states() == []


@pytest.mark.parametrize(
    "saved",
    [
        CursorState("0", "host", "MQ0yDTVm", (1_732_000_000, 3), 1_732_000_000.0, 1_732_600_000.123456),
        CursorState("0", "host", "not-a-cursor", None, None, 1_732_600_000.0),
        CursorState("0", "host", "x" * 4000, (2**40, 2**31), 1_732_600_000.987654321, 0.0),
        CursorState("租户", "object_instance", NO_EVENT_CURSOR, None, 5.25, 1.0),
    ],
    ids=["decoded", "undecoded", "long", "unicode"],
)
async def test_save_then_load_round_trips_exactly(store: CursorStore, saved: CursorState) -> None:
    await store.save(saved)
    assert await store.load(saved.tenant, saved.resource) == saved


async def test_save_overwrites(store: CursorStore) -> None:
    await store.save(state(n=1))
    await store.save(state(n=2))
    await store.save(CursorState("0", "host", "cursor-3", None, None, 9.0))
    assert await store.load("0", "host") == CursorState("0", "host", "cursor-3", None, None, 9.0)
    assert len(await store.states()) == 1


async def test_positions_are_per_tenant_and_per_resource(store: CursorStore) -> None:
    saved = [state("0", "host", 1), state("0", "biz", 2), state("t2", "host", 3)]
    for one in saved:
        await store.save(one)
    for one in saved:
        assert await store.load(one.tenant, one.resource) == one
    assert await store.load("t2", "biz") is None
    await store.save(state("t2", "host", 4))
    assert await store.load("0", "host") == saved[0]


async def test_states_lists_every_position_or_one_tenants(store: CursorStore) -> None:
    saved = [state("t2", "host", 1), state("0", "set", 2), state("0", "biz", 3)]
    for one in saved:
        await store.save(one)
    assert await store.states() == sorted(saved, key=lambda s: (s.tenant, s.resource))
    assert await store.states("0") == [saved[2], saved[1]]
    assert await store.states("nobody") == []


async def test_delete_forgets_the_position_but_not_the_gaps(store: CursorStore) -> None:
    await store.save(state("0", "host", 1))
    await store.save(state("0", "biz", 2))
    gap = await store.add_gap("0", "host", 10.0, 20.0, "cursor_expired")
    await store.delete("0", "host")
    assert await store.load("0", "host") is None
    assert await store.load("0", "biz") == state("0", "biz", 2)
    assert await store.gaps() == [gap]
    await store.delete("0", "host")  # forgetting twice is fine
    await store.delete("nobody", "nothing")


async def test_concurrent_saves_of_many_resources(store: CursorStore) -> None:
    resources = [f"res{i}" for i in range(30)]
    await asyncio.gather(*(store.save(state("0", r, n)) for n, r in enumerate(resources)))
    assert await store.states() == sorted((state("0", r, n) for n, r in enumerate(resources)),
                                          key=lambda s: s.resource)


SAVER = textwrap.dedent("""
    import asyncio, sys
    from rwatch.store.base import open_store
    from rwatch.store.records import CursorState

    async def main(url: str) -> None:
        store = open_store(url)
        await store.open()
        n = 0
        while True:
            n += 1
            await store.save(CursorState("0", "host", f"c{n}", (n, 0), float(n), float(n)))
            # printed only after save() returned: everything printed must survive the kill
            sys.stdout.write(f"saved {n}\\n")
            sys.stdout.flush()

    asyncio.run(main(sys.argv[1]))
""")


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2, 3, 4, 5])
async def test_kill_9_never_loses_an_acknowledged_save(db_url: str, seed: int) -> None:
    rng = random.Random(seed)
    target = rng.randint(1, 300)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", SAVER, db_url,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert proc.stdout is not None
    printed = 0
    try:
        while printed < target:
            line = await proc.stdout.readline()
            if not line:
                stderr = await proc.stderr.read() if proc.stderr else b""
                pytest.fail(f"the saver died early: {stderr.decode()[-2000:]}")
            if line.startswith(b"saved "):
                printed = int(line.split()[1])
        # The saver keeps going while the signal travels, so it dies at an arbitrary point of a save.
        proc.send_signal(signal.SIGKILL)
        rest, _ = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == -signal.SIGKILL
    printed = max([printed, *(int(x.split()[1]) for x in rest.splitlines() if x.startswith(b"saved "))])

    async with open_store(db_url) as store:
        saved = await store.load("0", "host")
    assert saved is not None
    assert saved.version is not None
    # Never older than the last acknowledged save; at most the one that returned but was not yet printed.
    assert printed <= saved.version[0] <= printed + 1
    assert saved.cursor == f"c{saved.version[0]}"
