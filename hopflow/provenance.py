"""Provenance: package versions and the code's git commit (computed once per process), and the walk from a result
back through the runs that made its inputs to its source."""

from __future__ import annotations

import subprocess
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from hopflow.models import Run, Source
from hopflow.registry import get_stage

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


def trace_chain(session: Session, run_id: int) -> list[dict[str, Any]]:
    """The provenance chain of a run: its run row, then its input's producing run, ... down to the source."""
    chain: list[dict[str, Any]] = []
    run = session.get(Run, run_id)
    if run is None:
        raise LookupError(f"no run {run_id}")
    while run is not None:
        stage = get_stage(run.stage)
        chain.append({"run": run.id, "stage": run.stage, "state": run.state,
                      "input": f"{stage.input_table}#{run.input_id}",
                      "parameters": run.parameters, "flow_run": run.flow_run_id, "host": run.host,
                      "started": run.started_at, "finished": run.finished_at, "reused_run": run.reused_run_id,
                      "versions": {k: v for k, v in (run.versions or {}).items() if v}})
        producer = stage.producer
        if run.stage == "import":
            source = session.get(Source, run.input_id)
            if source is not None:
                chain.append({"source": source.id, "kind": source.kind, "location": source.location,
                              "key": source.key, **{k: v for k, v in (source.meta or {}).items() if v}})
            break
        run = producer(session, run.input_id) if producer else None
    return chain + _archive_lines(session, chain)


def _archive_lines(session: Session, chain: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One line per archive the chain's runs were imported from (none for runs made here)."""
    from hopflow.archive import archive_line

    lines: dict[str, dict[str, Any]] = {}
    for link in chain:
        if "run" in link:
            run = session.get(Run, link["run"])
            line = archive_line(session, run) if run is not None else None
            if line is not None:
                lines.setdefault(line["archive"] + line["sha256"], line)
    return list(lines.values())
