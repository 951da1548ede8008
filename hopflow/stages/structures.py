"""The import stage: source records (files, bundled entries, MP ids) -> sanitized, deduplicated structures."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Self

from sqlalchemy.orm import Session

from hopflow.models import Run, Source, Structure
from hopflow.registry import Stage, StageParams, register
from hopflow.settings import Settings
from hopflow.stages.common import BY_ID, item_query, rows_by_id


@dataclass(frozen=True)
class ImportParams(StageParams):
    """What an import depends on: the migrating ion, the largest structure accepted, the sanitize revision."""

    ion: str
    max_sites: int
    sanitize: int = 1

    @classmethod
    def from_settings(cls, settings: Settings) -> Self:
        return cls(ion=settings.migrating_ion, max_sites=settings.max_sites)


def _inputs() -> Any:
    return item_query(Source, Source.kind, Source.key)


def _load(session: Session, ids: Sequence[int]) -> dict[int, Any]:
    return {s.id: {"kind": s.kind, "key": s.key, "location": s.location, "payload": s.payload,
                   "format": s.format, "meta": s.meta or {}} for s in rows_by_id(session, Source, ids)}


def _link(session: Session, run: Run, structure_id: int | None) -> None:
    source = session.get(Source, run.input_id)
    if source is not None and source.structure_id is None:
        source.structure_id = structure_id


def _store(session: Session, run: Run, result: Any) -> None:
    if result.duplicate_of is not None:
        _link(session, run, result.duplicate_of)
        return
    source = session.get(Source, run.input_id)
    s = result.sanitized
    row = Structure(
        formula=s.formula, chemsys=s.chemsys, spacegroup=s.spacegroup_symbol, spacegroup_number=s.spacegroup_number,
        nsites=s.nsites, density=s.density, volume=s.volume,
        oxidation_states=dict(s.oxidation_states) if s.oxidation_states else None,
        oxidation_method=s.oxidation_method, fingerprint=s.fingerprint, structure=s.structure.as_dict(),
        run_id=run.id, energy_above_hull=(source.meta or {}).get("energy_above_hull") if source else None,
    )
    session.add(row)
    session.flush()
    _link(session, run, row.id)


def _reuse(session: Session, run: Run, old: Run) -> None:
    """A source whose content was imported before points at that import's structure (no second structure row)."""
    reused = session.get(Source, old.input_id)
    _link(session, run, reused.structure_id if reused else None)


IMPORT = register(Stage(
    name="import",
    description="Parse, sanitize and deduplicate source records into structures.",
    input_table="sources",
    output_table="structures",
    inputs=_inputs,
    params=ImportParams,
    load=_load,
    store=_store,
    reuse=_reuse,
    fingerprint=lambda c: c.key,
    rankers=(BY_ID,),
    default_ranker="id",
    entrypoint="flows/import_structures.py:import_structures",
    resources="local",
    batch_size=50,
    retry_limit=2,
    lease_seconds=600,
    time_limit_seconds=120,
))
