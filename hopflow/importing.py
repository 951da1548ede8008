"""Import raw inputs end to end in batch mode: register sources, claim their import runs, run the import flow."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import select

from hopflow import queue
from hopflow.db import session_scope
from hopflow.models import Structure
from hopflow.registry import get_stage
from hopflow.sources import import_outcomes, register_sources


def import_raw_inputs(raws: Sequence[Any], *, ion: str | None = None) -> list[dict[str, Any]]:
    """Import raw inputs (already-imported sources are not redone); per input, in order: its outcome under this
    parameter set (the migrating ion `ion`, else the setting), its error, and whether it gave a new structure."""
    from hopflow.flows.common import share_temporary_server
    from hopflow.flows.import_structures import import_structures  # the command line may call flows (batch mode)

    stage = get_stage("import")
    params = {"ion": ion} if ion else None
    phash = queue.param_hash(queue.stage_parameters(stage, params))
    with session_scope(write=True) as session:
        source_ids = register_sources(session, raws)
        before = set(session.scalars(select(Structure.id)))
        claimed = queue.claim_ids(session, stage, source_ids, parameters=params, only_named=True)
    if claimed:
        share_temporary_server()
        import_structures(run_ids=[c.id for c in claimed])
    with session_scope() as session:
        outcomes = import_outcomes(session, source_ids, phash, [raw.location for raw in raws])
    for o in outcomes:  # the same file named twice is one new structure
        o["new"] = o["structure_id"] is not None and o["structure_id"] not in before
        if o["new"]:
            before.add(o["structure_id"])
    return outcomes
