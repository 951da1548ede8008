"""Features stage flow: barrier predictors of each claimed pathway (tasks.features)."""

from __future__ import annotations

from typing import Any

from prefect import flow, task
from pymatgen.core import Structure

from hopflow.flows.common import stage_run_name, stage_task_runner
from hopflow.flows.runner import StageReport, run_stage
from hopflow.stages.features import FeaturesParams
from hopflow.tasks.features import PathwayFeatures, featurize
from hopflow.tasks.pathways import PathwayRecord


def pathway_record(fields: dict[str, Any]) -> PathwayRecord:
    """Rebuild a PathwayRecord from a stored pathway's fields (JSON lists back to tuples)."""
    vectors = ("end_image", "start_frac", "end_frac", "start_cart", "end_cart")
    values: dict[str, Any] = {k: tuple(v) if k in vectors else v for k, v in fields.items()}
    return PathwayRecord(**values)


@task(name="featurize-pathway")
def featurize_pathway(item: dict[str, Any], params: FeaturesParams) -> PathwayFeatures:
    """The predictors of one stored pathway under the run's parameters (images, supercell bounds)."""
    structure = Structure.from_dict(item["structure"])
    return featurize(structure, pathway_record(item["pathway"]), **params.images())


@flow(name="features", flow_run_name=lambda: stage_run_name("features"), task_runner=stage_task_runner("features"))
def features(run_ids: list[int] | None = None, parameters: dict[str, Any] | None = None) -> StageReport:
    """Featurize the claimed runs' pathways, or every eligible pathway when `run_ids` is None."""
    return run_stage("features", run_ids, featurize_pathway, parameters=parameters)
