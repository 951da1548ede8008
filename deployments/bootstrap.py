"""Prefect bootstrap: the process work pool the deployments use, the live-settings Variables, and `prefect deploy
--all` of the project's prefect.yaml."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from prefect.client.orchestration import SyncPrefectClient
from prefect.client.schemas.actions import WorkPoolCreate, WorkPoolUpdate
from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterDeploymentId,
    FlowRunFilterState,
    FlowRunFilterStateType,
)
from prefect.client.schemas.objects import StateType
from prefect.exceptions import ObjectNotFound
from sqlalchemy import Engine

from hopflow.db import get_engine, session_scope

POOL_NAME = "hopflow-pool"
"""The process work pool every deployment in prefect.yaml runs on (`prefect worker start --pool hopflow-pool`)."""
POOL_TYPE = "process"
PROJECT_ROOT = Path(__file__).resolve().parent.parent
PREFECT_YAML = PROJECT_ROOT / "prefect.yaml"
DEPLOY_TIMEOUT_S = 300
SCHEDULED_SERVICES = ("controller/controller", "cleanup/daily", "checkpoint/daily", "retrain/hourly")


@dataclass(frozen=True)
class BootstrapReport:
    """What the bootstrap created or changed."""

    pool: str
    pool_created: bool
    pool_limit: int | None
    variables: tuple[str, ...]


def ensure_work_pool(client: SyncPrefectClient, name: str = POOL_NAME, concurrency_limit: int | None = None) -> bool:
    """Create the process work pool if missing (with the process worker's default job template); set its limit.

    Returns True when the pool was created.
    """
    try:
        pool = client.read_work_pool(name)
    except ObjectNotFound:
        from prefect.workers.process import ProcessWorker

        client.create_work_pool(WorkPoolCreate(name=name, type=POOL_TYPE, concurrency_limit=concurrency_limit,
                                               base_job_template=ProcessWorker.get_default_base_job_template()))
        return True
    if pool.type != POOL_TYPE:
        raise ValueError(f"work pool {name!r} exists with type {pool.type!r}; hopflow's deployments need {POOL_TYPE!r}")
    if concurrency_limit is not None and pool.concurrency_limit != concurrency_limit:
        client.update_work_pool(name, WorkPoolUpdate(concurrency_limit=concurrency_limit))
    return False


def bootstrap(client: SyncPrefectClient, *, engine: Engine | None = None, pool: str = POOL_NAME,
              pool_limit: int | None = None) -> BootstrapReport:
    """Work pool and Variables, idempotent: safe to run before every `prefect deploy --all`."""
    from hopflow.flows.mirror import mirror_settings

    created = ensure_work_pool(client, pool, pool_limit)
    with session_scope(engine or get_engine(), write=True) as session:
        mirrored = mirror_settings(client, session)
    return BootstrapReport(pool, created, pool_limit, mirrored.pushed)


def deploy_all(root: Path = PROJECT_ROOT, names: list[str] | None = None,
               env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run `prefect deploy --all` (or `--name` for each of `names`) on the project's prefect.yaml."""
    prefect = Path(sys.executable).with_name("prefect")
    command = [str(prefect) if prefect.exists() else "prefect", "--no-prompt", "deploy",
               "--prefect-file", str(root / "prefect.yaml")]
    command += ["--all"] if names is None else [arg for name in names for arg in ("--name", name)]
    return subprocess.run(command, cwd=root, env={**os.environ, **(env or {})}, capture_output=True, text=True,
                          timeout=DEPLOY_TIMEOUT_S)


def pause_services(client: SyncPrefectClient, names: tuple[str, ...] = SCHEDULED_SERVICES) -> list[str]:
    """Pause the scheduled deployments and delete their waiting runs (tests and benchmarks drive ticks themselves).

    Returns the deployments paused; `prefect deployment resume NAME` undoes it.
    """
    paused = []
    for name in names:
        try:
            deployment = client.read_deployment_by_name(name)
        except ObjectNotFound:
            continue
        client.pause_deployment(deployment.id)
        waiting = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            deployment_id=FlowRunFilterDeploymentId(any_=[deployment.id]),
            state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.SCHEDULED, StateType.PENDING]))))
        for run in waiting:
            client.delete_flow_run(run.id)
        paused.append(name)
    return paused
