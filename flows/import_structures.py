"""Import stage flow: parse and sanitize source records on Dask, deduplicate against stored structures, store."""

from __future__ import annotations

from typing import Any

from prefect import flow, task
from sqlalchemy.orm import Session

from hopflow.flows.common import stage_run_name, stage_task_runner
from hopflow.flows.runner import StageReport, run_stage
from hopflow.models import Run
from hopflow.sources import stored_with_formula
from hopflow.stages.structures import ImportParams
from hopflow.tasks.structures import RawInput, SanitizedStructure, SourceMetadata, find_duplicate, parse_input, sanitize


class ImportOutcome:
    """A sanitized structure and, when it matches a stored one, that structure's id."""

    def __init__(self, sanitized: SanitizedStructure, duplicate_of: int | None) -> None:
        self.sanitized = sanitized
        self.duplicate_of = duplicate_of


@task(name="sanitize-source")
def sanitize_source(source: dict[str, Any], params: ImportParams) -> SanitizedStructure:
    """Parse one source record and sanitize its structure."""
    meta = dict(source["meta"])
    read_error = meta.pop("read_error", None)
    known = {k: meta.get(k) for k in SourceMetadata.__dataclass_fields__}
    raw = RawInput(kind=source["kind"], key=source["key"], location=source["location"], payload=source["payload"],
                   format=source["format"], metadata=SourceMetadata(**known), read_error=read_error)
    return sanitize(parse_input(raw, max_sites=params.max_sites), ion=params.ion, max_sites=params.max_sites,
                    name=raw.location)


def deduplicate(session: Session, run: Run, sanitized: SanitizedStructure) -> ImportOutcome:
    """Match against stored structures of the same formula (StructureMatcher, default tolerances)."""
    return ImportOutcome(
        sanitized, find_duplicate(sanitized.structure, stored_with_formula(session, sanitized.formula))
    )


@flow(name="import-structures", flow_run_name=lambda: stage_run_name("import"), task_runner=stage_task_runner("import"))
def import_structures(run_ids: list[int] | None = None) -> StageReport:
    """Import the claimed source records (or every queued one when `run_ids` is None)."""
    return run_stage("import", run_ids, sanitize_source, postprocess=deduplicate)
