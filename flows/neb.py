"""NEB stage flow: a VASP CI-NEB barrier (custodian, tasks.engines.vasp) per claimed pathway, one per worker."""

from __future__ import annotations

from typing import Any

from prefect import flow, task

from hopflow.flows.common import stage_run_name, stage_task_runner
from hopflow.flows.estimates import pathway_barrier
from hopflow.flows.runner import StageReport, run_stage
from hopflow.stages.neb import NebParams
from hopflow.tasks.engines import BarrierResult


@task(name="neb-barrier")
def neb_barrier(item: dict[str, Any], params: NebParams) -> BarrierResult:
    """The VASP NEB barrier of one stored pathway; a re-run continues from the previous CONTCARs."""
    return pathway_barrier("neb", item, params)


@flow(name="neb", flow_run_name=lambda: stage_run_name("neb"), task_runner=stage_task_runner("neb"))
def neb(run_ids: list[int] | None = None, parameters: dict[str, Any] | None = None) -> StageReport:
    """VASP NEB of the claimed runs' pathways, or of every eligible pathway when `run_ids` is None."""
    return run_stage("neb", run_ids, neb_barrier, parameters=parameters)
