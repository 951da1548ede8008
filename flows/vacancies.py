"""Vacancies stage flow: relax the claimed vacancy sites (bulk first), each once per model and settings."""

from __future__ import annotations

from typing import Any

from prefect import flow, task
from pymatgen.core import Structure

from hopflow.flows.common import stage_run_name, stage_task_runner
from hopflow.flows.runner import StageReport, run_stage
from hopflow.stages.vacancies import VacancyParams
from hopflow.tasks.vacancies import RelaxedVacancy, Supercell, relax_vacancy


@task(name="relax-vacancy")
def relax_vacancy_site(item: dict[str, Any], params: VacancyParams) -> RelaxedVacancy:
    """The relaxed vacancy of one vacancy site under the run's model and relaxation settings."""
    return relax_vacancy(
        Structure.from_dict(item["structure"]), Supercell.from_key(item["supercell"]), item["site_index"],
        model=params.model, device=None, bulk_fmax=params.bulk_fmax, bulk_steps=params.bulk_steps,
        fmax=params.fmax, steps=params.steps, optimizer=params.optimizer, fill_distance=params.fill_distance,
        max_displacement=params.max_displacement)


@flow(name="vacancies", flow_run_name=lambda: stage_run_name("vacancies"),
      task_runner=stage_task_runner("vacancies"))
def vacancies(run_ids: list[int] | None = None, parameters: dict[str, Any] | None = None) -> StageReport:
    """Relax the claimed runs' vacancy sites, or every eligible site when `run_ids` is None."""
    return run_stage("vacancies", run_ids, relax_vacancy_site, parameters=parameters)
