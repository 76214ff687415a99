"""Batched Zabbix writes that take "already exists" and "does not exist" as outcomes, not failures.

Zabbix applies one call in one transaction: a single object of a batch that collides or has vanished fails the
whole call, and its message names at most that one. So each writer re-reads what it must (the names that exist,
the ids still there), drops or binds what the answer explained, and sends the rest again; a batch that fails
without anything left to explain raises ``ReconcileConflict``, a TransientError: the world changed under the
reconcile (a concurrent edit by hand), and the caller runs the whole reconcile again from a fresh read.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from rwatch.errors import TransientError
from rwatch.logs import get_logger
from rwatch.sinks.zabbix.api import AlreadyExists, DoesNotExist, ZabbixApi

CHUNK = 1000  # objects per call: far under PHP's memory limit, few calls for 10,000 hosts
_QUOTED = re.compile(r'"(.*)"')
_ID_FIELD = {"host": "hostid", "hostgroup": "groupid", "hostinterface": "interfaceid"}

log = get_logger("rwatch.sinks.zabbix")


class ReconcileConflict(TransientError):
    """Zabbix changed under the reconcile in a way one batch cannot explain; run the reconcile again."""


@dataclass
class Outcomes:
    """What the writers met besides success: objects found already there, gone, or whose name another holds."""

    existing: int = 0
    gone: int = 0
    conflicts: list[str] = field(default_factory=list)


def chunks(items: Sequence[Any], size: int = CHUNK) -> list[Sequence[Any]]:
    return [items[i:i + size] for i in range(0, len(items), size)]


def quoted_name(exc: AlreadyExists) -> str | None:
    """The name Zabbix quotes in 'Host group "X" already exists.' and 'Host with the same name "X" ...'."""
    found = _QUOTED.search(exc.data)
    return found.group(1) if found else None


async def create_groups(api: ZabbixApi, names: Sequence[str], outcomes: Outcomes) -> dict[str, str]:
    """Create these groups (one call when none exists yet); the id of each, made now or found."""
    ids: dict[str, str] = {}
    left = list(names)
    while left:  # each failed round binds at least one name it re-read, or raises
        try:
            made = await api.call("hostgroup.create", [{"name": n} for n in left])
        except AlreadyExists:
            found = await api.call("hostgroup.get", {"output": ["groupid", "name"], "filter": {"name": left}})
            if not found:
                raise ReconcileConflict("hostgroup.create: a group already exists but cannot be found",
                                        groups=left) from None
            outcomes.existing += len(found)
            ids.update({g["name"]: g["groupid"] for g in found})
            left = [n for n in left if n not in ids]
            continue
        ids.update(zip(left, made["groupids"], strict=True))
        left = []
    return ids


async def create_hosts(api: ZabbixApi, specs: Sequence[dict[str, Any]], outcomes: Outcomes) -> dict[str, str]:
    """Create these hosts; hostid by technical name. A host whose technical or visible name is taken meanwhile is
    left out (a conflict; the next reconcile adopts it when it is adoptable)."""
    ids: dict[str, str] = {}
    for batch in chunks(specs):
        left = list(batch)
        while left:  # each failed round removes the host Zabbix named, or raises
            try:
                made = await api.call("host.create", left)
            except AlreadyExists as exc:
                name = quoted_name(exc)
                kept = [s for s in left if name not in (s["host"], s.get("name"))]
                if name is None or len(kept) == len(left):
                    raise ReconcileConflict(f"host.create: {exc.data}", data=exc.data) from None
                outcomes.conflicts.append(name)
                log.warning("zabbix_name_taken", method="host.create", name=name)
                left = kept
                continue
            ids.update(zip((s["host"] for s in left), made["hostids"], strict=True))
            left = []
    return ids


async def update(api: ZabbixApi, method: str, items: Sequence[dict[str, Any]], outcomes: Outcomes) -> int:
    """``<object>.update`` / ``.create`` of these items in batches; items whose object vanished are dropped, and
    so is an item that would rename its object to a name another holds (a conflict: logged, tried again by the
    next reconcile, which succeeds once the holder has been renamed or removed). The number written."""
    kind = method.partition(".")[0]
    key = _ID_FIELD[kind] if method.endswith(".update") else "hostid"  # hostinterface.create names its host
    written = 0
    for batch in chunks(items):
        left = list(batch)
        while left:  # each failed round drops the vanished objects it re-read or the item Zabbix named, or raises
            try:
                await api.call(method, left)
            except DoesNotExist as exc:
                kept = await _alive(api, "host" if key == "hostid" else kind, key, left)
                if len(kept) == len(left):
                    raise ReconcileConflict(f"{method}: {exc.data}", data=exc.data) from None
                outcomes.gone += len(left) - len(kept)
                left = kept
                continue
            except AlreadyExists as exc:
                name = quoted_name(exc)
                kept = [i for i in left if name not in (i.get("host"), i.get("name"))]
                if name is None or len(kept) == len(left):
                    raise ReconcileConflict(f"{method}: {exc.data}", data=exc.data) from None
                outcomes.conflicts.append(name)
                log.warning("zabbix_name_taken", method=method, name=name)
                left = kept
                continue
            written += len(left)
            left = []
    return written


async def delete(api: ZabbixApi, method: str, ids: Sequence[str], outcomes: Outcomes) -> int:
    """``host.delete`` / ``hostgroup.delete``; what is gone already counts as deleted. The number deleted now."""
    kind = method.partition(".")[0]
    return await _while_alive(api, method, kind, _ID_FIELD[kind], ids, outcomes, lambda left: left)


async def mass(api: ZabbixApi, method: str, hostids: Sequence[str], params: dict[str, Any],
               outcomes: Outcomes) -> int:
    """``host.massupdate`` / ``massadd`` (``hosts``) or ``massremove`` (``hostids``): the same change to many
    hosts in one call; hosts that vanished are dropped. The number of hosts written."""

    def request(left: list[str]) -> Any:
        named = {"hostids": left} if method == "host.massremove" else {"hosts": [{"hostid": h} for h in left]}
        return {**named, **params}

    return await _while_alive(api, method, "host", "hostid", hostids, outcomes, request)


async def _while_alive(api: ZabbixApi, method: str, kind: str, key: str, ids: Sequence[str], outcomes: Outcomes,
                       request: Callable[[list[str]], Any]) -> int:
    """Send ``method`` with ``request(ids)`` per chunk; on "does not exist", drop the ids found gone (counted in
    ``outcomes.gone``) and send again, or raise ``ReconcileConflict`` when none is gone. The number written."""
    written = 0
    for batch in chunks(ids):
        left = list(batch)
        while left:  # each failed round drops the ids found gone, or raises
            try:
                await api.call(method, request(left))
            except DoesNotExist as exc:
                kept = [i[key] for i in await _alive(api, kind, key, [{key: i} for i in left])]
                if len(kept) == len(left):
                    raise ReconcileConflict(f"{method}: {exc.data}", data=exc.data) from None
                outcomes.gone += len(left) - len(kept)
                left = kept
                continue
            written += len(left)
            left = []
    return written


async def _alive(api: ZabbixApi, kind: str, key: str, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The items whose object (``key``'s id) still exists."""
    ids = sorted({str(i[key]) for i in items})
    found = await api.call(f"{kind}.get", {f"{key}s": ids, "output": [key]})
    alive = {str(f[key]) for f in found}
    return [i for i in items if str(i[key]) in alive]
