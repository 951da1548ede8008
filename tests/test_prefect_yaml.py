"""prefect.yaml: every key is one Prefect 3.8.8 accepts (it drops unknown keys silently), schedules and entrypoints
are valid, every stage of the registry has its deployment, and a real `prefect deploy` creates them with schedules."""

from __future__ import annotations

from typing import Any

import pytest
import yaml
from prefect.cli.deploy._models import (
    ConcurrencyLimitSpec,
    DeploymentConfig,
    PrefectYamlModel,
    RawScheduleConfig,
    WorkPoolConfig,
)
from prefect.client.schemas.objects import ConcurrencyLimitStrategy
from prefect.client.schemas.schedules import CronSchedule, IntervalSchedule
from prefect.flows import load_flow_from_entrypoint
from prefect.workers.process import ProcessWorker

from hopflow.deployments.bootstrap import (
    POOL_NAME,
    PREFECT_YAML,
    PROJECT_ROOT,
    deploy_all,
    ensure_work_pool,
    pause_services,
)
from hopflow.flows.batch import stage_flow
from hopflow.registry import STAGES, get_stage

from prefect_helpers import entrypoint_file, yaml_deployments

# Keys of the top level that Prefect does not read but that YAML anchors need (Prefect's own docs use it).
ANCHOR_SECTION = "definitions"
STAGE_FLOWS = {"import-structures", "pathways", "features", "vacancies", "estimates", "neb", "synthetic"}


def _document() -> dict[str, Any]:
    return yaml.safe_load(PREFECT_YAML.read_text())


def _deployments() -> list[dict[str, Any]]:
    return _document()["deployments"]


def _fields(model: type) -> set[str]:
    return {info.alias or name for name, info in model.model_fields.items()} | set(model.model_fields)


def test_every_key_is_one_prefect_reads():
    document = _document()
    assert set(document) - {ANCHOR_SECTION} <= _fields(PrefectYamlModel)
    PrefectYamlModel.model_validate(document)  # what `prefect deploy` runs first
    job_variables = set(ProcessWorker.get_default_base_job_template()["variables"]["properties"])
    limits, crons = [], []
    for deployment in document["deployments"]:
        where = deployment.get("name")
        assert set(deployment) <= _fields(DeploymentConfig), where
        assert set(deployment["work_pool"]) <= _fields(WorkPoolConfig), where
        assert deployment["work_pool"]["name"] == POOL_NAME
        assert set(deployment["work_pool"].get("job_variables", {})) <= job_variables, where
        assert all(isinstance(v, str) for v in deployment["work_pool"]["job_variables"]["env"].values()), where
        limit = deployment.get("concurrency_limit")
        if isinstance(limit, dict):
            assert set(limit) <= _fields(ConcurrencyLimitSpec), where
            ConcurrencyLimitStrategy(limit["collision_strategy"])
            limits.append(where)
        for schedule in deployment.get("schedules", []):
            parsed = RawScheduleConfig.model_validate(schedule)  # forbids unknown keys
            if parsed.cron is not None:
                CronSchedule(cron=parsed.cron, timezone=parsed.timezone)  # validates the expression
                crons.append(where)
    # the checks above really ran: the controller's limit, the daily cleanup and checkpoint schedules
    assert "controller" in limits and crons.count("daily") == 2, (limits, crons)


def test_names_are_unique_and_every_stage_has_its_deployment():
    names = yaml_deployments()
    assert len(names) == len(_deployments())
    for stage in STAGES.values():
        assert stage.deployment in names, f"stage {stage.name} submits to {stage.deployment}, missing in prefect.yaml"
        assert set(names[stage.deployment]["parameters"]) == {"run_ids"}
        assert names[stage.deployment]["entrypoint"] == stage.entrypoint, stage.name
    assert {name.split("/")[0] for name in names} >= STAGE_FLOWS | {"controller", "cleanup", "checkpoint", "submit"}


def test_entrypoints_resolve_to_flows():
    present = [d for d in _deployments() if entrypoint_file(d).exists()]
    assert {d["name"] for d in present} >= {"synthetic", "controller", "submit", "daily"}
    for deployment in present:
        flow = load_flow_from_entrypoint(deployment["entrypoint"])
        assert set(deployment.get("parameters", {})) <= set(flow.parameters.properties), deployment["name"]
    for deployment in _deployments():
        assert deployment["entrypoint"].startswith("flows/") and deployment["entrypoint"].count(":") == 1


def test_services_have_the_schedules_and_limits_asked_for():
    names = yaml_deployments()
    controller = names["controller/controller"]
    assert controller["schedules"] == [{"interval": 60, "active": True}]
    assert controller["concurrency_limit"] == {"limit": 1, "collision_strategy": "CANCEL_NEW"}
    for name in ("cleanup/daily", "checkpoint/daily"):
        (daily,) = names[name]["schedules"]
        assert CronSchedule(cron=daily["cron"], timezone=daily["timezone"]).timezone == "UTC"
    for stage in STAGE_FLOWS:
        assert "schedules" not in names[f"{stage}/{stage}"]  # stages run when the controller submits them


@pytest.mark.prefect
def test_prefect_deploy_creates_the_deployments(prefect_client):
    ensure_work_pool(prefect_client)
    names = yaml_deployments()
    present = [name for name, d in names.items() if entrypoint_file(d).exists()]
    done = deploy_all(names=None if len(present) == len(names) else present)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    for name in present:
        deployment = prefect_client.read_deployment_by_name(name)
        assert deployment.work_pool_name == POOL_NAME, name
        assert deployment.entrypoint == names[name]["entrypoint"]
        assert deployment.pull_steps == [
            {"prefect.deployments.steps.set_working_directory": {"directory": str(PROJECT_ROOT)}}]
        assert deployment.job_variables["env"] == names[name]["work_pool"]["job_variables"]["env"]
    controller = prefect_client.read_deployment_by_name("controller/controller")
    (schedule,) = controller.schedules
    assert isinstance(schedule.schedule, IntervalSchedule) and schedule.schedule.interval.total_seconds() == 60
    assert schedule.active
    assert controller.global_concurrency_limit.limit == 1
    assert controller.concurrency_options.collision_strategy == ConcurrencyLimitStrategy.CANCEL_NEW
    for flow_name in ("cleanup", "checkpoint"):
        (daily,) = prefect_client.read_deployment_by_name(f"{flow_name}/daily").schedules
        assert isinstance(daily.schedule, CronSchedule) and daily.active
    synthetic = prefect_client.read_deployment_by_name(get_stage("synthetic").deployment)
    assert synthetic.schedules == [] and synthetic.parameters == {"run_ids": None}
    # Leave the shared test server quiet: no scheduled controller runs for a later test's worker to pick up.
    assert pause_services(prefect_client) == ["controller/controller", "cleanup/daily", "checkpoint/daily",
                                             "retrain/hourly"]


def test_batch_mode_runs_the_flow_each_stage_deploys():
    for stage in STAGES.values():
        flow = stage_flow(stage.name)
        assert flow.name == stage.flow_name
        assert flow.fn.__module__ == stage.flow_module
