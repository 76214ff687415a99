"""Atomic file replacement for the projections that write a file (prom_sd's file_sd, the Ansible inventory).

A reader (Prometheus on inotify, ansible-inventory at any moment) must never see half a file: the content goes to a
temp file in the same directory, fsynced, renamed over the old one, and the directory fsynced after it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
from pathlib import Path

# Prometheus and Ansible run as another user more often than not: the file must be readable by them (mkstemp
# makes 0600).
FILE_MODE = 0o644


def replace_file(path: Path, content: bytes, *, compare: bool = False) -> bool:
    """Atomically make ``path`` hold ``content``; False when ``compare`` found it already did.

    Temp file in the same directory (os.replace is atomic only within one file system), fsynced before the
    rename and the directory fsynced after it, so a crash leaves the old file or the new one, never a mix.
    """
    if compare:
        with contextlib.suppress(OSError):
            if path.read_bytes() == content:
                return False
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(content)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return True


class ProjectedFile:
    """The file a projection keeps: ``await write(content)`` replaces it when the content changed since the last
    write (after a restart, when it differs from what is on disk); True when the file was written. Raises
    OSError, the content then counting as not written."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._written: bytes | None = None

    async def write(self, content: bytes) -> bool:
        if content == self._written:
            return False
        # Off the loop: fsyncs take a while. The first write compares with the disk, so an unchanged file is not
        # touched after a restart.
        wrote = await asyncio.to_thread(replace_file, self.path, content, compare=self._written is None)
        self._written = content
        return wrote
