"""The jsonl sink: each event appended as one JSON line (``Event.to_json``) to a file, or to stdout for ``-``.

Durability: a batch is written with one ``write`` on an unbuffered descriptor opened ``O_APPEND``, then
``fsync``, before ``apply`` returns, so the consumer acknowledges only what is on disk. The blocking calls
run in a thread (``asyncio.to_thread``); the event loop never waits on the disk. If a write fails halfway
(disk full), the file is cut back to where the batch began, so a retry never leaves a torn line behind.
This process must be the file's only writer.

Rotation (``max_bytes`` > 0 and ``backups`` > 0), as ``logging.handlers.RotatingFileHandler`` does it: when
appending a batch would take the file past ``max_bytes``, ``path.{n}`` becomes ``path.{n+1}`` (the oldest,
``path.{backups}``, is dropped), ``path`` becomes ``path.1`` and the batch starts a new ``path``. A batch is
never split across two files, so a single batch larger than ``max_bytes`` makes a file that large. With
``backups = 0`` the file is never rotated (rotating would delete events nobody may have read yet); with
``max_bytes = 0`` neither. A file moved away by someone else (logrotate) is noticed and ``path`` reopened.

Idempotence: this is a stream sink, delivery is at-least-once, and a redelivered event is appended again.
It is not version-fenced (that would mean reading the file back): readers of the file dedupe by ``id`` and,
per ``resource``/``key``, keep the highest ``version``.

On stdout (``-``) the lines share the stream with rwatch's own JSON logs (they go to stdout too): tell them
apart by the ``schema`` field, or send the logs elsewhere. ``fsync`` applies when stdout is a regular file.

An ``OSError`` (disk full, permission, missing directory) raises ``SinkUnavailable`` naming the path; the
consumer retries the batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import stat
import sys
import threading
from collections.abc import Callable, Sequence

from rwatch.config import JsonlSinkConfig
from rwatch.errors import SinkUnavailable
from rwatch.events import Message, ResyncMark
from rwatch.logs import get_logger
from rwatch.metrics import JSONL_ROTATIONS, JSONL_WRITTEN_BYTES

STDOUT = "-"


class JsonlSink:
    """Appends batches of events as JSON lines; see the module docstring for durability and rotation."""

    def __init__(self, name: str, settings: JsonlSinkConfig) -> None:
        self.name = name
        self.settings = settings
        self.path = settings.path
        self._fd: int | None = None
        # The asyncio lock keeps applies of several consumers from queueing threads; the thread lock keeps
        # the file consistent even when an apply is cancelled while its thread still writes.
        self._lock = asyncio.Lock()
        self._file_lock = threading.Lock()
        self._log = get_logger("rwatch.sinks.jsonl", sink=name, path=self.path)

    async def open(self) -> None:
        if self.path != STDOUT:
            await self._in_thread(self._ensure_open)

    async def apply(self, events: Sequence[Message]) -> None:
        if not events:
            return
        data = b"".join(event.to_json() + b"\n" for event in events)
        write = self._write_stdout if self.path == STDOUT else self._write_file
        await self._in_thread(write, data)
        JSONL_WRITTEN_BYTES.labels(self.name).inc(len(data))

    async def sweep(self, mark: ResyncMark) -> int:
        """The mark is written as a line of its own (``"type": "resync_end"``): a reader of the file sweeps."""
        await self.apply([mark])
        return 0

    async def close(self) -> None:
        await self._in_thread(self._close_fd)

    async def _in_thread(self, func: Callable[..., object], *args: object) -> None:
        async with self._lock:
            try:
                await asyncio.to_thread(func, *args)
            except OSError as exc:
                raise SinkUnavailable(f"cannot write {self.path}: {exc.strerror or exc}", sink=self.name,
                                      path=self.path, errno=exc.errno) from exc

    # --- in the thread -----------------------------------------------------------------------------------

    def _write_file(self, data: bytes) -> None:
        with self._file_lock:
            fd = self._ensure_open_locked()
            size = os.fstat(fd).st_size
            if self._should_rotate(size, len(data)):
                self._rotate_locked()
                fd, size = self._ensure_open_locked(), 0
            try:
                _write_all(fd, data)
                os.fsync(fd)
            except OSError:
                # Cut back to before the batch so a retry appends whole lines only; then start afresh.
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, size)
                self._close_fd_locked()
                raise

    def _write_stdout(self, data: bytes) -> None:
        with self._file_lock:
            out = sys.stdout
            out.flush()  # whatever was written through the text layer goes first
            out.buffer.write(data)
            out.buffer.flush()
            try:
                fd = out.fileno()
            except (AttributeError, OSError, ValueError):
                return  # not backed by a descriptor (a test's capture): nothing to sync
            if stat.S_ISREG(os.fstat(fd).st_mode):
                os.fsync(fd)  # pipes and terminals cannot be synced; a redirected file can

    def _should_rotate(self, size: int, incoming: int) -> bool:
        limit, backups = self.settings.max_bytes, self.settings.backups
        return limit > 0 and backups > 0 and size > 0 and size + incoming > limit

    def _rotate_locked(self) -> None:
        self._close_fd_locked()
        for n in range(self.settings.backups - 1, 0, -1):
            older = f"{self.path}.{n}"
            if os.path.exists(older):
                os.replace(older, f"{self.path}.{n + 1}")  # replaces (drops) the oldest
        os.replace(self.path, f"{self.path}.1")
        JSONL_ROTATIONS.labels(self.name).inc()
        self._log.info("jsonl_rotated", backups=self.settings.backups)

    def _ensure_open(self) -> None:
        with self._file_lock:
            self._ensure_open_locked()

    def _ensure_open_locked(self) -> int:
        if self._fd is not None:
            try:
                current = os.stat(self.path)
            except FileNotFoundError:
                current = None
            opened = os.fstat(self._fd)
            if current is not None and (current.st_dev, current.st_ino) == (opened.st_dev, opened.st_ino):
                return self._fd
            self._close_fd_locked()  # moved or deleted by someone else: write to the path, not the old file
        created = not os.path.exists(self.path)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
        if created:
            _fsync_dir(self.path)  # the new name must survive a crash as well as the lines in it
        return self._fd

    def _close_fd(self) -> None:
        with self._file_lock:
            self._close_fd_locked()

    def _close_fd_locked(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            with contextlib.suppress(OSError):
                os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _fsync_dir(path: str) -> None:
    try:
        dir_fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    except OSError:
        return  # some platforms cannot open a directory; the file's own fsync still holds its contents
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)
