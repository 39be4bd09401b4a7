"""Every example under examples/ runs end to end and leaves no segment behind."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from shmq.testing import list_segments

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((ROOT / "examples").rglob("*.py"))

pytestmark = pytest.mark.timeout(120)


def test_examples_exist() -> None:
    """The examples folder is not silently empty (the parametrized test would pass vacuously)."""
    assert len(EXAMPLES) >= 3


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: str(p.relative_to(ROOT)))
def test_example_runs(path: Path) -> None:
    """The example exits 0, and the segments it created are gone afterwards."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with subprocess.Popen(
        [sys.executable, str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=ROOT,
    ) as proc:
        try:
            stdout, stderr = proc.communicate(timeout=100)
        finally:
            proc.kill()
    assert proc.returncode == 0, f"{path.name} failed:\n{stdout}\n{stderr}"
    assert stderr == "", stderr
    # unique_name() embeds the creating pid, so these are exactly the example's own segments.
    leaked = [n for n in list_segments() if f"-{proc.pid}-" in n]
    assert not leaked, f"{path.name} left segments behind: {sorted(leaked)}"
