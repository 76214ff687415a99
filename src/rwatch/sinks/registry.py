"""Which sink a ``[sinks.<name>]`` table makes: the one place that knows every sink implementation."""

from __future__ import annotations

from rwatch.config import (
    AnsibleInventorySinkConfig,
    Config,
    JsonlSinkConfig,
    MirrorSinkConfig,
    ProjectionSinkConfig,
    PromSdSinkConfig,
    WebhookSinkConfig,
    ZabbixSinkConfig,
)
from rwatch.sinks.ansible import AnsibleInventorySink
from rwatch.sinks.base import Sink
from rwatch.sinks.jsonl import JsonlSink
from rwatch.sinks.mirror import MirrorSink
from rwatch.sinks.prom_sd import PromSdSink
from rwatch.sinks.webhook import WebhookSink
from rwatch.sinks.zabbix.sink import ZabbixSink


def make_sink(name: str, config: Config, sinks: dict[str, Sink] | None = None) -> Sink:
    """The sink ``[sinks.<name>]`` describes. ``sinks`` holds those already made (a projection needs its mirror)."""
    settings = config.sinks[name]
    source: MirrorSink | None = None
    if isinstance(settings, ProjectionSinkConfig):
        made = (sinks or {}).get(settings.source)
        if not isinstance(made, MirrorSink):
            raise ValueError(f"{settings.kind} sink {name!r} needs its mirror {settings.source!r} made first")
        source = made
    if isinstance(settings, MirrorSinkConfig):
        return MirrorSink(name, settings)
    if isinstance(settings, WebhookSinkConfig):
        return WebhookSink(name, settings)
    if isinstance(settings, JsonlSinkConfig):
        return JsonlSink(name, settings)
    if isinstance(settings, PromSdSinkConfig):
        assert source is not None
        return PromSdSink(name, settings, source)
    if isinstance(settings, ZabbixSinkConfig):
        assert source is not None
        return ZabbixSink(name, settings, source)
    if isinstance(settings, AnsibleInventorySinkConfig):
        assert source is not None
        return AnsibleInventorySink(name, settings, source)
    raise AssertionError(f"unknown sink kind for {name!r}")  # pragma: no cover - config validation
