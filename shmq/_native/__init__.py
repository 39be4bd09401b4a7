"""The compiled ring engine. Import it through here for a useful error if it is missing."""

from __future__ import annotations

try:
    from shmq._native import _ring
except ImportError as exc:  # pragma: no cover - exercised by a subprocess test
    raise ImportError(
        "shmq's C extension (shmq._native._ring) is not built. From a source checkout run "
        "`scripts/test` or `pip install -e .` (needs gcc and the Python headers); "
        "for an in-place build: `python setup.py build_ext --inplace`. "
        f"Original error: {exc}"
    ) from exc

__all__ = ["_ring"]
