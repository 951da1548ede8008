"""The neb stage: pathways whose best trusted estimate is low enough -> a VASP CI-NEB barrier through custodian."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Self

from sqlalchemy import func, select

from hopflow.engines import engine_parameters
from hopflow.models import Estimate, NebResult, Pathway
from hopflow.models.barriers import trusted
from hopflow.registry import Cutoff, Ranker, register
from hopflow.settings import Settings
from hopflow.stages.barriers import EngineParams, barrier_stage, learning_rankers
from hopflow.stages.common import BY_ID, item_query
from hopflow.stages.features import ImageParams, pathway_load

MAX_ESTIMATE = 1.0
"""Default neb cutoff on the best converged estimate (eV)."""
NEB_LEASE_SECONDS = 48 * 3600.0
"""A VASP NEB may run for a day or two on a node."""


@dataclass(frozen=True)
class NebParams(EngineParams):
    """A VASP NEB's images and engine settings."""

    @classmethod
    def from_settings(cls, settings: Settings) -> Self:
        images = ImageParams.from_settings(settings).images()
        return cls(**engine_parameters("vasp-neb"), **images)


def _inputs() -> Any:
    best = (select(Estimate.pathway_id, func.min(Estimate.barrier).label("estimate"))
            .where(trusted(Estimate)).group_by(Estimate.pathway_id).subquery())
    return (item_query(Pathway, Pathway.length, Pathway.structure_id, Pathway.fingerprint, best.c.estimate)
            .join(best, best.c.pathway_id == Pathway.id))


NEB = register(barrier_stage(
    "neb", NebResult,
    description="VASP CI-NEB barrier (through custodian) of pathways whose best trusted estimate is low enough.",
    inputs=_inputs,
    params=NebParams,
    load=pathway_load,
    rankers=(BY_ID, Ranker("estimate", "lowest trusted estimate first", expression=lambda c: c.estimate),
             Ranker("shortest", "shortest hop first", expression=lambda c: c.length), *learning_rankers("neb")),
    default_ranker="estimate",
    cutoffs=(Cutoff("max_estimate", "largest best trusted estimate (eV)", default=MAX_ESTIMATE,
                    criterion=lambda c, v: c.estimate <= v, broaden_step=0.25, broaden_limit=2.0),),
    engine_choice=engine_parameters,
    resources="slurm-vasp",
    batch_size=1,
    retry_limit=3,
    lease_seconds=NEB_LEASE_SECONDS,
    time_limit_seconds=None,  # custodian watches VASP (FrozenJobErrorHandler); the SLURM walltime bounds it
))
