"""The store's fixtures: ``store`` is one opened store per backend (``db_url`` is SQLite and PostgreSQL)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from rwatch.store.backends import SqlCursorStore
from rwatch.store.base import open_store


@pytest.fixture
async def store(db_url: str) -> AsyncIterator[SqlCursorStore]:
    async with open_store(db_url) as opened:
        yield opened
