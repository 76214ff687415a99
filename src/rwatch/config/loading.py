"""Loading the configuration: the TOML file under the ``RWATCH_<SECTION>__<KEY>`` environment, through
pydantic-settings, with every problem a ``ConfigError`` naming the file (or variable) and the dotted key."""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from pydantic.fields import FieldInfo
from pydantic_settings import EnvSettingsSource, TomlConfigSettingsSource

from rwatch.config.settings import ENV_DELIMITER, ENV_PREFIX, Config
from rwatch.config.sinks import SINK_KINDS
from rwatch.errors import ConfigError

DEFAULT_CONFIG_PATH = Path("config.toml")


class _Environment(EnvSettingsSource):
    """``RWATCH_<SECTION>__<KEY>`` variables from a given mapping (``os.environ`` unless a test passes its own).

    Only names with a section and a key count (``RWATCH_TEST_AMQP_URL`` and the like belong to others), and a
    value that is a TOML value (a number, a boolean, an array, an inline table) is read as one, as in the file."""

    def __init__(self, environ: Mapping[str, str]) -> None:
        self._environ = environ
        super().__init__(Config)

    def _load_env_vars(self) -> Mapping[str, Any]:
        return {name.lower(): _toml_value(value) for name, value in self._environ.items()
                if _env_path(name) is not None}

    def decode_complex_value(self, field_name: str, field: FieldInfo | None, value: Any) -> Any:
        # Already read as TOML (README: "values parse as TOML values when they can"), not as JSON; text that is not
        # TOML stays text, so validation names the key (and the variable) and says what it wanted.
        return value


def _toml_value(raw: str) -> Any:
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def _env_path(name: str) -> tuple[str, ...] | None:
    """The dotted key an ``RWATCH_`` variable sets, or None when it sets none."""
    if not name.startswith(ENV_PREFIX) or ENV_DELIMITER not in name:
        return None
    return tuple(part.lower() for part in name[len(ENV_PREFIX):].split(ENV_DELIMITER))


def _env_origins(environ: Mapping[str, str]) -> dict[tuple[str, ...], str]:
    """Which variable sets which key, refusing what pydantic-settings would drop without a word: an empty part,
    a key set both as a value and as a table, a section that does not exist."""
    origin: dict[tuple[str, ...], str] = {}
    for name in environ:
        path = _env_path(name)
        if path is None:
            continue
        if not all(path):
            raise ConfigError(f"malformed variable name (empty part in {name})", file=f"${name}", key=name)
        for other, other_name in origin.items():
            shorter, longer = sorted((path, other), key=len)
            if shorter != longer and longer[: len(shorter)] == shorter:
                raise ConfigError(f"{name} conflicts with {other_name}", file=f"${name}", key=".".join(path))
        if path[0] not in Config.model_fields:
            raise ConfigError("unknown key", file=f"${name}", key=path[0])
        origin[path] = name
    return origin


def _error_location(err: Any) -> tuple[str, ...]:
    # Drop pydantic's discriminator tags ("mirror", "function-after[...]") so the key reads as the user wrote it.
    loc = [str(p) for p in err["loc"] if not str(p).startswith(("function-", "tagged-union"))]
    if loc[:1] == ["sinks"] and len(loc) > 2 and loc[2] in SINK_KINDS:
        del loc[2]
    return tuple(loc)


def _toml_source(file: Path) -> TomlConfigSettingsSource:
    try:
        if file.exists() and not file.is_file():
            raise IsADirectoryError(21, "Is a directory")
        return TomlConfigSettingsSource(Config, toml_file=file)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"not valid TOML: {exc}", file=str(file)) from None
    except OSError as exc:
        raise ConfigError(f"cannot read: {exc.strerror}", file=str(file)) from None


def load_config(path: str | Path | None = None, environ: Mapping[str, str] | None = None) -> Config:
    """Read the TOML file (``config.toml`` when none is named and it exists), apply the environment, validate."""
    environ = os.environ if environ is None else environ
    explicit = path is not None
    file = Path(path) if path is not None else DEFAULT_CONFIG_PATH
    if explicit and not file.exists():
        raise ConfigError("no such file", file=str(file))
    toml = _toml_source(file)
    source = str(file) if toml.toml_data or explicit else "<defaults>"
    origin = _env_origins(environ)
    try:
        # The first source wins: a variable overrides the file, key by key.
        config = Config(_build_sources=((_Environment(environ), toml), {}))
    except ValidationError as exc:
        raise _config_error(exc, source, origin) from None
    config._source = source
    return config


def _config_error(exc: ValidationError, source: str, origin: dict[tuple[str, ...], str]) -> ConfigError:
    err = exc.errors()[0]
    loc = _error_location(err)
    message = str(err["msg"]).removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        message = "unknown key"
    # A model-level check names its key in the message ("resources.host.fields: ..."); prefer that.
    inner, sep, rest = message.partition(": ")
    if sep and re.fullmatch(r"[a-z_][a-z0-9_-]*(\.[a-z0-9_-]+)*", inner):
        loc, message = (*loc, *inner.split(".")), rest
    key = ".".join(loc)
    env_name = next((name for p, name in origin.items() if loc[: len(p)] == p), None)
    return ConfigError(message, file=f"${env_name}" if env_name else source, key=key)
