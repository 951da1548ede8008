"""Helpers for tests against the real Prefect server that scripts/test.sh starts (PREFECT_API_URL)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from prefect.client.orchestration import SyncPrefectClient
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterDeploymentId
from sqlalchemy import Engine, insert

from hopflow.db import session_scope
from hopflow.deployments.bootstrap import PREFECT_YAML
from hopflow.models import SyntheticItem

PROJECT_ROOT = Path(__file__).resolve().parent.parent
PREFECT_BIN = Path(sys.executable).with_name("prefect")
WORKER_START_TIMEOUT_S = 90.0


def prefect_api_url() -> str:
    url = os.environ.get("PREFECT_API_URL")
    if not url:
        raise RuntimeError("PREFECT_API_URL is not set: run the tests through scripts/test.sh, which starts Prefect")
    return url


def latest_artifact(client: SyncPrefectClient, key: str) -> Any:
    """The newest artifact under `key`."""
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.client.schemas.sorting import ArtifactSort

    (artifact,) = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])),
                                        sort=ArtifactSort.CREATED_DESC, limit=1)
    return artifact


def create_deployment(client: SyncPrefectClient, flow_name: str = "synthetic", *,
                      schema: dict[str, Any] | None = None, enforce: bool = False) -> tuple[str, Any]:
    """A deployment of `flow_name` on no work pool (its runs stay scheduled): (`flow/deployment` name, id)."""
    flow_id = client.create_flow_from_name(flow_name)
    name = f"test-{uuid.uuid4().hex[:10]}"
    deployment_id = client.create_deployment(flow_id=flow_id, name=name, parameter_openapi_schema=schema,
                                             enforce_parameter_schema=enforce)
    return f"{flow_name}/{name}", deployment_id


def delete_deployment(client: SyncPrefectClient, deployment_id: Any) -> None:
    """Delete a test deployment and every flow run it made (so no worker ever picks them up)."""
    for run in deployment_flow_runs(client, deployment_id):
        client.delete_flow_run(run.id)
    client.delete_deployment(deployment_id)


def deployment_flow_runs(client: SyncPrefectClient, deployment_id: Any) -> list[Any]:
    runs: list[Any] = []
    while True:
        page = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            deployment_id=FlowRunFilterDeploymentId(any_=[deployment_id])), limit=200, offset=len(runs))
        runs += page
        if len(page) < 200:
            return runs


def add_synthetic_items(engine: Engine, n: int, *, cpu_ms: float = 1.0, sleep_ms: float = 0.0,
                        priorities: Sequence[float] | None = None) -> list[int]:
    """Insert `n` synthetic items (priority = position unless given); returns their ids."""
    rows = [{"cpu_ms": cpu_ms, "sleep_ms": sleep_ms, "failure": "none", "fail_attempts": 0,
             "priority": float(priorities[i]) if priorities is not None else float(i)} for i in range(n)]
    with session_scope(engine, write=True) as session:
        result = session.execute(insert(SyntheticItem).returning(SyntheticItem.id), rows)
        return sorted(int(i) for i in result.scalars())  # SQLite may hand back ids as floats here


def start_worker(pool: str, env: dict[str, str], log: Path, cgroup: Path | None = None) -> subprocess.Popen[bytes]:
    """A real `prefect worker start --pool POOL` process (own process group, output to `log`), in `cgroup` (a CPU
    cgroup folder) when given: its flow runs stay there, whatever sessions they start."""
    def enter_cgroup() -> None:
        (cgroup / "cgroup.procs").write_text(str(os.getpid()))  # type: ignore[operator]

    handle = log.open("wb")
    return subprocess.Popen([str(PREFECT_BIN), "worker", "start", "--pool", pool, "--type", "process"],
                            cwd=PROJECT_ROOT, env={**os.environ, **env}, stdout=handle, stderr=subprocess.STDOUT,
                            start_new_session=True, preexec_fn=enter_cgroup if cgroup is not None else None)


def stop_process_group(proc: subprocess.Popen[bytes], wait_s: float = 20.0) -> None:
    """Stop a process started with its own session: SIGTERM to the group, then SIGKILL."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(wait_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(wait_s)
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # flow-run children left behind, if any
    except ProcessLookupError:
        pass


def flow_run_pids(flow_run_id: str) -> list[int]:
    """Processes whose environment names this flow run (the process worker's flow-run process)."""
    found = []
    needle = f"PREFECT__FLOW_RUN_ID={flow_run_id}".encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def wait_for(predicate: Any, timeout: float, interval: float = 0.2, what: str = "condition") -> Any:
    """Poll `predicate` until it returns something truthy; fail the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)



def deploy_stage(client: SyncPrefectClient, deployment: str) -> Any:
    """`prefect deploy` one prefect.yaml deployment into the work pool, scheduled services paused, and its leftover
    scheduled, pending or running flow runs deleted (they would count as live): the deployment."""
    from hopflow.deployments.bootstrap import deploy_all, ensure_work_pool, pause_services

    ensure_work_pool(client)
    done = deploy_all(names=[deployment])
    if done.returncode != 0:
        raise RuntimeError(f"prefect deploy failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    pause_services(client)
    found = client.read_deployment_by_name(deployment)
    delete_waiting_runs(client, found.id, states=("SCHEDULED", "PENDING", "RUNNING"))
    return found


def delete_waiting_runs(client: SyncPrefectClient, deployment_id: Any,
                        states: Sequence[str] = ("SCHEDULED", "PENDING")) -> None:
    """Delete a deployment's flow runs in these states (by default those no worker has started)."""
    for run in deployment_flow_runs(client, deployment_id):
        if run.state_type is not None and run.state_type.value in states:
            client.delete_flow_run(run.id)


def wait_for_worker(client: SyncPrefectClient, pool: str, since: float,
                    timeout: float = WORKER_START_TIMEOUT_S) -> None:
    """Wait until a worker of `pool` has sent a heartbeat after `since` (a time.time())."""

    def reported() -> bool:
        workers = client.read_workers_for_work_pool(pool)
        return any(w.last_heartbeat_time and w.last_heartbeat_time.timestamp() >= since for w in workers)

    wait_for(reported, timeout, interval=0.5, what=f"a worker of pool {pool!r} to report in")


def entrypoint_file(deployment: dict[str, Any]) -> Path:
    """The flow file of a prefect.yaml deployment."""
    return PROJECT_ROOT / deployment["entrypoint"].split(":")[0]


def yaml_deployments() -> dict[str, dict[str, Any]]:
    """prefect.yaml's deployments by `flow/deployment` name; the flow name is read from the flow when its file
    exists, else derived from the entrypoint's function name."""
    from prefect.flows import load_flow_from_entrypoint

    named = {}
    for deployment in yaml.safe_load(PREFECT_YAML.read_text())["deployments"]:
        function = deployment["entrypoint"].split(":")[1]
        if entrypoint_file(deployment).exists():
            flow_name = load_flow_from_entrypoint(f"{entrypoint_file(deployment)}:{function}").name
        else:
            flow_name = function.replace("_", "-")
        named[f"{flow_name}/{deployment['name']}"] = deployment
    return named
