"""``rwatch sim`` flags for the deployment modes reach ``SimOptions`` (and bad values are usage errors)."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from rwatch.cli import app
from rwatch.sim import server
from rwatch.sim.parts import SimOptions


@pytest.fixture
def captured(monkeypatch: pytest.MonkeyPatch) -> list[SimOptions]:
    seen: list[SimOptions] = []

    async def fake_serve(options: SimOptions, stop: object, on_started: object = None) -> None:
        seen.append(options)

    monkeypatch.setattr(server, "serve", fake_serve)
    return seen


def test_mode_flags_reach_the_options(captured: list[SimOptions]) -> None:
    args = [
        "sim", "--listen", "127.0.0.1:0", "--deny-api", "resource_watch", "--deny-api", "search_set",
        "--tenant-mode", "multi", "--tenant", "acme", "--app-tenant", "acme", "--gateway-error-rate", "0.05",
        "--hide-biz", "2", "--hide-biz", "7",
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    [options] = captured
    assert options.denied_apis == frozenset({"resource_watch", "search_set"})
    assert (options.tenant_mode, options.tenant, options.app_tenant) == ("multi", "acme", "acme")
    assert options.gateway_error_rate == 0.05
    assert options.hidden_bizs == frozenset({2, 7})


def test_defaults(captured: list[SimOptions]) -> None:
    assert CliRunner().invoke(app, ["sim", "--listen", "127.0.0.1:0"]).exit_code == 0
    [options] = captured
    assert options.denied_apis == frozenset() and options.hidden_bizs == frozenset()
    assert (options.tenant_mode, options.tenant, options.app_tenant) == ("single", "default", None)
    assert options.gateway_error_rate == 0.0


@pytest.mark.parametrize(
    ("flag", "value"),
    [("--deny-api", "watch"), ("--tenant-mode", "both"), ("--gateway-error-rate", "1.5"), ("--hide-biz", "x")],
)
def test_bad_values_are_usage_errors(captured: list[SimOptions], flag: str, value: str) -> None:
    result = CliRunner().invoke(app, ["sim", flag, value])
    assert result.exit_code == 2
    assert not captured
