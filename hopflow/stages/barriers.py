"""What the two barrier stages (estimates, neb) share: the engine in their parameter set, their result columns, the
learning loop's rankers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy.orm import Session

from hopflow.models import Estimate, Pathway, Run
from hopflow.registry import Ranker, Stage, input_column
from hopflow.retraining import LEARNING_RANKERS, model_ranker_scores
from hopflow.stages.common import result_stage
from hopflow.stages.features import ImageParams
from hopflow.stages.pathways import pathway_producer

BARRIER_COLUMNS = tuple(c.name for c in Estimate.__table__.columns if c.name not in ("id", "created_at", "run_id",
                                                                                   "pathway_id"))
"""Columns of `estimates` and `neb` that hold tasks.engines.BarrierResult's fields."""
LEARNING_DESCRIPTIONS = {
    "predicted": "lowest barrier predicted by the newest barrier model first (diverse until a model exists)",
    "uncertain": "largest uncertainty of the newest barrier model first (diverse until a model exists)",
    "mixed": "lowest predicted barrier minus its uncertainty first (diverse until a model exists)",
    "diverse": "farthest in feature space from the pathways with an accurate barrier first",
}


@dataclass(frozen=True)
class EngineParams(ImageParams):
    """A barrier's images and the engine that computes it: name, version and result-affecting settings
    (hopflow.engines.engine_parameters)."""

    engine: str
    engine_version: str
    engine_settings: dict[str, Any]


def learning_rankers(stage: str) -> tuple[Ranker, ...]:
    """The learning loop's rankers on a barrier stage (scores from hopflow.retraining, refreshed after each retrain)."""
    return tuple(Ranker(name, LEARNING_DESCRIPTIONS[name], score=model_ranker_scores(name, stage))
                 for name in LEARNING_RANKERS)


def barrier_values(result: Any) -> dict[str, Any]:
    """A BarrierResult's fields as `estimates`/`neb` column values (JSON-ready)."""
    data = result.model_dump(mode="json")
    return {name: data[name] for name in BARRIER_COLUMNS if name in data}


def barrier_store(table: Any) -> Any:
    """The store of a barrier stage writing into `table` (a pathway barrier carries its vacancies beside it)."""
    def store(session: Session, run: Run, result: Any) -> None:
        barrier = getattr(result, "result", result)
        values = barrier_values(barrier) | {"start_vacancy_id": getattr(result, "start_vacancy_id", None),
                                            "end_vacancy_id": getattr(result, "end_vacancy_id", None)}
        session.add(table(run_id=run.id, pathway_id=run.input_id, **values))

    return store


def barrier_stage(name: str, model: Any, **fields: Any) -> Stage:
    """A barrier stage: pathways in, one `model` row (a BarrierResult) per pathway out, its flow `flows/<name>.py`;
    `fields` give the rest (description, inputs, parameters, rankers, cutoffs, resources ...)."""
    return result_stage(name, Pathway, model, store=barrier_store(model), input_columns=input_column("pathway_id"),
                        producer=pathway_producer, **fields)
