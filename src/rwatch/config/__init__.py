"""Configuration: one TOML file, every key overridable by ``RWATCH_<SECTION>__<KEY>`` (pydantic-settings).

Unknown keys are errors; secrets are ``SecretStr`` (or ``SecretUrl``, which masks only the password) so they
print masked everywhere. ``load_config`` turns every problem into a ``ConfigError`` that names the file (or
environment variable) and the dotted key. The names below are the package's face; each lives in one module:
values (durations, masked URLs), sections, sinks, settings (the whole ``Config``), loading.
"""

from rwatch.config.loading import load_config
from rwatch.config.sections import (
    DEFAULT_FIELDS,
    CmdbConfig,
    ResourceConfig,
    RunConfig,
    WatchConfig,
)
from rwatch.config.settings import Config
from rwatch.config.sinks import (
    JsonlSinkConfig,
    MirrorSinkConfig,
    PromJob,
    PromSdSinkConfig,
    WebhookSinkConfig,
    signing_key,
)
from rwatch.config.values import SecretUrl, mask_url, parse_duration

__all__ = [
    "DEFAULT_FIELDS",
    "CmdbConfig",
    "Config",
    "JsonlSinkConfig",
    "MirrorSinkConfig",
    "PromJob",
    "PromSdSinkConfig",
    "ResourceConfig",
    "RunConfig",
    "SecretUrl",
    "WatchConfig",
    "WebhookSinkConfig",
    "load_config",
    "mask_url",
    "parse_duration",
    "signing_key",
]
