"""The repository's promises about itself: CI runs the README's test command; the image runs `rwatch`."""

from __future__ import annotations

import re
import subprocess
import tomllib
from pathlib import Path

from tests.entrypoint import RWATCH

REPO = Path(__file__).resolve().parents[1]


def readme_test_command() -> str:
    text = (REPO / "README.md").read_text()
    match = re.search(r"<!-- test-command -->\n```sh\n(.+)\n```", text)
    assert match, "README.md lost its marked test command"
    return match.group(1)


def test_ci_runs_the_readme_test_command() -> None:
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    assert readme_test_command() in ci


def test_dockerfile_entrypoint_is_the_rwatch_command() -> None:
    docker = (REPO / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["rwatch"]' in docker
    assert 'CMD ["run"]' in docker
    assert 'CMD ["rwatch", "health"]' in docker
    # The image's `rwatch` is the console script pyproject.toml declares; the process tests start that same
    # script (tests/entrypoint.py), installed beside this interpreter, and it answers.
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert pyproject["project"]["scripts"] == {"rwatch": "rwatch.cli:main"}
    assert Path(RWATCH).name == "rwatch" and Path(RWATCH).is_file(), RWATCH
    assert "rwatch.cli" in Path(RWATCH).read_text()
    out = subprocess.run([RWATCH, "version"], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip()
