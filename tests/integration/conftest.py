from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from tests.integration.harness import Setup, delete_topology


@pytest.fixture
async def setups(amqp_url: str, tmp_path: Path) -> AsyncIterator[Callable[..., Setup]]:
    """Make isolated rwatch setups; their exchanges and queues are deleted when the test is over."""
    made: list[Setup] = []

    def make(sim_url: str, resources: list[str], **kw: object) -> Setup:
        setup = Setup(tmp_path, sim_url, amqp_url, uuid.uuid4().hex[:10], resources, **kw)  # type: ignore[arg-type]
        made.append(setup)
        return setup

    yield make
    for setup in made:
        await delete_topology(setup)
