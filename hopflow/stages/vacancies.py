"""The vacancies stage: vacancy sites -> relaxed vacancy supercells (bulk relaxed first), shared by every pathway
they end, once per model and relaxation settings."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Self

from sqlalchemy.orm import Session

from hopflow.engines import POTENTIAL_MODULES, canonical_model, model_version
from hopflow.models import Run, Vacancy, VacancySite
from hopflow.registry import Ranker, StageParams, register
from hopflow.settings import Optimizer, Settings
from hopflow.stages.common import BY_ID, item_query, result_stage, rows_with_structure
from hopflow.stages.pathways import structure_producer

VACANCY_REVISION = "1"
"""Revision of the vacancy relaxation (bulk relaxation, supercell order, checks); a change re-relaxes."""
VACANCY_COLUMNS = tuple(c.name for c in Vacancy.__table__.columns if c.name not in ("id", "created_at", "run_id",
                                                                                   "site_id", "structure_id"))


@dataclass(frozen=True)
class VacancyParams(StageParams):
    """What a relaxed vacancy depends on: the potential and the relaxation settings, never the barrier engine, so
    every ML engine with the same model shares one relaxation."""

    model: str
    model_version: str
    revision: str
    bulk_fmax: float
    bulk_steps: int
    fmax: float
    steps: int
    optimizer: Optimizer
    fill_distance: float
    max_displacement: float

    @classmethod
    def from_settings(cls, settings: Settings, model: str | None = None) -> Self:
        """Under the settings, for `model` (default: the barrier model)."""
        model = canonical_model(model or settings.barrier_model)
        return cls(model=model, model_version=model_version(model), revision=VACANCY_REVISION,
                   bulk_fmax=settings.bulk_fmax, bulk_steps=settings.bulk_steps, fmax=settings.vacancy_fmax,
                   steps=settings.vacancy_steps, optimizer=settings.vacancy_optimizer,
                   fill_distance=settings.vacancy_fill_distance, max_displacement=settings.vacancy_max_displacement)


def vacancy_parameters(settings: Settings, model: str | None = None) -> dict[str, Any]:
    """The vacancies stage's parameter set for `model` under the settings, as stored."""
    return VacancyParams.from_settings(settings, model).as_dict()


def vacancy_site_producer(session: Session, site_id: int) -> Run | None:
    """The import run of the structure a vacancy site belongs to."""
    site = session.get(VacancySite, site_id)
    return structure_producer(session, site.structure_id) if site else None


def _inputs() -> Any:
    return item_query(VacancySite, VacancySite.structure_id, VacancySite.nsites, VacancySite.fingerprint)


def _load(session: Session, ids: Sequence[int]) -> dict[int, Any]:
    return {site.id: {"site_id": site.id, "structure_id": site.structure_id, "formula": formula,
                      "structure": structure, "supercell": site.supercell, "site_index": site.site_index,
                      "site_label": site.site_label}
            for site, structure, formula in rows_with_structure(session, VacancySite, ids)}


def _site_columns(session: Session, run: Run) -> dict[str, Any]:
    site = session.get(VacancySite, run.input_id)
    return {"site_id": run.input_id, "structure_id": site.structure_id if site else None}


def _store(session: Session, run: Run, result: Any) -> None:
    values = {name: getattr(result, name) for name in VACANCY_COLUMNS}
    session.add(Vacancy(run_id=run.id, **_site_columns(session, run), **values))


VACANCIES = register(result_stage(
    "vacancies", VacancySite, Vacancy,
    description="Relaxed vacancy supercells per symmetry-distinct ion site (bulk relaxed first), shared by every "
                "pathway they end, under one model and relaxation settings.",
    input_columns=_site_columns,
    inputs=_inputs,
    params=VacancyParams,
    load=_load,
    store=_store,
    rankers=(BY_ID, Ranker("smallest", "fewest supercell atoms first", expression=lambda c: c.nsites)),
    default_ranker="id",
    producer=vacancy_site_producer,
    resources="local",
    batch_size=10,
    retry_limit=2,
    lease_seconds=3600,
    time_limit_seconds=1800,
    warm_modules=POTENTIAL_MODULES,
))
