"""The process's recent errors: the last error-level log events, kept in memory for ``/status``."""

from __future__ import annotations

import logging
from collections import deque
from datetime import UTC, datetime
from typing import Any

ERRORS_KEPT = 20


def iso_ms(timestamp: float) -> str:
    """A Unix time as ``/status`` writes it: UTC, to the millisecond, with a ``Z``."""
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _clip(value: object, limit: int = 500) -> str | None:
    if value is None or value == "":
        return None
    text = str(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _last_line(text: object) -> str | None:
    lines = str(text).strip().splitlines() if text else []
    return lines[-1] if lines else None


class ErrorTap(logging.Handler):
    """Keeps the last ``keep`` error-level log events of the process, structlog's and the standard library's.

    A handler on the root logger rather than a structlog processor: structlog loggers cache their processor chain
    on first use, so a processor added at run time would miss most of them; every structlog event reaches the root
    logger anyway (``rwatch.logs``), its event dict whole in ``record.msg``.
    """

    def __init__(self, keep: int = ERRORS_KEPT) -> None:
        super().__init__(logging.ERROR)
        self.recent: deque[dict[str, Any]] = deque(maxlen=keep)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.recent.append(error_entry(record))
        except Exception:  # a log call must never fail because of this tap
            self.handleError(record)


def error_entry(record: logging.LogRecord) -> dict[str, Any]:
    """``time``, ``event``, ``resource`` and ``error`` of one record (the traceback's last line for an exception)."""
    fields = record.msg if isinstance(record.msg, dict) else None
    if fields is not None:
        event: object = fields.get("event")
        resource = fields.get("resource")
        error = fields.get("error") or fields.get("reason") or _last_line(fields.get("exception"))
    else:
        event, resource = record.getMessage(), None
        error = _last_line(logging.Formatter().formatException(record.exc_info)) if record.exc_info else None
    return {"time": iso_ms(record.created), "event": _clip(event, 200), "resource": _clip(resource, 100),
            "error": _clip(error)}


_TAP = ErrorTap()


def install_error_tap() -> ErrorTap:
    """Attach the process's error tap to the root logger (again, if logging was set up since); idempotent."""
    root = logging.getLogger()
    if _TAP not in root.handlers:
        root.addHandler(_TAP)
    return _TAP


def recent_errors() -> list[dict[str, Any]]:
    """The last ``ERRORS_KEPT`` error-level log events, newest first."""
    return list(reversed(_TAP.recent))
