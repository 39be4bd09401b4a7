"""The suite's own leak check works: a session that leaves a segment behind fails, and the
segment is removed anyway."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from shmq.testing import SESSION_ENV, list_segments

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.timeout(120)

LEAKY = """
import shmq
from shmq.testing import unique_name

def test_leaks_a_segment():
    shmq.Queue(unique_name("test"), create=True, capacity=4096).close()  # never unlinked
"""

TIDY = """
import shmq
from shmq.testing import unique_name

def test_cleans_up():
    with shmq.Queue(unique_name("test"), create=True, capacity=4096) as q:
        q.put(b"x")
"""


def run_session(tmp_path: Path, body: str) -> subprocess.CompletedProcess[str]:
    """Run a one-test pytest session with this suite's conftest, in a fresh process."""
    shutil.copy(ROOT / "tests" / "conftest.py", tmp_path / "conftest.py")
    (tmp_path / "test_case.py").write_text(body)
    env = {k: v for k, v in os.environ.items() if k != SESSION_ENV}  # the child makes its own token
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=100,
        cwd=tmp_path,
        env=env,
    )


def test_a_leaking_session_fails_and_is_cleaned(tmp_path: Path) -> None:
    result = run_session(tmp_path, LEAKY)
    assert result.returncode != 0, result.stdout
    assert "1 passed" in result.stdout  # the test itself passed: the leak check failed the run
    found = re.search(r"leaked 1 shared-memory segment\(s\): \['([^']+)'\]", result.stdout)
    assert found, result.stdout
    # (only that one: other sessions on the machine may hold segments of their own meanwhile)
    assert found.group(1) not in list_segments()


def test_a_tidy_session_passes(tmp_path: Path) -> None:
    result = run_session(tmp_path, TIDY)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "leaked" not in result.stdout
