"""Batch mode: run a stage's flow in this process on every eligible item (or the top N), and import raw inputs end
to end; what `hopflow run`, `hopflow import` and `hopflow screen` call. No Prefect server or worker is needed."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from prefect import Flow
from sqlalchemy import select

from hopflow import queue
from hopflow.db import session_scope
from hopflow.flows.common import batch_flow, share_temporary_server
from hopflow.models import Structure
from hopflow.registry import get_stage
from hopflow.sources import import_outcomes, register_sources


def stage_flow(stage_name: str) -> Flow[..., Any]:
    """The flow of a built-in stage; only that stage's flow module is imported (each pulls in its science)."""
    match get_stage(stage_name).name:
        case "import":
            from hopflow.flows.import_structures import import_structures as found
        case "synthetic":
            from hopflow.flows.synthetic import synthetic as found
        case "pathways":
            from hopflow.flows.pathways import pathways as found
        case "features":
            from hopflow.flows.features import features as found
        case "vacancies":
            from hopflow.flows.vacancies import vacancies as found
        case "estimates":
            from hopflow.flows.estimates import estimates as found
        case "neb":
            from hopflow.flows.neb import neb as found
        case other:
            raise KeyError(f"stage {other!r} has no flow in hopflow.flows")
    return found


def run_batch(stage_name: str, parameters: dict[str, Any] | None = None, limit: int | None = None) -> Any:
    """Run a stage's flow on every eligible item, or on the top `limit` in rank order; returns its StageReport."""
    flow_fn = batch_flow(stage_name, stage_flow(stage_name))
    share_temporary_server()
    if limit is not None:
        claimed = queue.claim(stage_name, limit, parameters=parameters, refresh=True)
        return flow_fn(run_ids=[c.id for c in claimed])
    return flow_fn(run_ids=None, **({"parameters": parameters} if parameters else {}))


def import_raw_inputs(raws: Sequence[Any], *, ion: str | None = None) -> list[dict[str, Any]]:
    """Import raw inputs (already-imported sources are not redone); per input, in order: its outcome under this
    parameter set (the migrating ion `ion`, else the setting), its error, and whether it gave a new structure."""
    stage = get_stage("import")
    params = {"ion": ion} if ion else None
    phash = queue.param_hash(queue.stage_parameters(stage, params))
    with session_scope(write=True) as session:
        source_ids = register_sources(session, raws)
        before = set(session.scalars(select(Structure.id)))
        claimed = queue.claim_ids(session, stage, source_ids, parameters=params, only_named=True)
    if claimed:
        share_temporary_server()
        stage_flow("import")(run_ids=[c.id for c in claimed])
    with session_scope() as session:
        outcomes = import_outcomes(session, source_ids, phash, [raw.location for raw in raws])
    for o in outcomes:  # the same file named twice is one new structure
        o["new"] = o["structure_id"] is not None and o["structure_id"] not in before
        if o["new"]:
            before.add(o["structure_id"])
    return outcomes
