"""``open_store``: the backend picked by URL, other URLs refused, no password shown, an unreachable server."""

from __future__ import annotations

import pytest

from rwatch.errors import ConfigError, StoreError
from rwatch.store.backends import PostgresCursorStore, SqlCursorStore, SqliteCursorStore
from rwatch.store.base import CursorStore, StoreUrlError, open_store
from tests.sql_helpers import unreachable_pg_url


def test_sql_store_satisfies_the_protocol() -> None:
    chosen: CursorStore = open_store("sqlite:///x.db")
    assert isinstance(chosen, SqlCursorStore)


@pytest.mark.parametrize(
    ("url", "kind", "target"),
    [
        ("sqlite:///rwatch-state.db", SqliteCursorStore, "sqlite+aiosqlite:///rwatch-state.db"),
        ("sqlite:////var/lib/rwatch/state.db", SqliteCursorStore, "sqlite+aiosqlite:////var/lib/rwatch/state.db"),
        ("sqlite+aiosqlite:///a.db", SqliteCursorStore, "sqlite+aiosqlite:///a.db"),
        ("postgresql://rw:pw@db:5433/rwatch", PostgresCursorStore, "postgresql+asyncpg://rw:pw@db:5433/rwatch"),
        ("postgres://rw@db/rwatch", PostgresCursorStore, "postgresql+asyncpg://rw@db/rwatch"),
        ("postgresql+asyncpg://rw@db/rwatch", PostgresCursorStore, "postgresql+asyncpg://rw@db/rwatch"),
    ],
)
def test_open_store_picks_the_backend_by_scheme(url: str, kind: type[SqlCursorStore], target: str) -> None:
    chosen = open_store(url)
    assert type(chosen) is kind
    assert chosen.url.render_as_string(hide_password=False) == target


@pytest.mark.parametrize(
    "url", ["mysql://u@h/db", "postgresql+psycopg2://u@h/db", "sqlite+pysqlite:///a.db", "", "not a url"]
)
def test_open_store_rejects_other_schemes(url: str) -> None:
    with pytest.raises(StoreUrlError) as caught:
        open_store(url)
    assert isinstance(caught.value, ValueError)
    assert isinstance(caught.value, ConfigError)
    assert caught.value.key == "store.url"


def test_the_password_never_shows() -> None:
    chosen = open_store("postgresql://rw:hunter2@db/rwatch")
    assert "hunter2" not in repr(chosen)


async def test_an_unreachable_postgres_raises_store_error() -> None:
    store = open_store(unreachable_pg_url(), timeout=5)
    with pytest.raises(StoreError) as caught:
        await store.open()
    assert caught.value.fields()["operation"] == "open"
    with pytest.raises(StoreError):
        await store.ping()
