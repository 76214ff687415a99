"""The Zabbix API client against a scripted JSON-RPC endpoint: version-dependent auth and fields, error classes,
re-login, call counting, secrets kept out of repr and logs. (tests/downstream drives the real Zabbix 6.0.)"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from rwatch.errors import PermanentError, TransientError
from rwatch.sinks.zabbix.api import (
    AlreadyExists,
    ApiVersion,
    DoesNotExist,
    ZabbixApi,
    ZabbixApiError,
    ZabbixUnavailable,
    classify,
)

Answer = Callable[[dict[str, Any], web.Request], web.Response]


class Endpoint:
    """A JSON-RPC endpoint answering ``apiinfo.version`` with ``version`` and the rest from ``answers``."""

    def __init__(self, version: str) -> None:
        self.version = version
        self.seen: list[tuple[dict[str, Any], dict[str, str]]] = []
        self.answers: dict[str, Answer] = {}

    async def handle(self, request: web.Request) -> web.Response:
        body = orjson.loads(await request.read())
        self.seen.append((body, dict(request.headers)))
        if body["method"] == "apiinfo.version":
            return web.json_response({"jsonrpc": "2.0", "result": self.version, "id": body["id"]})
        if body["method"] == "user.login":
            return web.json_response({"jsonrpc": "2.0", "result": f"session-{len(self.seen)}", "id": body["id"]})
        answer = self.answers.get(body["method"])
        if answer is not None:
            return answer(body, request)
        return web.json_response({"jsonrpc": "2.0", "result": [], "id": body["id"]})


def error(code: int, message: str, data: str) -> Answer:
    return lambda body, _: web.json_response(
        {"jsonrpc": "2.0", "error": {"code": code, "message": message, "data": data}, "id": body["id"]})


@pytest.fixture
async def serve() -> AsyncIterator[Callable[[str], Any]]:
    servers: list[TestServer] = []

    async def start(version: str) -> tuple[Endpoint, str]:
        endpoint = Endpoint(version)
        app = web.Application()
        app.router.add_post("/api_jsonrpc.php", endpoint.handle)
        server = TestServer(app, host="127.0.0.1")
        await server.start_server()
        servers.append(server)
        return endpoint, str(server.make_url("/api_jsonrpc.php"))

    yield start
    for server in servers:
        await server.close()


async def test_6_0_sends_the_token_in_the_body_and_selects_groups(serve: Any) -> None:
    endpoint, url = await serve("6.0.14")
    async with ZabbixApi(url, token="s3cret-token") as api:
        await api.call("host.get", {})
        assert api.select_groups(["groupid"]) == {"selectGroups": ["groupid"]}
        assert api.groups_of({"groups": [{"groupid": "1"}]}) == [{"groupid": "1"}]
        assert api.proxy_fields("7") == {"proxy_hostid": "7"}
        assert api.host_output()[-1] == "proxy_hostid"
    version_call, get_call = endpoint.seen
    assert "auth" not in version_call[0]  # Zabbix refuses auth on apiinfo.version
    assert get_call[0]["auth"] == "s3cret-token" and "Authorization" not in get_call[1]
    assert (api.total_calls, api.write_calls) == (2, 0)


@pytest.mark.parametrize(("version", "groups_key", "proxy"), [
    ("6.4.10", "hostgroups", {"proxy_hostid": "7"}),
    ("7.0.3", "hostgroups", {"monitored_by": 1, "proxyid": "7"}),
])
async def test_6_4_and_7_send_a_bearer_header_and_use_their_field_names(
        serve: Any, version: str, groups_key: str, proxy: dict[str, Any]) -> None:
    endpoint, url = await serve(version)
    async with ZabbixApi(url, token="s3cret-token") as api:
        await api.call("host.get", {})
        assert api.select_groups(["groupid"]) == {"selectHostGroups": ["groupid"]}
        assert api.groups_of({groups_key: [{"groupid": "1"}]}) == [{"groupid": "1"}]
        assert api.proxy_fields("7") == proxy
    body, headers = endpoint.seen[-1]
    assert "auth" not in body and headers["Authorization"] == "Bearer s3cret-token"


async def test_a_password_logs_in_once_and_again_when_the_session_expired(
        serve: Any, capsys: pytest.CaptureFixture[str]) -> None:
    endpoint, url = await serve("6.0.14")
    expired = [error(-32602, "Invalid params.", "Session terminated, re-login, please.")]
    endpoint.answers["host.get"] = lambda body, req: (
        expired.pop()(body, req) if expired else web.json_response({"jsonrpc": "2.0", "result": [1], "id": body["id"]}))
    api = ZabbixApi(url, username="ops", password="pa55word")
    assert "pa55word" not in repr(api)
    async with api:
        assert await api.call("host.get", {}) == [1]
    methods = [body["method"] for body, _ in endpoint.seen]
    assert methods == ["apiinfo.version", "user.login", "host.get", "user.login", "host.get", "user.logout"]
    assert endpoint.seen[4][0]["auth"] == "session-4"
    assert "pa55word" not in capsys.readouterr().out


async def test_transport_failures_5xx_and_non_json_answers_are_transient(serve: Any) -> None:
    endpoint, url = await serve("6.0.14")
    endpoint.answers["a.get"] = lambda body, _: web.Response(status=502, text="bad gateway")
    endpoint.answers["b.get"] = lambda body, _: web.Response(text="<b>Fatal error</b>: out of memory")
    endpoint.answers["c.get"] = error(-32500, "Application error.", "SQL statement execution has failed \"...\"")
    async with ZabbixApi(url, token="t") as api:
        for method in ("a.get", "b.get", "c.get"):
            with pytest.raises(ZabbixUnavailable) as caught:
                await api.call(method, {})
            assert isinstance(caught.value, TransientError) and caught.value.method == method
    with pytest.raises(ZabbixUnavailable):
        async with ZabbixApi("http://127.0.0.1:9/api_jsonrpc.php", token="t", timeout=2):
            pass


async def test_error_answers_are_outcomes_or_permanent_errors_naming_the_method(serve: Any) -> None:
    endpoint, url = await serve("6.0.14")
    endpoint.answers["hostgroup.create"] = error(-32602, "Invalid params.", 'Host group "BK" already exists.')
    endpoint.answers["host.delete"] = error(-32500, "Application error.",
                                            "No permissions to referred object or it does not exist!")
    endpoint.answers["host.create"] = error(-32602, "Invalid params.", 'Invalid parameter "/1/host": cannot be empty.')
    endpoint.answers["x.get"] = lambda body, _: web.Response(status=404, text="not found")
    async with ZabbixApi(url, token="t") as api:
        with pytest.raises(AlreadyExists):
            await api.call("hostgroup.create", {"name": "BK"})
        with pytest.raises(DoesNotExist):
            await api.call("host.delete", ["1"])
        with pytest.raises(ZabbixApiError) as caught:
            await api.call("host.create", [{}])
        assert isinstance(caught.value, PermanentError)
        assert caught.value.fields()["method"] == "host.create" and "cannot be empty" in str(caught.value)
        with pytest.raises(ZabbixApiError, match="HTTP 404"):
            await api.call("x.get", {})
        assert api.write_calls == 3


def test_classify_and_version_without_a_server() -> None:
    assert isinstance(classify("host.massupdate", -32500, "Application error.",
                               "You do not have permission to perform this operation."), DoesNotExist)
    assert type(classify("host.update", -32602, "Invalid params.", "Incorrect value.")) is ZabbixApiError
    version = ApiVersion.parse("6.2.1")
    assert (version.bearer, version.groups_key, version.proxy_key) == (False, "hostgroups", "proxy_hostid")
    assert ApiVersion.parse("7.2.0").proxy_name_key == "name"
    with pytest.raises(ZabbixApiError):
        ApiVersion.parse("banana")
    with pytest.raises(ValueError, match="token"):
        ZabbixApi("http://x", username="u")
