"""Packaging promises: a useful error without the extension, public exports, typing."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import shmq

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.timeout(60)


def test_import_without_extension_says_how_to_build(tmp_path: Path) -> None:
    """A source tree whose C extension was never built fails to import with build instructions."""
    shutil.copytree(ROOT / "shmq", tmp_path / "shmq", ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    result = subprocess.run(
        [sys.executable, "-c", "import shmq"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(tmp_path), "PYTHONNOUSERSITE": "1"},
        timeout=30,
    )
    assert result.returncode != 0
    assert "ImportError" in result.stderr
    assert "C extension" in result.stderr and "pip install -e ." in result.stderr, result.stderr


def test_public_exports_are_complete_and_resolvable() -> None:
    """Everything in __all__ exists, and the contract's names are all public."""
    for name in shmq.__all__:
        assert hasattr(shmq, name), name
    contract = {
        "Queue", "QueueStats", "ShmqError", "Full", "Empty", "MessageTooLarge", "NotFound",
        "AlreadyExists", "CorruptSegment", "Closed", "testing",
    }  # fmt: skip
    assert contract <= set(shmq.__all__)
    assert callable(shmq.testing.unique_name)


def test_exception_hierarchy_matches_builtins() -> None:
    """Drop-in friendliness: each shmq error is also the builtin a user would catch."""
    import queue

    assert issubclass(shmq.Full, queue.Full) and issubclass(shmq.Full, shmq.ShmqError)
    assert issubclass(shmq.Empty, queue.Empty) and issubclass(shmq.Empty, shmq.ShmqError)
    assert issubclass(shmq.MessageTooLarge, ValueError)
    assert issubclass(shmq.MessageTypeError, TypeError)
    assert issubclass(shmq.InvalidArgument, ValueError)
    assert issubclass(shmq.NotFound, FileNotFoundError)
    assert issubclass(shmq.AlreadyExists, FileExistsError)
    assert issubclass(shmq.PermissionDenied, PermissionError)
    assert issubclass(shmq.IncompatibleSegment, ValueError)
    assert issubclass(shmq.Closed, ValueError)
    for cls in (shmq.CorruptSegment, shmq.Closed, shmq.NotFound):
        assert issubclass(cls, shmq.ShmqError)


def test_package_ships_type_information() -> None:
    """py.typed and the extension's .pyi stub are part of the package."""
    assert (ROOT / "shmq" / "py.typed").exists()
    stub = (ROOT / "shmq" / "_native" / "_ring.pyi").read_text()
    for method in (
        "def put(",
        "def get(",
        "def put_many(",
        "def get_many(",
        "def put_view(",
        "def get_view(",
    ):
        assert method in stub
