"""The built-in stages: one registry entry each (input query, parameters, rankers, cutoffs, load, store)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from hopflow.models import Run, RunState, Source, Structure, SyntheticItem, SyntheticResult
from hopflow.registry import Ranker, Reused, Stage, register
from hopflow.settings import Settings

BY_ID = Ranker("id", "oldest input first", expression=lambda c: c.item_id)


# ---------------------------------------------------------------- import: sources -> structures


def _import_inputs() -> Any:
    return select(Source.id.label("item_id"), Source.kind, Source.key)


def _import_parameters(settings: Settings) -> dict[str, Any]:
    return {"ion": settings.migrating_ion, "max_sites": settings.max_sites, "sanitize": 1}


def _import_load(session: Session, ids: Sequence[int]) -> dict[int, Any]:
    rows = session.scalars(select(Source).where(Source.id.in_(list(ids))))
    return {s.id: {"kind": s.kind, "key": s.key, "location": s.location, "payload": s.payload,
                   "format": s.format, "meta": s.meta or {}} for s in rows}


def _import_store(session: Session, run: Run, result: Any) -> None:
    source = session.get(Source, run.input_id)
    if isinstance(result, Reused):
        reused = session.get(Source, result.run.input_id)
        structure_id = reused.structure_id if reused else None
    elif result.duplicate_of is not None:
        structure_id = result.duplicate_of
    else:
        s = result.sanitized
        row = Structure(
            formula=s.formula, chemsys=s.chemsys, spacegroup=s.spacegroup_symbol, spacegroup_number=s.spacegroup_number,
            nsites=s.nsites, density=s.density, volume=s.volume, oxidation_states=dict(s.oxidation_states) if s.oxidation_states else None,
            oxidation_method=s.oxidation_method, fingerprint=s.fingerprint, structure=s.structure.as_dict(),
            run_id=run.id, energy_above_hull=(source.meta or {}).get("energy_above_hull") if source else None,
        )
        session.add(row)
        session.flush()
        structure_id = row.id
    if source is not None and source.structure_id is None:
        source.structure_id = structure_id


IMPORT = register(Stage(
    name="import",
    description="Parse, sanitize and deduplicate source records into structures.",
    input_table="sources",
    output_table="structures",
    inputs=_import_inputs,
    parameters=_import_parameters,
    load=_import_load,
    store=_import_store,
    fingerprint=lambda c: c.key,
    rankers=(BY_ID,),
    default_ranker="id",
    flow="import-structures",
    deployment="import-structures/import-structures",
    extra={"flow_function": "flows.import_structures:import_structures"},
    resources="local",
    batch_size=50,
    retry_limit=2,
    lease_seconds=600,
))


# ---------------------------------------------------------------- synthetic: test machinery, no science


def _synthetic_inputs() -> Any:
    return select(SyntheticItem.id.label("item_id"), SyntheticItem.priority, SyntheticItem.fingerprint)


def _synthetic_load(session: Session, ids: Sequence[int]) -> dict[int, Any]:
    rows = session.scalars(select(SyntheticItem).where(SyntheticItem.id.in_(list(ids))))
    attempts = dict(session.execute(select(Run.input_id, Run.attempts).where(
        Run.stage == "synthetic", Run.input_id.in_(list(ids)), Run.state.in_(RunState.LIVE))).all())
    return {r.id: {"item_id": r.id, "cpu_ms": r.cpu_ms, "sleep_ms": r.sleep_ms, "failure": r.failure,
                   "fail_attempts": r.fail_attempts, "attempt": attempts.get(r.id, 1)} for r in rows}


def _synthetic_store(session: Session, run: Run, result: Any) -> None:
    if isinstance(result, Reused):
        old = session.scalars(select(SyntheticResult).where(SyntheticResult.run_id == result.run.id)).one()
        session.add(SyntheticResult(run_id=run.id, item_id=run.input_id, value=old.value, elapsed_s=0.0))
        return
    session.add(SyntheticResult(run_id=run.id, item_id=run.input_id, value=result.value, elapsed_s=result.elapsed_s))


SYNTHETIC = register(Stage(
    name="synthetic",
    description="TEST MACHINERY: burns CPU or sleeps per item and fails on request; exercises queue and orchestration.",
    input_table="synthetic_items",
    output_table="synthetic_results",
    inputs=_synthetic_inputs,
    parameters=lambda settings: {"engine": "synthetic", "version": 1},
    load=_synthetic_load,
    store=_synthetic_store,
    fingerprint=lambda c: c.fingerprint,
    rankers=(BY_ID, Ranker("priority", "lowest priority value first", expression=lambda c: c.priority)),
    default_ranker="priority",
    flow="synthetic",
    deployment="synthetic/synthetic",
    extra={"flow_function": "flows.synthetic:synthetic"},
    resources="local",
    batch_size=20,
    retry_limit=3,
    lease_seconds=300,
))
