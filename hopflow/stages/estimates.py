"""The estimates stage: featurized pathways -> a cheap barrier with an ML potential between relaxed, shared vacancy
endpoints (mlip-idpp by default, or mlip-neb), flagged unless the path is a well-defined hop."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Self

from sqlalchemy import case, func, or_, select
from sqlalchemy.orm import Session

from hopflow.engines import POTENTIAL_MODULES, engine_parameters
from hopflow.models import Estimate, Features, Pathway, Run, Vacancy, VacancySite
from hopflow.registry import Cutoff, Ranker, register
from hopflow.settings import Settings, get_settings
from hopflow.stages.barriers import EngineParams, barrier_stage, learning_rankers
from hopflow.stages.common import BY_ID, item_query
from hopflow.stages.features import ImageParams, pathway_load
from hopflow.stages.vacancies import VacancyParams

OVERLAP_UNKNOWN = 1e9
"""Rank key of a pathway without a cation overlap change (no cation near the path): ranked last."""
MAX_OVERLAP_CHANGE = 1.0
"""Default estimates cutoff on features.overlap_cation_max_change (Å); the bundled set tops out near 0.5 Å."""
PHYSICS_EWALD_WEIGHT = 0.25
"""Å per eV: one eV of electrostatic rise along the path counts as 0.25 Å of cation-overlap rise in the `physics`
ranker (the bundled set spans 0-1.4 eV and 0.05-0.52 Å: both terms then weigh alike; docs/features.md)."""
PHYSICS_ISOLATED_PENALTY = 0.5
"""Å added to the `physics` key of a hop that alone forms no infinite network (dimensionality 0: a hop around one
polyhedron), so that hops that can carry long-range transport are estimated first."""


def physics_score(c: Any) -> Any:
    """The `physics` rank key (lower first): steric hindrance (cation overlap rise, Å) plus weighted electrostatic
    hindrance (Ewald rise, eV) along the path, and a penalty for hops that alone percolate in no direction."""
    isolated = case((c.dimensionality == 0, PHYSICS_ISOLATED_PENALTY), else_=0.0)
    return func.coalesce(c.overlap, 0.0) + PHYSICS_EWALD_WEIGHT * func.coalesce(c.ewald, 0.0) + isolated




@dataclass(frozen=True)
class EstimatesParams(EngineParams):
    """A cheap barrier's images and engine, and the relaxed vacancies its endpoints come from (same model)."""

    vacancy: VacancyParams

    @classmethod
    def from_settings(cls, settings: Settings) -> Self:
        return cls.for_engine(settings, settings.estimate_engine)

    @classmethod
    def for_engine(cls, settings: Settings, name: str, model: str | None = None) -> Self:
        """With the engine `name` (and ML potential `model`) instead of the settings' choice."""
        engine = engine_parameters(name, model)
        chosen = engine["engine_settings"].get("model")
        images = ImageParams.from_settings(settings).images()
        return cls(**engine, **images, vacancy=VacancyParams.from_settings(settings, chosen))


def estimates_engine_choice(name: str, model: str | None = None) -> dict[str, Any]:
    """An engine choice on the command line: its identity and the vacancies its model needs."""
    params = EstimatesParams.for_engine(get_settings(), name, model).as_dict()
    return {k: params[k] for k in ("engine", "engine_version", "engine_settings", "vacancy")}


def _inputs() -> Any:
    predictors = (select(Features.pathway_id, func.min(Features.overlap_cation_max_change).label("overlap"),
                         func.min(Features.ewald_energy_change).label("ewald"))
                  .group_by(Features.pathway_id).subquery())
    return (item_query(Pathway, Pathway.length, Pathway.structure_id, Pathway.fingerprint, Pathway.dimensionality,
                       predictors.c.overlap, predictors.c.ewald)
            .join(predictors, predictors.c.pathway_id == Pathway.id))


def _barrier_load(session: Session, ids: Sequence[int]) -> dict[int, Any]:
    """A pathway's payload (as features'), with the vacancy sites and relaxed vacancies of its structure."""
    payloads = pathway_load(session, ids)
    structure_ids = {p["structure_id"] for p in payloads.values()}
    sites = session.scalars(select(VacancySite).where(VacancySite.structure_id.in_(structure_ids))).all()
    relaxed = session.execute(select(Vacancy, Run.param_hash).join(Run, Run.id == Vacancy.run_id)
                              .where(Vacancy.structure_id.in_(structure_ids))).all()
    for payload in payloads.values():
        sid = payload["structure_id"]
        payload["vacancy_sites"] = [{"site_id": v.id, "supercell": v.supercell, "site_index": v.site_index}
                                    for v in sites if v.structure_id == sid]
        payload["vacancies"] = [{"vacancy_id": v.id, "site_id": v.site_id, "param_hash": phash,
                                 "structure": v.structure, "bulk_structure": v.bulk_structure, "energy": v.energy,
                                 "flag": v.flag, "flag_reason": v.flag_reason}
                                for v, phash in relaxed if v.structure_id == sid]
    return payloads


ESTIMATES = register(barrier_stage(
    "estimates", Estimate,
    description="Cheap barrier per featurized pathway with an ML potential between relaxed, shared vacancy "
                "endpoints (mlip-idpp by default, or mlip-neb); flagged unless the path is a well-defined hop.",
    inputs=_inputs,
    params=EstimatesParams,
    load=_barrier_load,
    rankers=(BY_ID, Ranker("physics", "least steric and electrostatic hindrance along the path first (cation "
                           "overlap rise + 0.25 Å/eV × Ewald rise, + 0.5 Å for a hop that alone percolates nowhere)",
                           expression=physics_score),
             Ranker("shortest", "shortest hop first", expression=lambda c: c.length),
             Ranker("overlap", "smallest rise of the cation radii overlap along the path first",
                    expression=lambda c: func.coalesce(c.overlap, OVERLAP_UNKNOWN)),
             *learning_rankers("estimates")),
    default_ranker="physics",
    cutoffs=(Cutoff("max_overlap_change", "largest cation overlap change along the path (Å; path_overlap_cutoff)",
                    default=MAX_OVERLAP_CHANGE, criterion=lambda c, v: or_(c.overlap.is_(None), c.overlap <= v),
                    broaden_step=0.25, broaden_limit=3.0),),
    engine_choice=estimates_engine_choice,
    resources="local",
    batch_size=10,
    retry_limit=2,
    lease_seconds=3600,
    time_limit_seconds=1800,
    warm_modules=POTENTIAL_MODULES,
))
