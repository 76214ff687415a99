"""The head of a resync: the version its snapshot is taken at, never ahead of CMDB.

The newest event's cluster time is the snapshot's version ``V`` (no event in the window: the server's clock less
the skew allowance). Every change the lists cannot have seen is newer than ``V``, so the sinks' version fence keeps
a live change made during the listing over its snapshot row, whichever arrives first.
"""

from __future__ import annotations

import asyncio

import structlog

from rwatch.cmdb import protocol as p
from rwatch.cmdb.client import SKEW_ALLOWANCE, CmdbClient
from rwatch.retry import LIST, log_retry, retrying

log = structlog.get_logger("rwatch.resync")


async def take_head(client: CmdbClient, resource: str, stop: asyncio.Event) -> tuple[int, int]:
    """The snapshot's version: the newest event's cluster time, or the server's clock less the skew allowance.

    Asked with no event-type or sub-resource filter: a filtered from-now answer is the NoEventCursor whenever
    the newest event does not match, and the clock fallback would then stand in for a real, older, head.
    Under-estimating is safe (a change then merely looks newer than the snapshot); over-estimating fences a
    real change out, so the fallback is CMDB's clock as best known, less what its ``Date`` may be off by."""
    fields = list(p.KEY_FIELDS[resource]) if resource in p.FIELDS_REQUIRED else []
    ask = retrying(LIST, stop=stop, before_sleep=log_retry(log, "resync_head_failed", resource=resource))
    reply: p.WatchReply = await ask(client.watch, resource, fields=fields, event_types=[])
    cursor = reply.last_cursor
    decoded = p.decode_cursor(cursor) if cursor and cursor != p.NO_EVENT_CURSOR else None
    if decoded is not None:
        return decoded.sec, decoded.inc
    return int(client.server_now() - SKEW_ALLOWANCE), 0
