"""prom_sd: Prometheus service discovery computed from a mirror's topology.

prom_sd has no queues: it is a projection of its mirror (``rwatch.sinks.projection``). After commits it re-reads
the mirror's topology (debounced), renders one target group per (job, host), and publishes the result twice: as a
file_sd file, replaced atomically (Prometheus re-reads it on inotify and must never see half of it), and as the
http_sd answer of ``GET /sd`` (the same bytes, kept in memory). Identical topology gives identical bytes, and
unchanged content is not rewritten.

Mounting: ``sd_routes(sinks)`` gives ``/sd`` for the first prom_sd sink and ``/sd/<name>`` for each; pass
the result to ``serve_http(..., routes=...)``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, TypedDict

import orjson
from aiohttp import web
from aiohttp.typedefs import Handler

from rwatch.metrics import PROM_SD_RENDER_ERRORS, PROM_SD_RENDERS, PROM_SD_TARGETS
from rwatch.sinks.base import first_ip
from rwatch.sinks.files import ProjectedFile
from rwatch.sinks.projection import Projection, ProjectionFailed, TopologySource

if TYPE_CHECKING:
    from rwatch.config import PromJob, PromSdSinkConfig
    from rwatch.sinks.base import TopologyRow

DEBOUNCE_SECONDS = 1.0
EMPTY = b"[]\n"


class TargetGroup(TypedDict):
    targets: list[str]
    labels: dict[str, str]


# --- rendering (pure) -----------------------------------------------------------------------------------


class _Matcher:
    """One of a job's biz / set / module lists: ints match ids, strings match names (or ids written as text)."""

    def __init__(self, values: Sequence[str | int]) -> None:
        self.everything = not values
        self.ids = {v for v in values if isinstance(v, int)}
        self.names = {v for v in values if isinstance(v, str)}

    def __call__(self, ident: int | None, name: str | None) -> bool:
        if self.everything:
            return True
        if ident is not None and (ident in self.ids or str(ident) in self.names):
            return True
        return name is not None and name in self.names


def _target_ip(value: str | None) -> str | None:
    """The host's first inner IP as a target's host part (an IPv6 address in brackets, for ``host:port``)."""
    ip = first_ip(value)
    return f"[{ip}]" if ip is not None and ":" in ip else ip


def _joined(values: Iterable[object]) -> str:
    """Distinct non-empty values in first-seen order, joined with ','; '' when there are none."""
    seen: dict[str, None] = {}
    for value in values:
        if value is not None and value != "":
            seen.setdefault(str(value), None)
    return ",".join(seen)


def _first(values: Iterable[object]) -> str:
    return next((str(v) for v in values if v is not None and v != ""), "")


def render_groups(jobs: Sequence[PromJob], rows: Iterable[TopologyRow]) -> tuple[list[TargetGroup], int]:
    """The target groups, ordered by job (config order) then host, and how many hosts had no inner IP.

    A host in several matching modules gives one group whose biz / set / module labels join the distinct
    values (ordered by module id), so one target is scraped once per job.
    """
    ordered = sorted(rows, key=lambda r: (r.bk_host_id, r.tenant, r.bk_module_id))
    groups: list[TargetGroup] = []
    no_ip: set[tuple[str, int]] = set()
    for job in jobs:
        biz, set_, module = _Matcher(job.biz), _Matcher(job.set), _Matcher(job.module)
        hosts: dict[tuple[int, str], list[TopologyRow]] = {}
        for row in ordered:
            if (biz(row.bk_biz_id, row.bk_biz_name) and set_(row.bk_set_id, row.bk_set_name)
                    and module(row.bk_module_id, row.bk_module_name)):
                hosts.setdefault((row.bk_host_id, row.tenant), []).append(row)
        for (host_id, tenant), host_rows in hosts.items():
            ip = next((ip for r in host_rows if (ip := _target_ip(r.bk_host_innerip))), None)
            if ip is None:
                no_ip.add((tenant, host_id))
                continue
            labels = {
                "job": job.name,
                "bk_biz_id": _joined(r.bk_biz_id for r in host_rows),
                "bk_biz_name": _joined(r.bk_biz_name for r in host_rows),
                "bk_set_id": _joined(r.bk_set_id for r in host_rows),
                "bk_set_name": _joined(r.bk_set_name for r in host_rows),
                "bk_module_id": _joined(r.bk_module_id for r in host_rows),
                "bk_module_name": _joined(r.bk_module_name for r in host_rows),
                "bk_host_id": str(host_id),
                "bk_host_name": _first(r.bk_host_name for r in host_rows),
                "bk_cloud_id": _first(r.bk_cloud_id for r in host_rows),
                "tenant": tenant,
            }
            groups.append({"targets": [f"{ip}:{job.port}"], "labels": labels})
    return groups, len(no_ip)


def encode(groups: Sequence[TargetGroup]) -> bytes:
    """file_sd JSON, one group a line: compact, yet an operator can grep for a host."""
    if not groups:
        return EMPTY
    return b"[\n" + b",\n".join(orjson.dumps(g) for g in groups) + b"\n]\n"


def _render(jobs: Sequence[PromJob], rows: list[TopologyRow]) -> tuple[bytes, int, int]:
    groups, no_ip = render_groups(jobs, rows)
    return encode(groups), len(groups), no_ip


# --- the sink -------------------------------------------------------------------------------------------


class PromSdSink(Projection):
    """A projection (``rwatch.sinks.projection``): re-rendered after its mirror's commits."""

    kind = "prom_sd"

    def __init__(self, name: str, settings: PromSdSinkConfig, source: TopologySource, *,
                 debounce: float = DEBOUNCE_SECONDS) -> None:
        super().__init__(name, source, debounce=debounce, renders=PROM_SD_RENDERS, errors=PROM_SD_RENDER_ERRORS)
        self._jobs = list(settings.jobs)
        self._path = Path(settings.file) if settings.file else None
        self._content: bytes | None = None  # None until a render succeeded
        self._file = ProjectedFile(self._path) if self._path is not None else None
        self._targets = PROM_SD_TARGETS.labels(name)

    @property
    def content(self) -> bytes:
        """The latest rendered file_sd JSON (``[]`` before the first render): what ``/sd`` answers."""
        return EMPTY if self._content is None else self._content

    async def handle_sd(self, _: web.Request) -> web.Response:
        """http_sd: Prometheus wants 200 and application/json with the whole list.

        503 until a render succeeded: Prometheus keeps its last targets when a refresh fails but drops every one on
        an empty list, so a restarted rwatch whose mirror cannot be read yet must not answer ``[]``.
        """
        if self._content is None:
            return web.Response(status=503, text="no topology rendered yet\n", headers={"Retry-After": "1"})
        return web.Response(body=self._content, content_type="application/json")

    async def project(self) -> None:
        try:
            rows = await self._source.topology()
            # Grouping and encoding 100k rows takes a while: off the loop, so /healthz keeps answering.
            content, targets, no_ip = await asyncio.to_thread(_render, self._jobs, rows)
        except Exception as exc:
            raise ProjectionFailed("prom_sd_topology_failed", exc) from exc
        self._content = content
        self._targets.set(targets)
        if self._file is not None:
            try:
                wrote = await self._file.write(content)
            except OSError as exc:
                raise ProjectionFailed("prom_sd_write_failed", exc) from exc
            if wrote:
                self._log.info("prom_sd_written", path=str(self._path), targets=targets, no_ip=no_ip,
                               bytes=len(content))

    def failure_fields(self) -> dict[str, object]:
        return {"path": str(self._path or "")}


def sd_routes(sinks: Sequence[PromSdSink]) -> list[tuple[str, Handler]]:
    """``/sd`` for the first prom_sd sink, ``/sd/<name>`` for every one: give these to ``serve_http``."""
    routes: list[tuple[str, Handler]] = []
    for sink in sinks:
        if not routes:
            routes.append(("/sd", sink.handle_sd))
        routes.append((f"/sd/{sink.name}", sink.handle_sd))
    return routes
