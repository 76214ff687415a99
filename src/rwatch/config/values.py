"""The value types configuration sections are built from: durations, URLs whose password prints masked, and
the section base that rejects unknown keys."""

from __future__ import annotations

import re
from typing import Annotated, Any
from urllib.parse import urlsplit, urlunsplit

from pydantic import BaseModel, BeforeValidator, ConfigDict, SecretStr

_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(value: Any) -> float:
    """Seconds from a number or a string such as ``"250ms"``, ``"20s"``, ``"5m"``, ``"3h"``, ``"1h30m"``."""
    if isinstance(value, bool):
        raise ValueError("a duration is a number of seconds or a string like '5m'")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip().replace(" ", "")
        try:
            seconds = float(text)
        except ValueError:
            pos, seconds = 0, 0.0
            for match in _DURATION.finditer(text):
                if match.start() != pos:
                    break
                seconds += float(match.group(1)) * _UNITS[match.group(2)]
                pos = match.end()
            if pos != len(text) or not text:
                raise ValueError(f"{value!r} is not a duration (use seconds or e.g. '250ms', '5m', '3h')") from None
    else:
        raise ValueError("a duration is a number of seconds or a string like '5m'")
    if seconds < 0:
        raise ValueError("a duration cannot be negative")
    return seconds


Duration = Annotated[float, BeforeValidator(parse_duration)]


class SecretUrl(SecretStr):
    """A URL that may carry a password: shown with the password masked, the rest left readable."""

    def _display(self) -> str:
        return mask_url(self.get_secret_value())


def mask_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    netloc = f"{parts.username}:***@{host}" if parts.username else f":***@{host}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def _secret_url(value: Any) -> Any:
    return SecretUrl(value) if isinstance(value, str) else value


SecretUrlField = Annotated[SecretUrl, BeforeValidator(_secret_url)]


class Section(BaseModel):
    """A table of the file: unknown keys are errors, defaults are validated like given values."""

    model_config = ConfigDict(extra="forbid", validate_default=True)
