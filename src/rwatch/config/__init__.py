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
    AnsibleInventorySinkConfig,
    JsonlSinkConfig,
    MirrorSinkConfig,
    ProjectionSinkConfig,
    PromJob,
    PromSdSinkConfig,
    WebhookSinkConfig,
    ZabbixSinkConfig,
    signing_key,
)
from rwatch.config.values import SecretUrl, mask_url, parse_duration

__all__ = [
    "DEFAULT_FIELDS",
    "AnsibleInventorySinkConfig",
    "CmdbConfig",
    "Config",
    "JsonlSinkConfig",
    "MirrorSinkConfig",
    "ProjectionSinkConfig",
    "PromJob",
    "PromSdSinkConfig",
    "ResourceConfig",
    "RunConfig",
    "SecretUrl",
    "WatchConfig",
    "WebhookSinkConfig",
    "ZabbixSinkConfig",
    "load_config",
    "mask_url",
    "parse_duration",
    "signing_key",
]
