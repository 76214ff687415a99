"""What the ESB's components pass on to CMDB (cmdb-watch-api §10.3): each component's own form, not the body.

``search_business``, ``search_set`` and ``search_module`` are hand-written Django components: a form keeps
the fields it declares and drops the rest silently, so a ``filter`` never reaches CMDB (keyset paging by
``filter`` returns the first page every time). ``search_module`` is rewritten to
``/api/v3/findmany/module/biz/{bk_biz_id}``, where a ``bk_set_id`` of 0 (or none) means every set. The
generic components (``resource_watch``, ``list_hosts_without_biz``, ``find_host_biz_relations``,
``search_cloud_area``, ``list_business_set``, ``list_project``, …) pass the body on as it is. ESB builds
its own CMDB headers (the supplier account from the body's ``bk_supplier_account``, default ``"0"``): a
header the caller sends is not forwarded, except ``X-Bk-Tenant-Id`` on a multi-tenant gateway.
"""

from __future__ import annotations

from typing import Any, Final

# The fields each hand-written component's form declares (apisv2/cc/<name>.py); nothing else is forwarded.
FORMS: Final[dict[str, tuple[str, ...]]] = {
    "search_business": ("bk_supplier_account", "fields", "condition", "biz_property_filter", "page"),
    "search_set": ("bk_supplier_account", "bk_biz_id", "fields", "condition", "page"),
    "search_module": ("bk_supplier_account", "bk_biz_id", "bk_set_id", "fields", "condition", "page"),
}
# The ESB's own parameters: they authenticate the caller and are not part of the CMDB request.
CREDENTIALS: Final = frozenset({"bk_app_code", "bk_app_secret", "bk_token", "bk_username"})
DEFAULT_SUPPLIER_ACCOUNT: Final = "0"


def forward(component: str, body: dict[str, Any]) -> dict[str, Any]:
    """The parameters CMDB receives when ``component`` is called through ESB with ``body``."""
    form = FORMS.get(component)
    if form is None:
        return {k: v for k, v in body.items() if k not in CREDENTIALS}
    params = {k: body[k] for k in form if k in body}
    params["bk_supplier_account"] = str(body.get("bk_supplier_account") or DEFAULT_SUPPLIER_ACCOUNT)
    return params
