"""The small query language the simulator understands: CMDB filters, legacy conditions, field projection.

Supported, on top-level fields only:
* query filters ``{"condition": "AND"|"OR", "rules": [{"field", "operator", "value"} | nested filter]}``
  with operators ``equal``, ``not_equal``, ``in``, ``not_in``, ``less``, ``less_or_equal``, ``greater``,
  ``greater_or_equal``, ``contains`` (substring), ``exist``, ``not_exist``;
* legacy conditions ``{"field": value}`` (equality) or
  ``{"field": {"$eq"|"$ne"|"$in"|"$nin"|"$gt"|"$gte"|"$lt"|"$lte": ...}}``; as with the filter comparisons,
  a missing or null field never matches ``$gt``/``$gte``/``$lt``/``$lte`` (nor does a value of another type),
  so keyset paging (``{"bk_module_id": {"$gt": last}}`` sorted by the id) works as on a real CMDB.
Anything else is rejected with ValueError, so a caller never silently gets an unfiltered list.

``compile_filter`` turns a query filter into a predicate once, for the list APIs that test 100,000 documents
against the same filter; ``match_filter`` is the same thing for one document. An invalid part of a filter
raises only when it is actually evaluated, exactly as a document-by-document evaluation would.
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
    "$gt": _RULES["greater"],
    "$gte": _RULES["greater_or_equal"],
    "$lt": _RULES["less"],
    "$lte": _RULES["less_or_equal"],
}

Predicate = Callable[[dict[str, Any]], bool]


def _always(doc: dict[str, Any]) -> bool:
    return True


def _refuse(message: str) -> Predicate:
    """A predicate for an invalid filter part: it raises when (and only when) it is evaluated."""

    def refuse(doc: dict[str, Any]) -> bool:
        raise ValueError(message)

    return refuse


def compile_filter(flt: Any) -> Predicate:
    """A predicate equivalent to ``match_filter(flt, doc)``, with the filter's structure parsed only once."""
    if not flt:
        return _always
    if not isinstance(flt, dict):
        return _refuse("filter must be an object")
    if "field" in flt:
        field, op = flt["field"], flt.get("operator")
        if op == "exist":
            return lambda doc: field in doc
        if op == "not_exist":
            return lambda doc: field not in doc
        check = _RULES.get(str(op))
        if check is None:
            return _refuse(f"unsupported filter operator: {op}")
        value = flt.get("value")
        return lambda doc: bool(check(doc.get(field), value))
    rules = flt.get("rules")
    if not isinstance(rules, list):
        return _refuse("filter needs rules")
    cond = str(flt.get("condition", "AND")).upper()
    if cond not in ("AND", "OR"):
        return _refuse(f"unsupported filter condition: {cond}")
    parts = [compile_filter(r) for r in rules]
    if len(parts) == 1:
        return parts[0]  # all()/any() of one rule is that rule
    if cond == "AND":
        return lambda doc: all(p(doc) for p in parts)
    return lambda doc: any(p(doc) for p in parts)


def match_filter(flt: Any, doc: dict[str, Any]) -> bool:
    """True when ``doc`` satisfies a CMDB query filter; an empty/None filter matches everything."""
    return compile_filter(flt)(doc)


def match_condition(cond: Any, doc: dict[str, Any]) -> bool:
    """True when ``doc`` satisfies a legacy condition (Mongo-style $eq/$ne/$in/$nin/$gt/$gte/$lt/$lte)."""
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
