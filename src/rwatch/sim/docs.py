"""Default documents per resource, with the fields cmdb-watch-api.md §4 lists for each."""

from __future__ import annotations

from typing import Any, Final

# The numeric id field the simulator assigns for each stored resource.
ID_FIELDS: Final[dict[str, str]] = {
    "host": "bk_host_id",
    "biz": "bk_biz_id",
    "set": "bk_set_id",
    "module": "bk_module_id",
    "process": "bk_process_id",
    "object_instance": "bk_inst_id",
    "mainline_instance": "bk_inst_id",
    "biz_set": "bk_biz_set_id",
    "plat": "bk_cloud_id",
    "project": "id",
    "host_relation": "bk_host_id",
    "biz_set_relation": "bk_biz_set_id",
}
# Their cursors carry bk_inst_id as the unique key, and bk_obj_id is their sub-resource.
INST_RESOURCES: Final[frozenset[str]] = frozenset({"object_instance", "mainline_instance"})


def host_ip(host_id: int) -> str:
    return f"10.{(host_id >> 16) & 255}.{(host_id >> 8) & 255}.{host_id & 255}"


def default_doc(resource: str, new_id: int, supplier: str) -> dict[str, Any]:
    """A realistic document for a new object; the caller's fields are merged over it."""
    i = new_id
    docs: dict[str, dict[str, Any]] = {
        "host": {
            "bk_host_innerip": host_ip(i),
            "bk_host_innerip_v6": "",
            "bk_host_outerip": "",
            "bk_cloud_id": 0,
            "bk_host_name": f"host-{i:05d}",
            "bk_os_type": "1",
            "bk_os_name": "linux centos",
            "bk_agent_id": f"0200000000{i:022x}",
            "operator": "admin",
            "bk_bak_operator": "",
            "bk_cpu": 8,
            "bk_mem": 16384,
            "bk_comment": "",
        },
        "biz": {
            "bk_biz_name": f"biz-{i}",
            "bk_biz_maintainer": "admin",
            "bk_biz_productor": "admin",
            "bk_biz_tester": "",
            "bk_biz_developer": "",
            "default": 0,
            "bk_data_status": "enable",
            "time_zone": "Asia/Shanghai",
            "language": "1",
        },
        "set": {
            "bk_set_name": f"set-{i}",
            "set_template_id": 0,
            "default": 0,
            "bk_set_env": "3",
            "bk_service_status": "1",
            "bk_set_desc": "",
            "bk_capacity": None,
        },
        "module": {
            "bk_module_name": f"module-{i}",
            "service_template_id": 0,
            "service_category_id": 2,
            "set_template_id": 0,
            "default": 0,
            "host_apply_enabled": False,
            "bk_module_type": "1",
            "operator": "admin",
            "bk_bak_operator": "",
        },
        "process": {
            "bk_process_name": f"proc-{i}",
            "bk_func_name": f"proc-{i}",
            "bind_info": [],
            "user": "root",
            "work_path": "/data",
            "auto_start": False,
            "description": "",
        },
        "object_instance": {
            "bk_obj_id": "switch",
            "bk_inst_name": f"switch-{i}",
            "bk_asset_id": f"SW{i:06d}",
        },
        "mainline_instance": {"bk_obj_id": "region", "bk_inst_name": f"region-{i}"},
        "biz_set": {
            "bk_biz_set_name": f"bizset-{i}",
            "bk_biz_set_desc": "",
            "bk_biz_maintainer": "admin",
            "bk_scope": {"match_all": True},
            "default": 0,
        },
        "plat": {"bk_cloud_name": f"cloud-{i}", "bk_status": "1", "bk_cloud_vendor": None},
        "project": {
            "bk_project_id": f"{i:032x}",
            "bk_project_name": f"project-{i}",
            "bk_project_code": f"proj{i}",
            "bk_project_owner": "admin",
            "bk_project_type": "mobile_game",
            "bk_status": "enable",
            "bk_project_desc": "",
        },
    }
    doc = dict(docs.get(resource, {}))
    doc["bk_supplier_account"] = supplier
    return doc
