"""TEST MACHINERY: the synthetic stage's flow (exercises queue, controller, Prefect and Dask at scale)."""

from __future__ import annotations

from prefect import flow

from hopflow.flows.common import stage_run_name, stage_task_runner
from hopflow.flows.runner import StageReport, run_stage
from hopflow.tasks.synthetic import synthetic_item


@flow(name="synthetic", flow_run_name=lambda: stage_run_name("synthetic"), task_runner=stage_task_runner("synthetic"),
      log_prints=False)
def synthetic(run_ids: list[int] | None = None) -> StageReport:
    """Process synthetic items: the claimed runs, or every eligible item when `run_ids` is None."""
    return run_stage("synthetic", run_ids, synthetic_item)
