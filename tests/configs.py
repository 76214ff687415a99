"""TOML pieces the tests' configuration files share."""

from __future__ import annotations

from rwatch.cmdb.protocol import RESOURCES


def only(*enabled: str) -> str:
    """``[watch.resources.<r>]`` tables that follow exactly ``enabled`` (every other resource switched off)."""
    return "".join(f"[watch.resources.{r}]\nenabled = {'true' if r in enabled else 'false'}\n" for r in RESOURCES)
