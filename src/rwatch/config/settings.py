"""The whole configuration (``Config``): its sections and sinks, the checks that span them, and its masked form."""

from __future__ import annotations

import re
from typing import Any

from pydantic import Field, PrivateAttr, SecretStr, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from rwatch.config.sections import (
    BusConfig,
    CmdbConfig,
    HttpConfig,
    LogConfig,
    RunConfig,
    StoreConfig,
    WatchConfig,
)
from rwatch.config.sinks import MirrorSinkConfig, ProjectionSinkConfig, SinkConfig
from rwatch.config.values import SecretUrl
from rwatch.errors import ConfigError

ENV_PREFIX = "RWATCH_"
ENV_DELIMITER = "__"


class Config(BaseSettings):
    """Every setting. ``Config(...)`` and ``Config.model_validate(...)`` take the values given and nothing else;
    ``load_config`` (loading.py) adds the file and the ``RWATCH_<SECTION>__<KEY>`` environment."""

    model_config = SettingsConfigDict(extra="forbid", validate_default=True, env_prefix=ENV_PREFIX,
                                      env_nested_delimiter=ENV_DELIMITER, case_sensitive=False)

    cmdb: CmdbConfig = Field(default_factory=CmdbConfig)
    watch: WatchConfig = Field(default_factory=WatchConfig)
    bus: BusConfig = Field(default_factory=BusConfig)
    store: StoreConfig = Field(default_factory=StoreConfig)
    sinks: dict[str, SinkConfig] = Field(default_factory=dict)
    http: HttpConfig = Field(default_factory=HttpConfig)
    log: LogConfig = Field(default_factory=LogConfig)
    run: RunConfig = Field(default_factory=RunConfig)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Built directly, a Config is what it was given: no process environment leaks into tests and tools.
        return (init_settings,)

    _source: str | None = PrivateAttr(default=None)  # the file (or "<defaults>") load_config read

    @property
    def source(self) -> str | None:
        """Where this configuration came from, for errors that name the file."""
        return self._source

    @model_validator(mode="after")
    def _sinks_cover_resources(self) -> Config:
        if self.bus.publish_only and self.bus.kind == "memory":
            raise ValueError("bus.publish_only: the memory bus delivers only to this process's sinks; publishing "
                             "for consumers configured elsewhere needs bus.kind = 'amqp'")
        enabled = set(self.watch.enabled)
        for name, sink in self.sinks.items():
            if not re.fullmatch(r"[a-z0-9_-]+", name):
                raise ValueError(f"sinks.{name}: a sink name is lower-case letters, digits, '_' or '-'")
            if isinstance(sink, ProjectionSinkConfig):
                source = self.sinks.get(sink.source)
                if not isinstance(source, MirrorSinkConfig):
                    raise ValueError(f"sinks.{name}.source: {sink.source!r} is not a mirror sink")
                if sink.enabled and not source.enabled:
                    raise ValueError(f"sinks.{name}.source: the mirror {sink.source!r} is disabled")
                continue
            for res in sink.resources or ():
                if res not in enabled:
                    raise ValueError(f"sinks.{name}.resources: {res!r} is not enabled in [watch.resources]")
        return self

    def check_role(self, role: str) -> None:
        """Refuse (ConfigError naming the key and the file) what would wedge ``rwatch run --role <role>``.

        A watcher saves a cursor only once its events are durable, and an event nobody takes never is: with the
        broker, its publish comes back (``mandatory``, no queue bound) and is retried for ever while the cursor
        stands still; with the memory bus the watcher fails and restarts in a loop. So every resource a watcher
        follows must be taken by an enabled sink of this configuration, unless ``bus.publish_only`` says the
        consumers are configured elsewhere (they declare their queues; /readyz shows ``route:<resource>`` until
        one is bound)."""
        file = self.source
        watching = role in ("watcher", "all")
        if self.bus.kind == "memory" and role != "all":
            raise ConfigError(f"bus.kind = 'memory' runs watchers and sinks in one process; --role {role} needs "
                              "'amqp'", key="bus.kind", file=file)
        if self.bus.kind == "memory" and not self.queue_sinks:
            raise ConfigError("bus.kind = 'memory' needs at least one enabled sink to apply events to",
                              key="sinks", file=file)
        if not watching or self.bus.publish_only:
            return
        taken = {res for sink in self.queue_sinks for res in self.sink_resources(sink)}
        missing = [res for res in self.watch.enabled if res not in taken]
        if not missing:
            return
        if not self.queue_sinks:
            raise ConfigError(
                f"no enabled sink takes the events --role {role} would publish ({', '.join(missing)}): no queue "
                "would receive them, and each publish would be returned and retried for ever. Add a "
                "[sinks.<name>] table, or, when the consumers run elsewhere with their own configuration, set "
                "bus.publish_only = true", key="sinks", file=file)
        takers = "; ".join(f"sinks.{s}.resources = {self.sink_resources(s)}" for s in self.queue_sinks)
        res = missing[0]
        raise ConfigError(
            f"{res!r} is followed but no enabled sink takes it ({takers}): its events would wait for a queue for "
            f"ever. Add it to a sink's resources, set watch.resources.{res}.enabled = false, or, when its consumers "
            "are configured elsewhere, set bus.publish_only = true", key=f"watch.resources.{res}.enabled",
            file=file)

    def sink_resources(self, sink: str) -> list[str]:
        """The resources a queue sink takes: its own list, or every enabled resource."""
        chosen = self.sinks[sink]
        if isinstance(chosen, ProjectionSinkConfig):
            return []
        return list(chosen.resources) if chosen.resources is not None else self.watch.enabled

    @property
    def enabled_sinks(self) -> list[str]:
        return [name for name, sink in self.sinks.items() if sink.enabled]

    @property
    def queue_sinks(self) -> list[str]:
        """Enabled sinks fed by queues (every kind but the projections of a mirror: prom_sd, zabbix, ansible)."""
        return [name for name in self.enabled_sinks if not isinstance(self.sinks[name], ProjectionSinkConfig)]

    def masked(self) -> dict[str, Any]:
        """The effective configuration as plain data, every secret masked."""
        masked: dict[str, Any] = _mask(self.model_dump(mode="python"))
        return masked


def _mask(value: Any) -> Any:
    if isinstance(value, SecretStr):
        return value._display() if isinstance(value, SecretUrl) else ("**********" if value.get_secret_value() else "")
    if isinstance(value, dict):
        return {k: _mask(v) for k, v in value.items() if v is not None}
    if isinstance(value, list | tuple):
        return [_mask(v) for v in value]
    return value
