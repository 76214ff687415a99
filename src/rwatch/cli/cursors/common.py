"""What the ``rwatch cursors`` commands share: the store, a step's errors as exit codes, times for people."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import sys
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer

from rwatch.errors import ConfigError, LeaseLost, StoreError

if TYPE_CHECKING:
    from rwatch.config import Config
    from rwatch.store.backends import SqlCursorStore

T = TypeVar("T")

JsonOption = Annotated[bool, typer.Option("--json", help="print a JSON document instead of text")]


class Usage(Exception):
    """Bad usage: the message goes to stderr and the command exits 2."""


@contextlib.contextmanager
def _cli_logging(cfg: Config) -> Iterator[None]:
    """Library logs (the store's ``store_opened``...) on stderr, warnings and up: stdout is the report's. The
    root logger's handlers come back afterwards, for callers that run the command in-process."""
    from rwatch.logs import setup_logging

    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    setup_logging("error" if cfg.log.level == "error" else "warning", cfg.log.format, sys.stderr)
    try:
        yield
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)


def run_step(cfg: Config, make: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run one async step; its errors become an exit code with one line on stderr."""
    try:
        with _cli_logging(cfg):
            return asyncio.run(make())
    except Usage as exc:
        typer.echo(f"rwatch cursors: {exc}", err=True)
        raise typer.Exit(2) from None
    except ConfigError as exc:
        typer.echo(f"rwatch cursors: bad configuration: {exc}", err=True)
        raise typer.Exit(2) from None
    except LeaseLost as exc:  # our own lease taken over between acquire and save: clocks far apart
        typer.echo(f"rwatch cursors: {exc}", err=True)
        raise typer.Exit(1) from None
    except (StoreError, TimeoutError, OSError) as exc:
        from rwatch.config import mask_url

        what = str(exc) if str(exc) else type(exc).__name__
        typer.echo(f"rwatch cursors: the cursor store {mask_url(cfg.store.url.get_secret_value())} "
                   f"cannot be used: {what}", err=True)
        raise typer.Exit(1) from None


def _no_store(cfg: Config) -> bool:
    """Whether the store is a SQLite file that does not exist yet: nothing is saved, and reading must not
    leave an empty database behind (a mistyped path would then look like a store with nothing in it)."""
    from rwatch.store.backends import SqliteCursorStore
    from rwatch.store.base import open_store

    store = open_store(cfg.store.url.get_secret_value())
    return isinstance(store, SqliteCursorStore) and bool(store.path) and not Path(str(store.path)).exists()


@contextlib.asynccontextmanager
async def cursor_store(cfg: Config, *, create: bool) -> AsyncIterator[SqlCursorStore | None]:
    """The opened store; None without ``create`` when the SQLite file does not exist (``_no_store``)."""
    from rwatch.store.base import open_store

    if not create and await asyncio.to_thread(_no_store, cfg):
        yield None
        return
    store = open_store(cfg.store.url.get_secret_value())
    await store.open()
    try:
        yield store
    finally:
        await store.close()


def iso(seconds: float | None) -> str | None:
    if seconds is None:
        return None
    from rwatch.events import iso_utc

    return iso_utc(seconds)


def span(seconds: float) -> str:
    """A duration for people: ``42s``, ``12m05s``, ``3h05m``, ``2d04h``."""
    s = round(abs(seconds))
    sign = "-" if seconds < 0 and s else ""
    if s < 60:
        return f"{sign}{s}s"
    if s < 3600:
        return f"{sign}{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{sign}{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{sign}{s // 86400}d{s % 86400 // 3600:02d}h"


def second(seconds: float | None) -> str:
    """ISO-8601 UTC to the second, for the table (the JSON keeps the fractions)."""
    return iso(math.floor(seconds)) or "-" if seconds is not None else "-"
