"""The features stage: pathways -> barrier predictors (radii overlap and Ewald energy along the IDPP path, geometry)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Self

from sqlalchemy.orm import Session

from hopflow.models import Features, Pathway, Run
from hopflow.registry import Ranker, StageParams, input_column, register
from hopflow.settings import Settings
from hopflow.stages.common import BY_ID, item_query, result_stage, rows_with_structure
from hopflow.stages.pathways import pathway_fields, pathway_producer

FEATURE_COLUMNS = tuple(c.name for c in Features.__table__.columns if c.name not in ("id", "created_at", "run_id",
                                                                                    "pathway_id"))
"""Columns of `features` that hold tasks.features.PathwayFeatures' fields."""


@dataclass(frozen=True)
class ImageParams(StageParams):
    """The images along a hop: how many, in a vacancy supercell of at least `min_length` Å and `min_atoms` to
    `max_atoms` atoms."""

    nimages: int
    min_length: float
    min_atoms: int
    max_atoms: int

    @classmethod
    def from_settings(cls, settings: Settings) -> Self:
        return cls(nimages=settings.nimages, min_length=settings.supercell_min_length,
                   min_atoms=settings.supercell_min_atoms, max_atoms=settings.supercell_max_atoms)

    def images(self) -> dict[str, Any]:
        """As the keyword arguments of tasks.images.hop_images and tasks.features.featurize."""
        return {"nimages": self.nimages, "min_length": self.min_length, "min_atoms": self.min_atoms,
                "max_atoms": self.max_atoms}


@dataclass(frozen=True)
class FeaturesParams(ImageParams):
    """What a pathway's predictors depend on: its images."""


def pathway_load(session: Session, ids: Sequence[int]) -> dict[int, Any]:
    """A pathway's payload: its fields, and its structure."""
    return {p.id: {"pathway_id": p.id, "structure_id": p.structure_id, "formula": formula, "structure": structure,
                   "pathway": pathway_fields(p)}
            for p, structure, formula in rows_with_structure(session, Pathway, ids)}


def _inputs() -> Any:
    return item_query(Pathway, Pathway.length, Pathway.rank, Pathway.ion, Pathway.structure_id, Pathway.fingerprint)


def _store(session: Session, run: Run, result: Any) -> None:
    session.add(Features(run_id=run.id, pathway_id=run.input_id, **asdict(result)))


FEATURES = register(result_stage(
    "features", Pathway, Features,
    description="Barrier predictors per pathway: radii overlap and Ewald energy along the IDPP path, geometry.",
    input_columns=input_column("pathway_id"),
    inputs=_inputs,
    params=FeaturesParams,
    load=pathway_load,
    store=_store,
    rankers=(BY_ID, Ranker("shortest", "shortest hop first", expression=lambda c: c.length)),
    default_ranker="id",
    producer=pathway_producer,
    resources="local",
    min_chunk_items=2,  # ~4 core-s per pathway
    batch_size=20,
    retry_limit=2,
    lease_seconds=1800,
    time_limit_seconds=600,
))
