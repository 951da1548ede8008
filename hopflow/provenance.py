"""Provenance helpers: package versions and the code's git commit, computed once per process."""

from __future__ import annotations

import subprocess
from functools import lru_cache
from importlib import metadata
from pathlib import Path

TRACKED_PACKAGES = ("hopflow", "pymatgen", "pymatgen-analysis-diffusion", "matminer", "custodian", "chgnet",
                    "torch", "ase", "prefect", "dask", "sqlalchemy")


@lru_cache(maxsize=1)
def git_commit() -> str | None:
    """The git commit of the hopflow checkout, when it runs from one."""
    root = Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


@lru_cache(maxsize=1)
def versions() -> dict[str, str | None]:
    """Versions of hopflow and the science/orchestration packages that shape results."""
    found: dict[str, str | None] = {}
    for name in TRACKED_PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    found["hopflow_git"] = git_commit()
    return found
