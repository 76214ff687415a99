"""A new user's path: a fresh virtualenv, the README's quickstart commands copied literally.

The quickstart is the fenced block after the line ``<!-- quickstart -->`` in README.md: exactly two commands,
one that installs this repository and runs ``rwatch demo``, and the test command (the one CI runs, checked
by tests/test_repo.py). The first runs here as written, in bash, from a copy of the working tree (so the
build leaves nothing in it), with the fresh virtualenv first on PATH: the events must reach the mirror within
10 s of the install finishing, the status page must answer, and Ctrl-C must exit 0. The second is this very
suite, so it is not run (that would recurse): the tools it calls must be installed by the first.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.integration.test_demo import EXIT_WITHIN, REPO, DemoProcess, check_running_demo, clean_env
from tests.test_repo import readme_test_command

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

# What a clone has that a build must not see or that is not the project's: the copy leaves these out.
NOT_COPIED = shutil.ignore_patterns(
    ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".mypy_cache", ".pytest_cache", ".ruff_cache",
    ".hypothesis", "results", "*.db", "*.db-wal", "*.db-shm",
)


def readme_quickstart() -> list[str]:
    text = (REPO / "README.md").read_text()
    match = re.search(r"^<!-- quickstart -->\n```(?:sh|bash|console)?\n(.*?)\n```", text, flags=re.M | re.S)
    assert match, "README.md has no fenced block after a line <!-- quickstart -->"
    return [line for line in match.group(1).splitlines() if line.strip() and not line.lstrip().startswith("#")]


def test_readme_quickstart_is_the_demo_and_the_test_command() -> None:
    commands = readme_quickstart()
    assert len(commands) == 2, commands
    demo, tests = commands
    assert re.search(r"\brwatch demo\b", demo), demo
    assert re.search(r"\bpip install\b", demo), "the quickstart must install rwatch before running it"
    assert tests == readme_test_command()


def test_new_user_fresh_virtualenv_quickstart_demo(tmp_path: Path) -> None:
    demo_command, test_command = readme_quickstart()
    repo = tmp_path / "rwatch"
    shutil.copytree(REPO, repo, ignore=NOT_COPIED)

    began = time.monotonic()
    subprocess.run([sys.executable, "-m", "venv", str(tmp_path / "venv")], check=True, timeout=300)
    made_venv = time.monotonic() - began
    venv_bin = tmp_path / "venv" / "bin"
    scratch = tmp_path / "tmp"  # the demo's own temporary folder lands here, not in /tmp
    scratch.mkdir()
    env = clean_env(PATH=f"{venv_bin}{os.pathsep}{os.environ.get('PATH', '')}", VIRTUAL_ENV=str(tmp_path / "venv"),
                    TMPDIR=str(scratch))
    env.pop("PYTHONHOME", None)

    run = DemoProcess([demo_command], cwd=repo, env=env, shell=True)
    try:
        # The clock for "within 10 s" starts when pip is done (its last line; the banner if pip was told -q).
        run.expect(r"^(Successfully installed .*\brwatch-|rwatch demo: )", timeout=600)
        installed = time.monotonic()
        url, mirror, first = check_running_demo(run, since=installed)
        assert mirror.is_relative_to(scratch), mirror
        print(f"new user: venv {made_venv:.1f} s, `{demo_command}`: install {installed - run.started:.1f} s, "
              f"hosts in the mirror {first:.2f} s after the install finished, status page {url}")
        if run.proc.poll() is None:  # the command runs until Ctrl-C (unless it says --seconds)
            run.interrupt()
        assert run.wait(EXIT_WITHIN) == 0, run.output()
    finally:
        run.kill()
    assert "Traceback" not in run.output()
    assert (venv_bin / "rwatch").exists()

    # The test command is this suite: not run here, but everything it calls must be in the fresh virtualenv.
    for part in test_command.split("&&"):
        program = part.split()[0]
        assert (venv_bin / program).exists(), f"{program} (from {test_command!r}) is not installed by {demo_command!r}"
    check = subprocess.run([str(venv_bin / "python"), "-m", "pytest", "--version"], capture_output=True, text=True,
                           env=env, timeout=120)
    assert check.returncode == 0, check.stderr
