"""The small query language the simulator understands: CMDB filters, legacy conditions, field projection.

Supported, on top-level fields only:
* query filters ``{"condition": "AND"|"OR", "rules": [{"field", "operator", "value"} | nested filter]}``
  with operators ``equal``, ``not_equal``, ``in``, ``not_in``, ``less``, ``less_or_equal``, ``greater``,
  ``greater_or_equal``, ``contains`` (substring), ``exist``, ``not_exist``;
* legacy conditions ``{"field": value}`` (equality) or ``{"field": {"$eq"|"$ne"|"$in"|"$nin": ...}}``.
Anything else is rejected with ValueError, so a caller never silently gets an unfiltered list.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any


def _contains(a: Any, b: Any) -> bool:
    return isinstance(a, str) and isinstance(b, str) and b in a


def _cmp(op: Callable[[Any, Any], bool]) -> Callable[[Any, Any], bool]:
    def check(a: Any, b: Any) -> bool:
        try:
            return a is not None and bool(op(a, b))
        except TypeError:
            return False

    return check


_RULES: dict[str, Callable[[Any, Any], bool]] = {
    "equal": lambda a, b: a == b,
    "not_equal": lambda a, b: a != b,
    "in": lambda a, b: isinstance(b, list) and a in b,
    "not_in": lambda a, b: isinstance(b, list) and a not in b,
    "less": _cmp(lambda a, b: a < b),
    "less_or_equal": _cmp(lambda a, b: a <= b),
    "greater": _cmp(lambda a, b: a > b),
    "greater_or_equal": _cmp(lambda a, b: a >= b),
    "contains": _contains,
}

_MONGO: dict[str, Callable[[Any, Any], bool]] = {
    "$eq": _RULES["equal"],
    "$ne": _RULES["not_equal"],
    "$in": _RULES["in"],
    "$nin": _RULES["not_in"],
}


def match_filter(flt: Any, doc: dict[str, Any]) -> bool:
    """True when ``doc`` satisfies a CMDB query filter; an empty/None filter matches everything."""
    if not flt:
        return True
    if not isinstance(flt, dict):
        raise ValueError("filter must be an object")
    if "field" in flt:
        op = flt.get("operator")
        if op == "exist":
            return flt["field"] in doc
        if op == "not_exist":
            return flt["field"] not in doc
        check = _RULES.get(str(op))
        if check is None:
            raise ValueError(f"unsupported filter operator: {op}")
        return check(doc.get(flt["field"]), flt.get("value"))
    rules = flt.get("rules")
    if not isinstance(rules, list):
        raise ValueError("filter needs rules")
    cond = str(flt.get("condition", "AND")).upper()
    if cond == "AND":
        return all(match_filter(r, doc) for r in rules)
    if cond == "OR":
        return any(match_filter(r, doc) for r in rules)
    raise ValueError(f"unsupported filter condition: {cond}")


def match_condition(cond: Any, doc: dict[str, Any]) -> bool:
    """True when ``doc`` satisfies a legacy equality condition (Mongo-style operators $eq/$ne/$in/$nin)."""
    if not cond:
        return True
    if not isinstance(cond, dict):
        raise ValueError("condition must be an object")
    for name, want in cond.items():
        value = doc.get(name)
        if isinstance(want, dict):
            for op, arg in want.items():
                check = _MONGO.get(op)
                if check is None:
                    raise ValueError(f"unsupported condition operator: {op}")
                if not check(value, arg):
                    return False
        elif value != want:
            return False
    return True


def mentions(flt: Any, field: str) -> bool:
    """True when a filter or condition refers to ``field`` anywhere."""
    if isinstance(flt, dict):
        if flt.get("field") == field or field in flt:
            return True
        return any(mentions(v, field) for v in flt.values())
    if isinstance(flt, list):
        return any(mentions(v, field) for v in flt)
    return False


def project(doc: dict[str, Any], fields: Iterable[str] | None) -> dict[str, Any]:
    """The list APIs' ``fields``: only the named keys that exist; empty means the whole document."""
    names = list(fields or ())
    if not names:
        return doc
    return {f: doc[f] for f in names if f in doc}
