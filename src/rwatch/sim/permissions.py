"""What the simulated CMDB lets the calling app and user do: the app's gateway grants and the user's IAM rights."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from rwatch.cmdb.protocol import RESOURCE_TYPES

ALL_APIS: Final = "*"


@dataclass
class Permissions:
    """What the calling app and user may do: the app's gateway grants and the user's IAM permissions.

    ``deny``: resources whose IAM watch action is refused (CMDB answers 9900403). ``deny_apis``: gateway
    resources the app is not granted (the gateway answers 403 1640301; ``*`` = every one). ``hide_bizs``:
    businesses the user may not view in IAM (a user who is not a CMDB administrator); the list APIs drop or
    refuse them, the watch API does not (event watching is authorised per resource type).
    """

    apis: frozenset[str]  # the API names the simulator serves, for validation
    deny: set[str] = field(default_factory=set)
    deny_apis: set[str] = field(default_factory=set)
    hide_bizs: set[int] = field(default_factory=set)

    def update(self, spec: Mapping[str, Any]) -> None:
        """Replace the sets ``spec`` names (the others stay); ValueError, changing nothing, when one is bad."""
        deny = _names(spec, "deny", set(RESOURCE_TYPES))
        deny_apis = _names(spec, "deny_apis", {*self.apis, ALL_APIS})
        hide_bizs = _ids(spec, "hide_bizs")
        self.deny = self.deny if deny is None else deny
        self.deny_apis = self.deny_apis if deny_apis is None else deny_apis
        self.hide_bizs = self.hide_bizs if hide_bizs is None else hide_bizs

    def granted(self, api: str) -> bool:
        return ALL_APIS not in self.deny_apis and api not in self.deny_apis

    def to_json(self) -> dict[str, Any]:
        return {"deny": sorted(self.deny), "deny_apis": sorted(self.deny_apis), "hide_bizs": sorted(self.hide_bizs)}


def _items(spec: Mapping[str, Any], key: str) -> list[Any] | None:
    if key not in spec:
        return None
    value = spec[key]
    if not isinstance(value, Iterable) or isinstance(value, str | bytes | Mapping):
        raise ValueError(f"{key} must be a list")
    return list(value)


def _ids(spec: Mapping[str, Any], key: str) -> set[int] | None:
    value = _items(spec, key)
    if value is not None and not all(type(v) is int for v in value):
        raise ValueError(f"{key} must be a list of integer ids")
    return None if value is None else set(value)


def _names(spec: Mapping[str, Any], key: str, known: set[str]) -> set[str] | None:
    value = _items(spec, key)
    if value is None:
        return None
    unknown = sorted(str(v) for v in value if v not in known)
    if unknown:
        raise ValueError(f"{key}: unknown names {unknown}; known: {sorted(known)}")
    return set(value)
