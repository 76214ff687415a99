"""Logs: one JSON object per line for structlog and the standard library alike, context bound per resource."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest
import structlog

from rwatch.logs import get_logger, setup_logging


@pytest.fixture
def stream() -> Iterator[io.StringIO]:
    out = io.StringIO()
    yield out
    structlog.reset_defaults()
    logging.getLogger().handlers.clear()


def lines(out: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in out.getvalue().splitlines()]


def test_structlog_and_stdlib_loggers_share_the_json_renderer(stream: io.StringIO) -> None:
    setup_logging("info", "json", stream)
    get_logger("rwatch.watch", resource="host").info("cursor_saved", cursor="abc", events=3)
    logging.getLogger("aio_pika.robust_connection").warning("connection %s lost", "amqp://x")
    logging.getLogger("aiohttp.client").error("boom")
    logging.getLogger("aiohttp.access").info("GET /metrics 200")  # library chatter stays below INFO
    try:
        raise ValueError("bad")
    except ValueError:
        get_logger("rwatch.app").exception("task_crashed", task="watch:host")
    first, second, third, fourth = lines(stream)
    assert first["event"] == "cursor_saved" and first["resource"] == "host" and first["events"] == 3
    assert first["level"] == "info" and first["logger"] == "rwatch.watch" and "timestamp" in first
    assert second["event"] == "connection amqp://x lost" and second["level"] == "warning"
    assert second["logger"] == "aio_pika.robust_connection"
    assert third["logger"] == "aiohttp.client" and third["level"] == "error"
    assert fourth["event"] == "task_crashed" and "ValueError: bad" in str(fourth["exception"])


def test_level_filters_and_console_format_is_for_people(stream: io.StringIO) -> None:
    setup_logging("warning", "console", stream)
    get_logger().info("hidden")
    get_logger().warning("shown", key="v")
    text = stream.getvalue()
    assert "hidden" not in text and "shown" in text and "key" in text
    with pytest.raises(json.JSONDecodeError):
        json.loads(text.splitlines()[0])
