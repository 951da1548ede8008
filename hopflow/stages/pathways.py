"""The pathways stage: structures -> the symmetry-distinct hops of the migrating ion, shortest first."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Self

from sqlalchemy.orm import Session

from hopflow.fingerprints import pathway_fingerprint
from hopflow.models import Pathway, Run, Structure
from hopflow.registry import Ranker, StageParams, input_column, register
from hopflow.settings import Settings
from hopflow.stages.common import BY_ID, item_query, result_stage, rows_by_id

PATHWAY_FIELDS = ("ion", "rank", "length", "start_index", "end_index", "end_image", "start_frac", "end_frac",
                  "start_cart", "end_cart", "start_label", "end_label", "multiplicity", "dimensionality",
                  "dimensionality_cumlengths", "max_hop", "max_hop_automatic", "hops_found")
"""Columns of `pathways` that hold tasks.pathways.PathwayRecord's fields (the record is rebuilt from them)."""


@dataclass(frozen=True)
class PathwaysParams(StageParams):
    """What the hops found depend on: the migrating ion, the hop length limit (Å; None: the library's automatic
    one), the most hops kept and the largest structure accepted."""

    ion: str
    max_hop: float | None
    max_paths: int
    max_sites: int

    @classmethod
    def from_settings(cls, settings: Settings) -> Self:
        return cls(ion=settings.migrating_ion, max_hop=settings.max_hop, max_paths=settings.max_paths,
                   max_sites=settings.max_sites)


def pathway_fields(row: Pathway) -> dict[str, Any]:
    """A stored pathway's PathwayRecord fields (vectors as lists)."""
    return {name: getattr(row, name) for name in PATHWAY_FIELDS}


def structure_producer(session: Session, structure_id: int) -> Run | None:
    """The import run that stored a structure."""
    structure = session.get(Structure, structure_id)
    return session.get(Run, structure.run_id) if structure and structure.run_id else None


def pathway_producer(session: Session, pathway_id: int) -> Run | None:
    """The pathways run that stored a pathway."""
    pathway = session.get(Pathway, pathway_id)
    return session.get(Run, pathway.run_id) if pathway else None


def lattice_parameters(structure: dict[str, Any]) -> tuple[float, ...]:
    """a, b, c (Å) and α, β, γ (°) of a stored structure."""
    from pymatgen.core import Lattice

    lattice = Lattice(structure["lattice"]["matrix"])
    return (*lattice.abc, *lattice.angles)


def _inputs() -> Any:
    return item_query(Structure, Structure.nsites, Structure.formula, Structure.fingerprint)


def _load(session: Session, ids: Sequence[int]) -> dict[int, Any]:
    return {s.id: {"structure_id": s.id, "formula": s.formula, "structure": s.structure,
                   "oxidation_states": s.oxidation_states} for s in rows_by_id(session, Structure, ids)}


def _store(session: Session, run: Run, result: Any) -> None:
    structure = session.get_one(Structure, run.input_id)
    lattice = lattice_parameters(structure.structure)
    for record in map(asdict, result):
        print_ = pathway_fingerprint(structure.fingerprint, lattice, record["ion"], record["start_frac"],
                                     record["end_frac"])
        session.add(Pathway(run_id=run.id, structure_id=run.input_id, fingerprint=print_, **record))


PATHWAYS = register(result_stage(
    "pathways", Structure, Pathway,
    description="Symmetry-distinct hops of the migrating ion per structure, shortest first.",
    input_columns=input_column("structure_id"),
    inputs=_inputs,
    params=PathwaysParams,
    load=_load,
    store=_store,
    rankers=(BY_ID, Ranker("smallest", "fewest sites first", expression=lambda c: c.nsites)),
    default_ranker="id",
    producer=structure_producer,
    resources="local",
    min_chunk_items=32,  # ~0.1 core-s per bundled structure against ~0.12 core-s per Dask task: 32 keep it < 5 %
    batch_size=20,
    retry_limit=2,
    lease_seconds=1800,
    time_limit_seconds=600,
))
