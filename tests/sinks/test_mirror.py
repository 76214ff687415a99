"""The mirror sink. One contract suite runs on both backends (the ``db_url`` fixture is parametrised over a
SQLite file and a fresh PostgreSQL database); backend-only behaviour (SQLite locking and pragmas,
PostgreSQL connections dropping) follows it."""

from __future__ import annotations

import asyncio
import hashlib
import random
import sqlite3
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rwatch.config import MirrorSinkConfig, SecretUrl
from rwatch.errors import ConfigError, SinkRejected, SinkUnavailable, TransientError
from rwatch.events import Action, Event, ResyncMark, resync_event_id
from rwatch.sinks.base import Sink, TopologyRow
from rwatch.sinks.mirror import MirroredObject, MirrorSink
from rwatch.sinks.mirror_schema import TOPOLOGY_VIEW
from tests.sql_helpers import assert_sqlite_pragmas, unreachable_pg_url


def settings_for(url: str) -> MirrorSinkConfig:
    return MirrorSinkConfig(kind="mirror", url=SecretUrl(url))


@pytest.fixture
async def mirror(db_url: str) -> AsyncIterator[MirrorSink]:
    async with MirrorSink("mirror", settings_for(db_url)) as opened:
        yield opened


def ev(resource: str, key: str, action: Action, version: tuple[int, int] | int, data: dict[str, Any] | None = None,
       tenant: str = "0") -> Event:
    version = (version, 0) if isinstance(version, int) else version
    ident = hashlib.sha256(f"{resource}\n{key}\n{version}\n{action}".encode()).hexdigest()
    return Event(id=ident, resource=resource, action=action, key=key, tenant=tenant, version=version,
                 occurred_at="2024-11-19T00:00:00Z", observed_at="2024-11-19T00:00:01Z",
                 data={} if data is None else data)


def host(host_id: int, v: int, action: Action = "create", tenant: str = "0", **extra: Any) -> Event:
    data = {"bk_host_id": host_id, "bk_host_innerip": f"10.0.0.{host_id}", "bk_cloud_id": 0,
            "bk_host_name": f"host-{host_id}", **extra}
    return ev("host", str(host_id), action, v, data, tenant)


def named(resource: str, obj_id: int, v: int, action: Action = "create", tenant: str = "0", **extra: Any) -> Event:
    data = {f"bk_{resource}_id": obj_id, f"bk_{resource}_name": f"{resource}-{obj_id}", **extra}
    return ev(resource, str(obj_id), action, v, data, tenant)


def relation(host_id: int, module_id: int, set_id: int, biz_id: int, v: int, action: Action = "create",
             tenant: str = "0") -> Event:
    data = {"bk_biz_id": biz_id, "bk_set_id": set_id, "bk_module_id": module_id, "bk_host_id": host_id}
    return ev("host_relation", f"{host_id}:{module_id}", action, v, data, tenant)


def state(objects: dict[str, MirroredObject]) -> dict[str, tuple[tuple[int, int], bool, dict[str, Any], str]]:
    """What must match between two mirrors fed the same events: everything but the wall-clock updated_at."""
    return {key: (o.version, o.deleted, o.data, o.event_id) for key, o in objects.items()}


def test_mirror_satisfies_the_sink_protocol() -> None:
    chosen: Sink = MirrorSink("mirror", settings_for("sqlite:///x.db"))
    assert chosen.name == "mirror"


# --- apply: the contract, on both backends ---------------------------------------------------------------


async def test_create_update_delete_round_trip(mirror: MirrorSink) -> None:
    created = host(1, 10)
    await mirror.apply([created])
    (row,) = (await mirror.objects("host")).values()
    assert (row.key, row.version, row.deleted, row.data, row.event_id) == ("1", (10, 0), False, created.data,
                                                                          created.id)
    updated = host(1, 11, "update", bk_host_name="renamed", nested={"a": [1, 2.5, None, "ü"]})
    await mirror.apply([updated])
    assert state(await mirror.objects("host")) == {"1": ((11, 0), False, updated.data, updated.id)}
    deleted = host(1, 12, "delete", bk_host_name="renamed")
    await mirror.apply([deleted])
    assert await mirror.objects("host") == {}
    # The tombstone keeps the document as CMDB sent it with the delete.
    assert state(await mirror.objects("host", include_deleted=True)) == {"1": ((12, 0), True, deleted.data,
                                                                               deleted.id)}


async def test_a_tombstone_blocks_older_creates_and_updates(mirror: MirrorSink) -> None:
    await mirror.apply([host(1, 10), host(1, 20, "delete")])
    await mirror.apply([host(1, 15, "update")])
    await mirror.apply([host(1, 10)])
    await mirror.apply([host(1, 19, "update"), host(1, 20, "update")])  # equal to the tombstone's: no-op too
    row = (await mirror.objects("host", include_deleted=True))["1"]
    assert (row.version, row.deleted) == ((20, 0), True)


async def test_a_newer_create_after_a_delete_revives(mirror: MirrorSink) -> None:
    await mirror.apply([host(1, 10), host(1, 11, "delete")])
    revived = host(1, 12, bk_host_name="again")
    await mirror.apply([revived])
    assert state(await mirror.objects("host")) == {"1": ((12, 0), False, revived.data, revived.id)}


async def test_the_increment_orders_events_of_the_same_second(mirror: MirrorSink) -> None:
    await mirror.apply([ev("biz", "3", "create", (100, 2), {"n": 2})])
    await mirror.apply([ev("biz", "3", "update", (100, 1), {"n": 1})])
    assert (await mirror.objects("biz"))["3"].data == {"n": 2}
    await mirror.apply([ev("biz", "3", "update", (100, 3), {"n": 3})])
    await mirror.apply([ev("biz", "3", "update", (99, 7), {"n": 99})])
    assert (await mirror.objects("biz"))["3"].data == {"n": 3}


async def test_an_equal_version_is_a_no_op(mirror: MirrorSink) -> None:
    first = ev("set", "5", "create", 10, {"bk_set_name": "first"})
    await mirror.apply([first])
    before = (await mirror.objects("set"))["5"]
    await mirror.apply([ev("set", "5", "update", 10, {"bk_set_name": "other"}), ev("set", "5", "delete", 10)])
    await mirror.apply([first])  # a plain redelivery
    assert (await mirror.objects("set"))["5"] == before  # not even updated_at moved


async def test_a_batch_collapses_each_key_to_its_newest_event(mirror: MirrorSink) -> None:
    newest = host(1, 30, "update", bk_host_name="newest")
    await mirror.apply([host(1, 10), newest, host(1, 20, "update"), host(2, 5), host(2, 6, "delete")])
    assert state(await mirror.objects("host", include_deleted=True)) == {
        "1": ((30, 0), False, newest.data, newest.id),
        "2": ((6, 0), True, host(2, 6, "delete").data, host(2, 6, "delete").id),
    }


async def test_objects_are_kept_per_tenant_and_resource(mirror: MirrorSink) -> None:
    await mirror.apply([named("set", 1, 10, tenant="0"), named("set", 1, 5, tenant="t2"), named("module", 1, 7)])
    assert [o.version for o in (await mirror.objects("set")).values()] == [(10, 0)]
    assert [o.version for o in (await mirror.objects("set", "t2")).values()] == [(5, 0)]
    assert [o.version for o in (await mirror.objects("module")).values()] == [(7, 0)]
    assert await mirror.objects("set", "t3") == {}


async def test_an_empty_batch_is_nothing(mirror: MirrorSink) -> None:
    calls: list[int] = []
    mirror.add_listener(lambda: calls.append(1))
    await mirror.apply([])
    assert calls == []


async def test_listeners_run_after_each_committed_apply_only(mirror: MirrorSink) -> None:
    seen: list[int] = []

    def count_hosts() -> None:  # runs after the commit: a fresh read would already see the batch
        seen.append(1)

    def broken() -> None:
        raise RuntimeError("listener bug")

    mirror.add_listener(broken)
    mirror.add_listener(count_hosts)
    await mirror.apply([host(1, 1)])  # a broken listener neither fails the apply nor stops the others
    await mirror.apply([host(1, 1)])  # a no-op batch is still a committed apply
    with pytest.raises(SinkRejected):
        await mirror.apply([host(2, 1, blob=2**70)])
    assert seen == [1, 1]


# --- atomicity and error classification -------------------------------------------------------------------

_SQLITE_TRIGGER = """CREATE TRIGGER rwatch_test_refuse BEFORE INSERT ON rwatch_objects WHEN NEW.key = 'boom'
BEGIN SELECT RAISE(ABORT, 'boom refused'); END"""
_PG_TRIGGER = """CREATE FUNCTION rwatch_test_refuse() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN IF NEW.key = 'boom' THEN RAISE EXCEPTION 'boom refused' USING ERRCODE = '{code}'; END IF; RETURN NEW; END
$$; CREATE TRIGGER rwatch_test_refuse BEFORE INSERT ON rwatch_objects FOR EACH ROW
EXECUTE FUNCTION rwatch_test_refuse()"""


async def refuse_key_boom(mirror: MirrorSink, sqlstate: str = "22023") -> None:
    """Make the database itself fail the row with key ``boom``, mid-statement, with the given SQLSTATE."""
    engine = mirror._engine
    assert engine is not None
    async with engine.begin() as conn:
        if mirror.backend == "sqlite":
            await conn.exec_driver_sql(_SQLITE_TRIGGER)
        else:
            for statement in _PG_TRIGGER.format(code=sqlstate).split("$$; "):
                await conn.exec_driver_sql(statement if statement.endswith(")") else statement + "$$")


async def test_a_batch_the_database_refuses_writes_nothing(mirror: MirrorSink) -> None:
    before = host(1, 5)
    await mirror.apply([before])
    await refuse_key_boom(mirror)
    # Rows are written in key order, so "1" and "a" are already in the statement when "boom" fails.
    batch = [host(1, 6, "update"), ev("host", "a", "create", 6), ev("host", "boom", "create", 6),
             ev("host", "c", "create", 6)]
    with pytest.raises(SinkRejected) as caught:
        await mirror.apply(batch)
    assert caught.value.event_ids == ()  # a whole batch refused: the consumer isolates the culprit
    assert caught.value.fields()["sink"] == "mirror"
    assert state(await mirror.objects("host", include_deleted=True)) == {"1": ((5, 0), False, before.data,
                                                                               before.id)}
    # One by one, as the consumer does: only the culprit is named, the others apply.
    for event in batch:
        if event.key == "boom":
            with pytest.raises(SinkRejected) as single:
                await mirror.apply([event])
            assert single.value.event_ids == (event.id,)
        else:
            await mirror.apply([event])
    assert sorted(await mirror.objects("host")) == ["1", "a", "c"]


@pytest.mark.parametrize("bad", [{"n": 2**70}, {"s": {1, 2}}], ids=["int-too-large", "not-json"])
async def test_data_that_cannot_be_stored_is_rejected(mirror: MirrorSink, bad: dict[str, Any]) -> None:
    culprit = ev("host", "2", "create", 7, bad)
    with pytest.raises(SinkRejected) as caught:
        await mirror.apply([host(1, 7), culprit])
    assert caught.value.event_ids == ()
    with pytest.raises(SinkRejected) as single:
        await mirror.apply([culprit])
    assert single.value.event_ids == (culprit.id,)
    assert await mirror.objects("host", include_deleted=True) == {}


async def test_a_version_beyond_64_bits_is_rejected(mirror: MirrorSink) -> None:
    culprit = ev("host", "1", "create", (2**64, 0))
    with pytest.raises(SinkRejected) as caught:
        await mirror.apply([culprit])
    assert caught.value.event_ids == (culprit.id,)


@pytest.mark.postgres
async def test_postgres_transient_failure_mid_batch_is_unavailable_and_writes_nothing(pg_url: str) -> None:
    async with MirrorSink("mirror", settings_for(pg_url)) as mirror:
        await refuse_key_boom(mirror, sqlstate="40001")  # serialization_failure: worth a retry
        with pytest.raises(SinkUnavailable):
            await mirror.apply([ev("host", "a", "create", 1), ev("host", "boom", "create", 1)])
        assert await mirror.objects("host", include_deleted=True) == {}


@pytest.mark.postgres
async def test_postgres_refuses_nul_characters_for_good(pg_url: str) -> None:
    async with MirrorSink("mirror", settings_for(pg_url)) as mirror:
        for event in (ev("host", "1", "create", 1, {"x": "a\u0000b"}), ev("host", "a\x00b", "create", 1)):
            with pytest.raises(SinkRejected):
                await mirror.apply([event])


async def test_a_closed_or_unopened_sink_is_unavailable(db_url: str) -> None:
    mirror = MirrorSink("mirror", settings_for(db_url))
    for call in (mirror.apply([host(1, 1)]), mirror.topology(), mirror.objects("host")):
        with pytest.raises(SinkUnavailable, match="not open"):
            await call
    await mirror.open()
    await mirror.apply([host(1, 1)])
    await mirror.close()
    with pytest.raises(SinkUnavailable):
        await mirror.apply([host(1, 2)])
    await mirror.close()  # twice is harmless


async def test_an_unreachable_postgres_is_unavailable() -> None:
    mirror = MirrorSink("mirror", settings_for(unreachable_pg_url()), timeout=5)
    with pytest.raises(SinkUnavailable) as caught:
        await mirror.open()
    assert isinstance(caught.value, TransientError)
    assert caught.value.fields()["operation"] == "open"


@pytest.mark.postgres
async def test_postgres_connections_dropped_under_the_sink(pg_url: str) -> None:
    async with MirrorSink("mirror", settings_for(pg_url)) as mirror:
        await mirror.apply([host(1, 1)])
        admin = await asyncpg.connect(pg_url)
        try:
            await admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                                "WHERE datname = current_database() AND pid <> pg_backend_pid()")
        finally:
            await admin.close()
        # The pooled connection is dead: that apply fails as transient (or the pool notices first), and the
        # consumer's retry goes through on a new connection.
        try:
            await mirror.apply([host(1, 2, "update")])
        except SinkUnavailable:
            await mirror.apply([host(1, 2, "update")])
        assert (await mirror.objects("host"))["1"].version == (2, 0)


# --- sweep: what a resync's snapshot no longer had ends as a delete ------------------------------------------


def snapshot_row(event: Event, resync_id: str) -> Event:
    """The object as resync ``resync_id``'s snapshot lists it: origin resync, no cursor, the resync's row id."""
    return event.model_copy(update={"origin": "resync", "cursor": None, "action": "update",
                                    "id": resync_event_id(event.resource, event.key, event.version,
                                                          resync_id=resync_id)})


def mark(resource: str, version: tuple[int, int] | int, scope: dict[str, list[Any]] | None = None,
         tenant: str = "0", resync_id: str = "r1") -> ResyncMark:
    version = (version, 0) if isinstance(version, int) else version
    return ResyncMark(id=resync_event_id(resource, f"mark:{resync_id}", version), resource=resource, tenant=tenant,
                      version=version, resync_id=resync_id, scope=scope, listed=0,
                      started_at="2024-11-19T00:00:00Z", observed_at="2024-11-19T00:00:02Z")


async def test_sweep_tombstones_older_rows_and_keeps_newer_and_its_own(mirror: MirrorSink) -> None:
    old, newer = host(1, 10), host(3, 30, bk_host_name="live-after-head")
    listed = snapshot_row(host(2, 20), "r1")  # this resync's own row, at its head's version
    await mirror.apply([old, listed, newer])
    end = mark("host", 20)
    assert await mirror.sweep(end) == 1
    assert state(await mirror.objects("host", include_deleted=True)) == {
        # The tombstone keeps the document, at the mark's version and with the mark's id.
        "1": ((20, 0), True, old.data, end.id),
        "2": ((20, 0), False, listed.data, listed.id),
        "3": ((30, 0), False, newer.data, newer.id),
    }


async def test_a_row_at_the_heads_version_that_this_snapshot_did_not_write_is_swept(mirror: MirrorSink) -> None:
    # The head's own event (a watch event at exactly V), and an earlier resync's row at the same head: the listing
    # was taken after V and did not show them, so CMDB deleted them since (silently, if no event says so).
    head_event, earlier = host(1, 20), snapshot_row(host(2, 20), "r0")
    await mirror.apply([head_event, earlier, snapshot_row(host(3, 20), "r1")])
    assert await mirror.sweep(mark("host", 20, resync_id="r1")) == 2
    assert {k: o.deleted for k, o in (await mirror.objects("host", include_deleted=True)).items()} == {
        "1": True, "2": True, "3": False}


async def test_sweep_compares_the_increment_too(mirror: MirrorSink) -> None:
    await mirror.apply([ev("biz", "1", "create", (100, 1)), snapshot_row(ev("biz", "2", "create", (100, 2)), "r1"),
                        ev("biz", "3", "create", (100, 3)), ev("biz", "4", "create", (99, 9))])
    assert await mirror.sweep(mark("biz", (100, 2))) == 2
    assert {k: (o.version, o.deleted) for k, o in (await mirror.objects("biz", include_deleted=True)).items()} == {
        "1": ((100, 2), True), "2": ((100, 2), False), "3": ((100, 3), False), "4": ((100, 2), True)}


async def test_sweep_honours_the_scope(mirror: MirrorSink) -> None:
    rows = [relation(1, 10, 100, 1, 5), relation(2, 20, 200, 2, 5), relation(3, 30, 300, 1, 5),
            ev("host_relation", "9:90", "create", 5, {"bk_host_id": 9})]  # no bk_biz_id: not in any listed biz
    await mirror.apply(rows)
    end = mark("host_relation", 10, scope={"bk_biz_id": [1]})
    assert await mirror.sweep(end) == 2
    got = await mirror.objects("host_relation", include_deleted=True)
    assert {k: o.deleted for k, o in got.items()} == {"1:10": True, "2:20": False, "3:30": True, "9:90": False}
    assert got["2:20"].version == (5, 0) and got["9:90"].version == (5, 0)
    # Several fields: every one must match.
    both = mark("host_relation", 10, scope={"bk_biz_id": [2, 3], "bk_set_id": [200]}, resync_id="r2")
    await mirror.apply([relation(4, 40, 400, 2, 5)])
    assert await mirror.sweep(both) == 1
    assert (await mirror.objects("host_relation"))["4:40"].deleted is False
    assert "2:20" not in await mirror.objects("host_relation")
    # An empty value list covers nothing.
    assert await mirror.sweep(mark("host_relation", 10, scope={"bk_biz_id": []}, resync_id="r3")) == 0


async def test_sweep_leaves_other_resources_tenants_and_tombstones_alone(mirror: MirrorSink) -> None:
    deleted = host(3, 8, "delete")
    others = [named("module", 1, 5), named("set", 1, 5), host(1, 5, tenant="t2")]
    await mirror.apply([host(1, 5), host(2, 6), deleted, *others])
    before_others = {(r, t): state(await mirror.objects(r, t, include_deleted=True))
                     for r, t in (("module", "0"), ("set", "0"), ("host", "t2"))}
    assert await mirror.sweep(mark("host", 50)) == 2
    after_others = {(r, t): state(await mirror.objects(r, t, include_deleted=True))
                    for r, t in (("module", "0"), ("set", "0"), ("host", "t2"))}
    assert after_others == before_others
    # The tombstone already there keeps its version and id: it is not swept again.
    assert state(await mirror.objects("host", include_deleted=True))["3"] == ((8, 0), True, deleted.data, deleted.id)
    assert await mirror.objects("host") == {}
    # The other tenant is swept by its own mark only.
    assert await mirror.sweep(mark("host", 50, tenant="t2")) == 1
    assert await mirror.objects("host", "t2") == {}


async def test_a_second_sweep_sweeps_nothing(mirror: MirrorSink) -> None:
    await mirror.apply([host(1, 5), host(2, 6), host(3, 60)])
    end = mark("host", 50)
    assert await mirror.sweep(end) == 2
    first = state(await mirror.objects("host", include_deleted=True))
    assert await mirror.sweep(end) == 0  # a redelivered mark
    assert state(await mirror.objects("host", include_deleted=True)) == first
    assert await mirror.sweep(mark("host", 40, resync_id="older")) == 0  # an older resync's mark, late
    assert state(await mirror.objects("host", include_deleted=True)) == first


async def test_a_swept_row_is_not_resurrected_by_an_older_event(mirror: MirrorSink) -> None:
    await mirror.apply([host(1, 5)])
    end = mark("host", 50)
    await mirror.sweep(end)
    # A replay of an event from before the snapshot's head: the tombstone's version fences it out.
    await mirror.apply([host(1, 49, "update", bk_host_name="stale")])
    await mirror.apply([host(1, 50, "update", bk_host_name="same head")])
    row = (await mirror.objects("host", include_deleted=True))["1"]
    assert (row.version, row.deleted, row.event_id) == ((50, 0), True, end.id)
    # A change after the head does bring it back.
    revived = host(1, 51, bk_host_name="recreated")
    await mirror.apply([revived])
    assert state(await mirror.objects("host")) == {"1": ((51, 0), False, revived.data, revived.id)}


async def test_sweep_of_an_empty_mirror_is_zero(mirror: MirrorSink) -> None:
    assert await mirror.sweep(mark("host", 50)) == 0
    assert await mirror.objects("host", include_deleted=True) == {}


async def test_sweep_returns_the_number_swept_beyond_one_chunk(mirror: MirrorSink) -> None:
    # 1 203 in-scope older rows, interleaved with out-of-scope and newer ones: three UPDATE chunks of keys.
    events = []
    for i in range(1800):
        biz = 2 if i % 3 == 2 else 1
        version = 90 if i % 7 == 0 else 10
        events.append(ev("host_relation", f"{i:05d}", "create", version, {"bk_biz_id": biz, "i": i}))
    for start in range(0, len(events), 400):
        await mirror.apply(events[start:start + 400])
    expected = {e.key for e in events if e.data["bk_biz_id"] == 1 and e.version == (10, 0)}
    assert len(expected) > 1000
    end = mark("host_relation", 50, scope={"bk_biz_id": [1]})
    assert await mirror.sweep(end) == len(expected)
    got = await mirror.objects("host_relation", include_deleted=True)
    assert {k for k, o in got.items() if o.deleted} == expected
    assert all(got[k].version == (50, 0) and got[k].event_id == end.id for k in expected)
    assert all(o.version in ((10, 0), (90, 0)) and not o.deleted for k, o in got.items() if k not in expected)
    assert await mirror.sweep(end) == 0


async def test_sweep_notifies_listeners_only_when_it_swept(mirror: MirrorSink) -> None:
    calls: list[int] = []
    await mirror.apply([host(1, 5)])
    mirror.add_listener(lambda: calls.append(1))
    assert await mirror.sweep(mark("host", 3)) == 0
    assert calls == []
    assert await mirror.sweep(mark("host", 50)) == 1
    assert calls == [1]


async def test_sweep_needs_an_open_sink(db_url: str) -> None:
    mirror = MirrorSink("mirror", settings_for(db_url))
    with pytest.raises(SinkUnavailable, match="not open"):
        await mirror.sweep(mark("host", 50))


# --- the topology view ------------------------------------------------------------------------------------


async def test_a_relation_before_its_host_and_module_still_shows(mirror: MirrorSink) -> None:
    await mirror.apply([relation(1, 10, 100, 1000, 5)])
    assert await mirror.topology() == [TopologyRow("0", 1000, None, 100, None, 10, None, 1, None, None, None)]
    await mirror.apply([host(1, 3)])
    await mirror.apply([named("module", 10, 3), named("set", 100, 3), named("biz", 1000, 3)])
    full = TopologyRow("0", 1000, "biz-1000", 100, "set-100", 10, "module-10", 1, "10.0.0.1", 0, "host-1")
    assert await mirror.topology() == [full]
    await mirror.apply([host(1, 6, "delete")])  # a deleted host's columns go, its relation stays
    assert await mirror.topology() == [TopologyRow("0", 1000, "biz-1000", 100, "set-100", 10, "module-10", 1,
                                                   None, None, None)]
    await mirror.apply([relation(1, 10, 100, 1000, 7, "delete")])
    assert await mirror.topology() == []


async def test_topology_by_tenant(mirror: MirrorSink) -> None:
    await mirror.apply([relation(1, 10, 100, 1000, 5, tenant="0"), relation(1, 10, 100, 1000, 5, tenant="t2")])
    await mirror.apply([host(1, 5, tenant="t2")])
    assert [r.tenant for r in await mirror.topology()] == ["0", "t2"]
    (only,) = await mirror.topology("t2")
    assert (only.tenant, only.bk_host_name) == ("t2", "host-1")


def hand_join(live: dict[tuple[str, str, str], dict[str, Any]]) -> list[TopologyRow]:
    """The view's meaning, computed in Python over the live rows."""
    rows = []
    for (tenant, resource, _), rel in live.items():
        if resource != "host_relation":
            continue
        h = live.get((tenant, "host", str(rel["bk_host_id"])), {})
        m = live.get((tenant, "module", str(rel["bk_module_id"])), {})
        s = live.get((tenant, "set", str(rel["bk_set_id"])), {})
        b = live.get((tenant, "biz", str(rel["bk_biz_id"])), {})
        rows.append(TopologyRow(tenant, rel["bk_biz_id"], b.get("bk_biz_name"), rel["bk_set_id"],
                                s.get("bk_set_name"), rel["bk_module_id"], m.get("bk_module_name"),
                                rel["bk_host_id"], h.get("bk_host_innerip"), h.get("bk_cloud_id"),
                                h.get("bk_host_name")))
    return sorted(rows, key=lambda r: (r.tenant, r.bk_module_id, r.bk_host_id))


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_the_view_is_the_join_of_the_live_rows(mirror: MirrorSink, seed: int) -> None:
    rnd = random.Random(seed)
    events: list[Event] = []
    v = 1
    for tenant in ("0", "t2"):
        for b in range(1, 4):
            events.append(named("biz", b, v := v + 1, tenant=tenant))
            for s in range(b * 10, b * 10 + 3):
                events.append(named("set", s, v := v + 1, tenant=tenant, bk_biz_id=b))
                for m in range(s * 10, s * 10 + 3):
                    events.append(named("module", m, v := v + 1, tenant=tenant, bk_set_id=s, bk_biz_id=b))
        for h in range(1, 40):
            events.append(host(h, v := v + 1, tenant=tenant, bk_cloud_id=rnd.choice([0, 2, 3_000_000_000])))
            b = rnd.randint(1, 3)
            s = rnd.randint(b * 10, b * 10 + 2)
            for m in rnd.sample(range(s * 10, s * 10 + 3), rnd.randint(1, 2)):
                events.append(relation(h, m, s, b, v := v + 1, tenant=tenant))
    # Some objects never arrive, some are deleted, some relations point at nothing; arrival order is random.
    events = [e for e in events if rnd.random() > 0.1]
    deletes = [ev(e.resource, e.key, "delete", e.version[0] + 10_000, e.data, e.tenant)
               for e in rnd.sample(events, len(events) // 8)]
    stream = events + deletes
    rnd.shuffle(stream)
    by_resource: dict[str, list[Event]] = {}
    for e in stream:
        by_resource.setdefault(e.resource, []).append(e)
    await asyncio.gather(*(mirror.apply(batch) for batch in by_resource.values()))  # concurrent consumers
    newest: dict[tuple[str, str, str], Event] = {}
    for e in stream:
        ident = (e.tenant, e.resource, e.key)
        if ident not in newest or e.version > newest[ident].version:
            newest[ident] = e
    live = {ident: e.data for ident, e in newest.items() if e.action != "delete"}
    expected = hand_join(live)
    assert len(expected) > 50
    assert await mirror.topology() == expected


async def test_open_replaces_a_view_whose_definition_changed(db_url: str) -> None:
    async with MirrorSink("mirror", settings_for(db_url)) as mirror:
        await mirror.apply([relation(1, 10, 100, 1000, 5)])
        engine = mirror._engine
        assert engine is not None
        async with engine.begin() as conn:  # an older rwatch's view
            await conn.exec_driver_sql(f"DROP VIEW {TOPOLOGY_VIEW}")
            await conn.exec_driver_sql(f"CREATE VIEW {TOPOLOGY_VIEW} AS SELECT tenant FROM rwatch_objects")
    async with MirrorSink("mirror", settings_for(db_url)) as reopened:
        assert [r.bk_host_id for r in await reopened.topology()] == [1]
        assert len(await reopened.objects("host_relation")) == 1  # the data survived


async def test_concurrent_opens_of_one_database(db_url: str) -> None:
    sinks = [MirrorSink(f"m{i}", settings_for(db_url)) for i in range(4)]
    try:
        await asyncio.gather(*(s.open() for s in sinks))
        await asyncio.gather(*(s.apply([host(i, 1)]) for i, s in enumerate(sinks)))
        assert sorted(await sinks[0].objects("host")) == ["0", "1", "2", "3"]
    finally:
        await asyncio.gather(*(s.close() for s in sinks))


# --- property: redelivery, replay and batching never change the outcome -----------------------------------

_KEYS = ["1", "2", "3"]


@st.composite
def streams(draw: st.DrawFn) -> tuple[list[Event], list[list[Event]]]:
    """A clean stream for a few keys (versions increasing), and a noisy delivery of it: duplicates, replays of
    older events, whole batches redelivered, and batches cut at random places."""
    steps = draw(st.lists(st.tuples(st.sampled_from(_KEYS), st.sampled_from(["create", "update", "delete"]),
                                    st.integers(0, 3)), min_size=1, max_size=25))
    clean: list[Event] = []
    sec, inc = 1_700_000_000, 0
    for key, action, value in steps:
        if draw(st.booleans()):
            sec, inc = sec + draw(st.integers(1, 5)), 0
        else:
            inc += 1
        clean.append(ev("host", key, action, (sec, inc), {"bk_host_id": int(key), "value": value}))
    noisy: list[Event] = []
    for i, event in enumerate(clean):
        noisy.append(event)
        if draw(st.integers(0, 4)) == 0:
            noisy.append(event)  # duplicate
        if draw(st.integers(0, 4)) == 0:
            noisy.append(clean[draw(st.integers(0, i))])  # replay of an older event
    cuts = sorted(draw(st.sets(st.integers(1, max(1, len(noisy) - 1)), max_size=len(noisy))))
    batches = [noisy[a:b] for a, b in zip([0, *cuts], [*cuts, len(noisy)], strict=True) if noisy[a:b]]
    delivered: list[list[Event]] = []
    for i, batch in enumerate(batches):
        delivered.append(batch)
        if draw(st.integers(0, 3)) == 0:
            delivered.append(batches[draw(st.integers(0, i))])  # a whole batch redelivered
    return clean, delivered


def with_tenant(events: list[Event], tenant: str) -> list[Event]:
    return [e.model_copy(update={"tenant": tenant}) for e in events]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=streams())
async def test_any_delivery_of_a_stream_ends_in_the_same_table(mirror: MirrorSink,
                                                              case: tuple[list[Event], list[list[Event]]]) -> None:
    clean, delivered = case
    # One database for all examples: each example writes under tenants of its own.
    tenant = uuid.uuid4().hex[:8]
    for event in with_tenant(clean, f"clean-{tenant}"):
        await mirror.apply([event])
    for batch in delivered:
        await mirror.apply(with_tenant(batch, f"noisy-{tenant}"))
    got_clean = state(await mirror.objects("host", f"clean-{tenant}", include_deleted=True))
    got_noisy = state(await mirror.objects("host", f"noisy-{tenant}", include_deleted=True))
    assert got_noisy == got_clean
    newest: dict[str, Event] = {}
    for event in clean:
        newest[event.key] = event  # versions increase along the clean stream
    assert got_clean == {k: (e.version, e.action == "delete", e.data, e.id) for k, e in newest.items()}


# --- SQLite only ------------------------------------------------------------------------------------------


async def test_sqlite_runs_wal_and_full_sync_on_every_connection(tmp_path: Path) -> None:
    async with MirrorSink("mirror", settings_for(f"sqlite:///{tmp_path}/m.db"), timeout=3) as mirror:
        assert mirror._engine is not None
        await assert_sqlite_pragmas(mirror._engine, 3000)


async def test_sqlite_in_memory_works_for_demos() -> None:
    async with MirrorSink("mirror", settings_for("sqlite://")) as mirror:
        await asyncio.gather(*(mirror.apply([host(i, 1), relation(i, 10, 100, 1000, 1)]) for i in range(10)),
                             *(mirror.topology() for _ in range(10)))
        assert len(await mirror.topology()) == 10


async def test_sqlite_lock_held_past_the_timeout_is_unavailable(tmp_path: Path) -> None:
    path = tmp_path / "m.db"
    async with MirrorSink("mirror", settings_for(f"sqlite:///{path}"), timeout=0.1) as mirror:
        await mirror.apply([host(1, 1)])
        other = sqlite3.connect(path, isolation_level=None)
        try:
            other.execute("BEGIN IMMEDIATE")
            assert len(await mirror.objects("host")) == 1  # WAL: reading is not blocked
            with pytest.raises(SinkUnavailable, match="locked") as caught:
                await mirror.apply([host(1, 2, "update")])
            assert caught.value.fields()["operation"] == "apply"
        finally:
            other.execute("ROLLBACK")
            other.close()
        await mirror.apply([host(1, 2, "update")])  # transient: the retry succeeds
        assert (await mirror.objects("host"))["1"].version == (2, 0)


@pytest.mark.parametrize("call", ["apply", "sweep"])
async def test_a_write_whose_caller_is_cancelled_runs_to_its_end_and_leaves_no_lock(tmp_path: Path, call: str) -> None:
    """A lost broker connection cancels the consumers mid-apply. The caller gets its CancelledError at once; the
    transaction still finishes (here held behind another writer's lock), its connection returns clean, ``close``
    waits for it, and the next writer is not blocked. Torn down mid-transaction instead, the aiosqlite connection
    kept SQLite's write lock until the process ended, and every later apply was "database is locked" (the
    chaos suite's seed 22)."""
    path = tmp_path / "m.db"
    mirror = MirrorSink("mirror", settings_for(f"sqlite:///{path}"), timeout=5.0)
    await mirror.open()
    await mirror.apply([host(1, 1)])
    blocker = sqlite3.connect(path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")  # another writer holds the lock: the write waits in busy_timeout
    write = asyncio.ensure_future(mirror.apply([host(2, 2)]) if call == "apply" else mirror.sweep(mark("host", 5)))
    await asyncio.sleep(0.2)
    write.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(write, 1.0)  # the caller is not held by the transaction
    blocker.execute("COMMIT")
    blocker.close()
    await mirror.close()  # waits for the write still running
    async with MirrorSink("mirror", settings_for(f"sqlite:///{path}"), timeout=0.5) as other:
        rows = await other.objects("host", include_deleted=True)
        if call == "apply":
            assert set(rows) == {"1", "2"}  # the cancelled apply did commit
        else:
            assert rows["1"].deleted  # the cancelled sweep did commit
        await other.apply([host(3, 3)])  # and left no lock behind
        assert "3" in await other.objects("host")


async def test_sqlite_open_while_another_process_holds_the_lock(tmp_path: Path) -> None:
    path = tmp_path / "m.db"
    async with MirrorSink("mirror", settings_for(f"sqlite:///{path}")):
        pass
    other = sqlite3.connect(path, isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")
        mirror = MirrorSink("mirror", settings_for(f"sqlite:///{path}"), timeout=0.1)
        with pytest.raises(SinkUnavailable) as caught:
            await mirror.open()
        assert caught.value.fields()["operation"] == "open"
    finally:
        other.execute("ROLLBACK")
        other.close()
    async with mirror:
        assert await mirror.topology() == []


# --- URLs ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "backend"),
    [("sqlite:///m.db", "sqlite"), ("sqlite+aiosqlite:///m.db", "sqlite"), ("postgresql://u@h/db", "postgresql"),
     ("postgres://u@h/db", "postgresql"), ("postgresql+asyncpg://u@h/db", "postgresql")],
)
def test_the_backend_comes_from_the_url(url: str, backend: str) -> None:
    assert MirrorSink("mirror", settings_for(url)).backend == backend


@pytest.mark.parametrize("url", ["mysql://u@h/db", "postgresql+psycopg2://u@h/db", "not a url"])
def test_other_urls_are_config_errors(url: str) -> None:
    with pytest.raises(ConfigError):
        MirrorSink("mirror", settings_for(url))


def test_the_password_never_shows() -> None:
    mirror = MirrorSink("mirror", settings_for("postgresql://rw:hunter2@db/rwatch"))
    assert "hunter2" not in repr(mirror)


# --- version ties (issue 12): a snapshot row wins one, a watch event does not; a batch keeps stream order ---


def listed(event: Event) -> Event:
    """The same object as a resync's snapshot row: origin resync, no cursor."""
    return snapshot_row(event, "r-listed")


async def test_a_snapshot_row_wins_a_version_tie_so_a_repair_repairs(mirror: MirrorSink) -> None:
    # The mirror holds the object at the head's version, but with other data (a lost event, a manual edit):
    # the repair's snapshot row, read after that head, is the truth.
    await mirror.apply([host(1, 50, bk_host_name="drifted")])
    repair = listed(host(1, 50, "update", bk_host_name="as in CMDB"))
    await mirror.apply([repair])
    assert state(await mirror.objects("host")) == {"1": ((50, 0), False, repair.data, repair.id)}
    # A watch event of that version does not win it (it could be a replay of what the snapshot already shows).
    await mirror.apply([host(1, 50, "update", bk_host_name="replayed")])
    assert (await mirror.objects("host"))["1"].data == repair.data


async def test_a_later_resync_at_the_same_head_brings_back_what_a_wrong_sweep_tombstoned(mirror: MirrorSink) -> None:
    await mirror.apply([host(1, 10), host(2, 10)])
    await mirror.sweep(mark("host", 50))  # a listing that wrongly showed nothing: both tombstoned at 50
    assert await mirror.objects("host") == {}
    # Nothing changed in CMDB since: the next resync has the same head, and its rows must bring them back.
    back = [listed(host(1, 50, "update")), listed(host(2, 50, "update"))]
    await mirror.apply(back)
    assert state(await mirror.objects("host")) == {e.key: ((50, 0), False, e.data, e.id) for e in back}
    # While an older snapshot row, or an older watch event, still changes nothing.
    await mirror.apply([listed(host(1, 49, "update", bk_host_name="older")), host(2, 49, "delete")])
    assert state(await mirror.objects("host")) == {e.key: ((50, 0), False, e.data, e.id) for e in back}


async def test_events_of_one_batch_sharing_a_version_apply_in_stream_order(mirror: MirrorSink) -> None:
    first, later = host(1, 30, bk_host_name="first"), host(1, 30, "update", bk_host_name="later")
    await mirror.apply([first, later])
    assert (await mirror.objects("host"))["1"].data == later.data
    gone = host(2, 40, "delete")
    await mirror.apply([host(2, 40, bk_host_name="x"), gone])
    assert state(await mirror.objects("host", include_deleted=True))["2"] == ((40, 0), True, gone.data, gone.id)


async def test_a_redelivered_snapshot_row_rewrites_nothing(mirror: MirrorSink) -> None:
    row = snapshot_row(host(1, 50), "r1")
    await mirror.apply([row])
    before = (await mirror.objects("host"))["1"]
    await mirror.apply([row])  # the same row again (at-least-once): a tie with itself is not a tie to win
    assert (await mirror.objects("host"))["1"] == before  # not even updated_at moved


async def test_in_one_batch_a_snapshot_row_beats_the_heads_own_event_so_its_sweep_keeps_it(mirror: MirrorSink) -> None:
    """The chaos suite's find (seeds 12 and 29): the head's event (a create at V) and the resync's row of the same
    object at V arrived in one batch, the watch event last; the batch kept it, and the resync's mark then swept
    an object CMDB had, because no row of its own snapshot was there."""
    created = host(7, 50)  # the head's own event, at the head's version
    row = snapshot_row(host(7, 50), "r1")
    await mirror.apply([row, created])
    assert (await mirror.objects("host"))["7"].event_id == row.id
    assert await mirror.sweep(mark("host", 50, resync_id="r1")) == 0
    assert "7" in await mirror.objects("host")
