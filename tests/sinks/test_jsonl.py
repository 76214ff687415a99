"""JSONL sink: lines that parse back to the events, durable batches, rotation, stdout, and disk errors."""

from __future__ import annotations

import asyncio
import errno
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from rwatch.config import JsonlSinkConfig
from rwatch.errors import SinkUnavailable
from rwatch.events import Event, ResyncMark, iso_utc, parse_message, resync_event_id, watch_event_id
from rwatch.sinks.jsonl import JsonlSink


def event(i: int, key: str = "1", resource: str = "host") -> Event:
    cursor = f"cursor-{i:06d}"  # fixed width: every line has the same length, so rotation sizes are exact
    return Event(id=watch_event_id(resource, cursor), resource=resource, action="update", key=key,
                 version=(1_700_000_000 + i, 0), occurred_at=iso_utc(1_700_000_000 + i),
                 observed_at=iso_utc(1_700_000_000 + i), cursor=cursor, data={"n": f"{i:06d}", "name": "主机"})


def batch(n: int, size: int = 2) -> list[Event]:
    return [event(n * 100 + j) for j in range(size)]


LINE = len(event(0).to_json()) + 1


def read(path: Path) -> list[Event]:
    return [Event.from_json(line) for line in path.read_bytes().splitlines()]


MakeSink = Callable[..., Awaitable[JsonlSink]]


@pytest.fixture
async def make_sink() -> AsyncIterator[MakeSink]:
    made: list[JsonlSink] = []

    async def make(path: str | Path, **kwargs: Any) -> JsonlSink:
        sink = JsonlSink("lines", JsonlSinkConfig(kind="jsonl", path=str(path), **kwargs))
        await sink.open()
        made.append(sink)
        return sink

    yield make
    for sink in made:
        await sink.close()


async def test_lines_parse_back_to_the_events(tmp_path: Path, make_sink: MakeSink) -> None:
    path = tmp_path / "events.jsonl"
    sink = await make_sink(path)
    first, second = batch(1, 3), batch(2, 2)
    await sink.apply(first)
    await sink.apply(second)
    await sink.apply([])
    assert read(path) == first + second
    assert path.read_bytes().endswith(b"\n")


async def test_a_redelivered_event_is_appended_again(tmp_path: Path, make_sink: MakeSink) -> None:
    path = tmp_path / "events.jsonl"
    sink = await make_sink(path)
    await sink.apply(batch(1))
    await sink.apply(batch(1))  # at-least-once: readers dedupe by id
    assert [e.id for e in read(path)] == [e.id for e in batch(1)] * 2


async def test_each_batch_is_fsynced_after_it_is_written(tmp_path: Path, make_sink: MakeSink,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "events.jsonl"
    synced: list[int] = []
    real_fsync = os.fsync

    def spy(fd: int) -> None:
        if os.path.samestat(os.fstat(fd), os.stat(path)):
            synced.append(os.fstat(fd).st_size)  # what the file holds when it is made durable
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", spy)
    sink = await make_sink(path)
    await sink.apply(batch(1, 3))
    await sink.apply(batch(2, 1))
    assert synced == [3 * LINE, 4 * LINE]


async def test_rotation_keeps_backups_and_never_splits_a_batch(tmp_path: Path, make_sink: MakeSink) -> None:
    path = tmp_path / "events.jsonl"
    sink = await make_sink(path, max_bytes=4 * LINE, backups=2)  # two batches of two lines per file
    for n in range(1, 8):
        await sink.apply(batch(n))
    assert read(path) == batch(7)
    assert read(tmp_path / "events.jsonl.1") == batch(5) + batch(6)
    assert read(tmp_path / "events.jsonl.2") == batch(3) + batch(4)
    assert not (tmp_path / "events.jsonl.3").exists()  # batches 1 and 2 were the oldest: dropped
    for name in ("events.jsonl", "events.jsonl.1", "events.jsonl.2"):
        assert (tmp_path / name).stat().st_size <= 4 * LINE


async def test_a_batch_larger_than_max_bytes_stays_whole(tmp_path: Path, make_sink: MakeSink) -> None:
    path = tmp_path / "events.jsonl"
    sink = await make_sink(path, max_bytes=LINE, backups=3)
    await sink.apply(batch(1, 1))
    await sink.apply(batch(2, 3))
    assert read(path) == batch(2, 3)
    assert read(tmp_path / "events.jsonl.1") == batch(1, 1)


@pytest.mark.parametrize(("max_bytes", "backups"), [(0, 3), (LINE, 0)])
async def test_no_rotation_without_a_limit_or_backups(tmp_path: Path, make_sink: MakeSink, max_bytes: int,
                                                      backups: int) -> None:
    path = tmp_path / "events.jsonl"
    sink = await make_sink(path, max_bytes=max_bytes, backups=backups)
    for n in range(1, 4):
        await sink.apply(batch(n))
    assert read(path) == batch(1) + batch(2) + batch(3)
    assert not (tmp_path / "events.jsonl.1").exists()


async def test_a_file_moved_away_by_someone_else_is_reopened(tmp_path: Path, make_sink: MakeSink) -> None:
    path = tmp_path / "events.jsonl"
    sink = await make_sink(path)
    await sink.apply(batch(1))
    path.rename(tmp_path / "events.jsonl.logrotate")
    await sink.apply(batch(2))
    assert read(path) == batch(2)
    assert read(tmp_path / "events.jsonl.logrotate") == batch(1)


async def test_concurrent_applies_keep_batches_whole(tmp_path: Path, make_sink: MakeSink) -> None:
    path = tmp_path / "events.jsonl"
    sink = await make_sink(path)
    batches = [batch(n, 5) for n in range(20)]
    await asyncio.gather(*(sink.apply(b) for b in batches))
    lines = read(path)
    assert len(lines) == 100
    written = [[e.id for e in lines[i:i + 5]] for i in range(0, 100, 5)]  # whole batches, in some order
    assert sorted(written) == sorted([e.id for e in b] for b in batches)


# --- resync marks ----------------------------------------------------------------------------------------


def mark(resource: str = "host", scope: dict[str, list[Any]] | None = None) -> ResyncMark:
    version = (1_700_000_500, 2)
    return ResyncMark(id=resync_event_id(resource, "mark:r1", version), resource=resource, version=version,
                      resync_id="r1", scope=scope, listed=3, started_at=iso_utc(1_700_000_400),
                      observed_at=iso_utc(1_700_000_500))


async def test_sweep_writes_the_mark_as_a_line_of_its_own(tmp_path: Path, make_sink: MakeSink) -> None:
    path = tmp_path / "events.jsonl"
    sink = await make_sink(path)
    end = mark(scope={"bk_biz_id": [1, 2]})
    await sink.apply(batch(1))
    assert await sink.sweep(end) == 0  # the reader of the file sweeps, not the sink
    await sink.apply(batch(2))
    lines = path.read_bytes().splitlines()
    assert len(lines) == 5 and path.read_bytes().endswith(b"\n")
    assert lines[2] == end.to_json()
    doc = json.loads(lines[2])
    assert doc["type"] == "resync_end" and doc["id"] == end.id and doc["version"] == [1_700_000_500, 2]
    assert doc["scope"] == {"bk_biz_id": [1, 2]} and doc["resource"] == "host"
    assert [parse_message(line) for line in lines] == [*batch(1), end, *batch(2)]


async def test_a_redelivered_mark_is_written_again(tmp_path: Path, make_sink: MakeSink) -> None:
    path = tmp_path / "events.jsonl"
    sink = await make_sink(path)
    assert await sink.sweep(mark()) == 0
    assert await sink.sweep(mark()) == 0  # at-least-once, like events: readers dedupe by id
    assert [parse_message(line) for line in path.read_bytes().splitlines()] == [mark(), mark()]


async def test_sweep_to_stdout(capsys: pytest.CaptureFixture[str], make_sink: MakeSink) -> None:
    sink = await make_sink("-")
    assert await sink.sweep(mark()) == 0
    [line] = capsys.readouterr().out.splitlines()
    assert json.loads(line)["type"] == "resync_end" and parse_message(line) == mark()


async def test_a_failed_sweep_write_is_transient(tmp_path: Path) -> None:
    path = tmp_path / "missing-dir" / "events.jsonl"
    sink = JsonlSink("lines", JsonlSinkConfig(kind="jsonl", path=str(path)))
    with pytest.raises(SinkUnavailable):
        await sink.sweep(mark())
    path.parent.mkdir()
    assert await sink.sweep(mark()) == 0
    await sink.close()
    assert [parse_message(line) for line in path.read_bytes().splitlines()] == [mark()]


# --- stdout ----------------------------------------------------------------------------------------------


async def test_stdout_mode(capsys: pytest.CaptureFixture[str], make_sink: MakeSink) -> None:
    sink = await make_sink("-")
    await sink.apply(batch(1, 3))
    out = capsys.readouterr().out
    assert [Event.from_json(line) for line in out.splitlines()] == batch(1, 3)


SCRIPT = """
import asyncio, sys
from rwatch.config import JsonlSinkConfig
from rwatch.events import Event
from rwatch.sinks.jsonl import JsonlSink

async def main():
    sink = JsonlSink("out", JsonlSinkConfig(kind="jsonl", path="-"))
    await sink.open()
    await sink.apply([Event.from_json(line) for line in sys.stdin.buffer.read().splitlines()])
    await sink.close()

asyncio.run(main())
"""


@pytest.mark.parametrize("target", ["pipe", "file"])
def test_stdout_mode_in_a_process(tmp_path: Path, target: str) -> None:
    events = batch(1, 4)
    stdin = b"".join(e.to_json() + b"\n" for e in events)
    if target == "pipe":
        out = subprocess.run([sys.executable, "-c", SCRIPT], input=stdin, capture_output=True, check=True,
                             timeout=60).stdout
    else:  # a redirected stdout is a regular file: fsynced like a path
        with (tmp_path / "out.jsonl").open("wb") as sink_file:
            subprocess.run([sys.executable, "-c", SCRIPT], input=stdin, stdout=sink_file, check=True, timeout=60)
        out = (tmp_path / "out.jsonl").read_bytes()
    assert [Event.from_json(line) for line in out.splitlines()] == events


# --- failures --------------------------------------------------------------------------------------------


async def test_an_unwritable_path_is_transient_and_recovers(tmp_path: Path) -> None:
    path = tmp_path / "missing-dir" / "events.jsonl"
    sink = JsonlSink("lines", JsonlSinkConfig(kind="jsonl", path=str(path)))
    with pytest.raises(SinkUnavailable) as err:
        await sink.open()
    assert err.value.extra["path"] == str(path) and err.value.extra["errno"] == errno.ENOENT
    with pytest.raises(SinkUnavailable):
        await sink.apply(batch(1))
    path.parent.mkdir()  # someone fixes it; the retried batch goes through
    await sink.apply(batch(1))
    await sink.close()
    assert read(path) == batch(1)


async def test_a_directory_as_path_is_transient(tmp_path: Path, make_sink: MakeSink) -> None:
    with pytest.raises(SinkUnavailable) as err:
        await make_sink(tmp_path)
    assert err.value.extra["path"] == str(tmp_path) and err.value.extra["errno"] == errno.EISDIR


async def test_a_failed_write_leaves_no_torn_line(tmp_path: Path, make_sink: MakeSink,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "events.jsonl"
    sink = await make_sink(path)
    await sink.apply(batch(1))
    real_write = os.write

    def disk_fills_up(fd: int, data: Any) -> int:
        if len(data) > LINE:
            return real_write(fd, bytes(data[: LINE + 7]))  # part of the batch lands...
        raise OSError(errno.ENOSPC, "No space left on device")  # ...then the disk is full

    monkeypatch.setattr(os, "write", disk_fills_up)
    with pytest.raises(SinkUnavailable) as err:
        await sink.apply(batch(2, 3))
    assert err.value.extra["errno"] == errno.ENOSPC
    assert read(path) == batch(1)  # cut back to the last whole batch
    monkeypatch.setattr(os, "write", real_write)
    await sink.apply(batch(2, 3))
    assert read(path) == batch(1) + batch(2, 3)
