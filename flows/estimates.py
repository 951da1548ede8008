"""Estimates stage flow: a cheap ML-potential barrier per claimed pathway (tasks.images + tasks.engines)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, task
from pymatgen.core import Structure

from flows.common import stage_run_name, stage_task_runner
from flows.features import pathway_record
from flows.runner import StageReport, run_stage
from hopflow.errors import EngineError
from hopflow.queue import param_hash
from hopflow.settings import get_settings
from tasks.engines import BarrierResult, compute_barrier, get_engine
from tasks.images import hop_images

WORK_DIR = "work"
"""Work directories live under Settings.home / WORK_DIR."""


def barrier_workdir(stage: str, pathway_id: int, parameters: dict[str, Any]) -> Path:
    """The one work directory of a pathway under a parameter set: a retry continues in the same place."""
    return get_settings().home / WORK_DIR / f"{stage}-{pathway_id}-{param_hash(parameters)[:8]}"


def pathway_barrier(stage: str, item: dict[str, Any], parameters: dict[str, Any]) -> BarrierResult:
    """Build the pathway's vacancy-hop images and compute its barrier with the run's engine and settings."""
    engine = get_engine(parameters["engine"], parameters["engine_settings"])
    if engine.version != parameters["engine_version"]:
        raise EngineError(f"this worker has {engine.name} {engine.version}, the run asks for "
                          f"{parameters['engine_version']}")
    structure = Structure.from_dict(item["structure"])
    images = hop_images(structure, pathway_record(item["pathway"]), nimages=parameters["nimages"],
                        min_length=parameters["min_length"], min_atoms=parameters["min_atoms"],
                        max_atoms=parameters["max_atoms"])
    workdir = barrier_workdir(stage, item["pathway_id"], parameters)
    return compute_barrier(engine.name, images, workdir, engine.settings)


@task(name="estimate-barrier")
def estimate_barrier(item: dict[str, Any], parameters: dict[str, Any]) -> BarrierResult:
    """The barrier estimate of one stored pathway (an unconverged run comes back without a barrier)."""
    return pathway_barrier("estimates", item, parameters)


@flow(name="estimates", flow_run_name=lambda: stage_run_name("estimates"),
      task_runner=stage_task_runner("estimates"))
def estimates(run_ids: list[int] | None = None, parameters: dict[str, Any] | None = None) -> StageReport:
    """Estimate barriers of the claimed runs' pathways, or of every eligible pathway when `run_ids` is None."""
    return run_stage("estimates", run_ids, estimate_barrier, parameters=parameters)
