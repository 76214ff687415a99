"""Which sink a ``[sinks.<name>]`` table makes: the one place that knows every sink implementation."""

from __future__ import annotations

from rwatch.config import (
    AnsibleInventorySinkConfig,
    Config,
    JsonlSinkConfig,
    MirrorSinkConfig,
    PromSdSinkConfig,
    WebhookSinkConfig,
)
from rwatch.sinks.ansible import AnsibleInventorySink
from rwatch.sinks.base import Sink
from rwatch.sinks.jsonl import JsonlSink
from rwatch.sinks.mirror import MirrorSink
from rwatch.sinks.prom_sd import PromSdSink
from rwatch.sinks.webhook import WebhookSink


def make_sink(name: str, config: Config, sinks: dict[str, Sink] | None = None) -> Sink:
    """The sink ``[sinks.<name>]`` describes. ``sinks`` holds those already made (a projection needs its mirror)."""
    settings = config.sinks[name]
    if isinstance(settings, MirrorSinkConfig):
        return MirrorSink(name, settings)
    if isinstance(settings, WebhookSinkConfig):
        return WebhookSink(name, settings)
    if isinstance(settings, JsonlSinkConfig):
        return JsonlSink(name, settings)
    if isinstance(settings, PromSdSinkConfig):
        source = (sinks or {}).get(settings.source)
        if not isinstance(source, MirrorSink):
            raise ValueError(f"prom_sd sink {name!r} needs its mirror {settings.source!r} made first")
        return PromSdSink(name, settings, source)
    if isinstance(settings, AnsibleInventorySinkConfig):
        source = (sinks or {}).get(settings.source)
        if not isinstance(source, MirrorSink):
            raise ValueError(f"ansible_inventory sink {name!r} needs its mirror {settings.source!r} made first")
        return AnsibleInventorySink(name, settings, source)
    raise AssertionError(f"unknown sink kind for {name!r}")  # pragma: no cover - config validation
