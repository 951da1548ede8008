"""Pathways stage flow: the distinct hops of the migrating ion in each claimed structure (tasks.pathways)."""

from __future__ import annotations

from typing import Any

from prefect import flow, task
from pymatgen.core import Structure

from hopflow.flows.common import stage_run_name, stage_task_runner
from hopflow.flows.runner import StageReport, run_stage
from hopflow.stages.pathways import PathwaysParams
from hopflow.tasks.pathways import PathwayRecord, find_pathways


@task(name="find-pathways")
def find_structure_pathways(item: dict[str, Any], params: PathwaysParams) -> list[PathwayRecord]:
    """The pathways of one stored structure under the run's parameters."""
    structure = Structure.from_dict(item["structure"])
    return find_pathways(structure, ion=params.ion, max_hop=params.max_hop, max_paths=params.max_paths,
                         max_sites=params.max_sites)


@flow(name="pathways", flow_run_name=lambda: stage_run_name("pathways"), task_runner=stage_task_runner("pathways"))
def pathways(run_ids: list[int] | None = None, parameters: dict[str, Any] | None = None) -> StageReport:
    """Find pathways for the claimed runs, or for every eligible structure when `run_ids` is None."""
    return run_stage("pathways", run_ids, find_structure_pathways, parameters=parameters)
