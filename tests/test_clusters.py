"""Dask cluster profiles: every profile builds, a LocalCluster computes, a SLURMCluster and a Prefect flow run on
SLURM."""

from __future__ import annotations

import inspect
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from dask_jobqueue import SLURMCluster
from distributed import Client, LocalCluster
from prefect import flow, task
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, TaskRunFilter, TaskRunFilterFlowRunId
from prefect.utilities.importtools import from_qualified_name
from prefect_dask import DaskTaskRunner

from hopflow.deployments.clusters import (
    ClusterProfile,
    WorkerProbe,
    job_script,
    load_profiles,
    probe_worker,
    task_runner,
    task_runner_kwargs,
)
from hopflow.errors import ProfileError
from hopflow.settings import get_settings

SERVICES_HINT = "run the tests with `bash scripts/test.sh` (it starts PostgreSQL, SLURM and Prefect and exports it)"
SLURM_PROFILE = "slurm-small"
SITE_VARIABLES = ("HOPFLOW_SLURM_QUEUE", "HOPFLOW_SLURM_ACCOUNT", "HOPFLOW_DASK_INTERFACE")
WORKER_TIMEOUT_S = 90
probe_task = task(probe_worker, name="probe-worker")


def required_env(name: str) -> str:
    """The variable's value, or a test failure (never a skip) saying how to get it."""
    value = os.environ.get(name)
    if not value:
        pytest.fail(f"{name} is not set: {SERVICES_HINT}", pytrace=False)
    return value


@pytest.fixture(autouse=True)
def clean_settings(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No site overrides leak in from the caller's environment; settings re-read per test."""
    for name in (*SITE_VARIABLES, "HOPFLOW_DASK_WORKERS", "HOPFLOW_CLUSTER_PROFILES"):
        monkeypatch.delenv(name, raising=False)
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


@pytest.fixture
def slurm_test_overrides(tmp_path: Path) -> dict[str, Any]:
    """Shrink the SLURM profile to one core on the single-node test SLURM; job logs go to tmp_path."""
    required_env("SLURM_CONF")
    return {"cores": 1, "processes": 1, "memory": "1GB", "walltime": "00:10:00", "log-directory": str(tmp_path)}


def test_profile_file_has_a_local_default_and_slurm_profiles_per_stage_kind() -> None:
    profiles = load_profiles()
    assert get_settings().dask_profile in profiles
    assert profiles["local"].cluster == "local"
    assert {"slurm-small", "slurm-mlip", "slurm-vasp"} <= {n for n, p in profiles.items() if p.cluster == "slurm"}
    for profile in profiles.values():
        if profile.cluster == "slurm":
            assert profile.adapt_kwargs is not None
            assert profile.adapt_kwargs["minimum_jobs"] <= profile.adapt_kwargs["maximum_jobs"]


@pytest.mark.parametrize("name", sorted(load_profiles()))
def test_every_profile_builds_task_runner_kwargs(name: str) -> None:
    kwargs = task_runner_kwargs(name)
    cluster_class = from_qualified_name(kwargs["cluster_class"])
    profile: ClusterProfile = load_profiles()[name]
    if profile.cluster == "local":
        inspect.signature(cluster_class).bind(**kwargs["cluster_kwargs"])  # raises on an unknown argument
        assert kwargs["cluster_kwargs"]["dashboard_address"] == ":0"
    else:
        script = job_script(name)
        assert script.startswith("#!/usr/bin/env bash")
        assert f"#SBATCH -t {kwargs['cluster_kwargs']['walltime']}" in script
        assert "--interface lo" in script
        assert kwargs["cluster_kwargs"]["scheduler_options"]["dashboard_address"] == ":0"
    runner = DaskTaskRunner(**kwargs)
    assert runner.cluster_class == kwargs["cluster_class"]


def test_vasp_profile_asks_for_a_node_of_mpi_tasks_but_runs_one_worker_thread() -> None:
    script = job_script("slurm-vasp")
    assert "#SBATCH --ntasks-per-node=32" in script
    assert "#SBATCH --exclusive" in script
    assert "#SBATCH -n 1" not in script and "--cpus-per-task" not in script
    assert "module load vasp" in script
    assert "--nthreads 1 " in script


def test_queue_account_and_interface_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in zip(SITE_VARIABLES, ("gpu", "proj42", "ib0"), strict=True):
        monkeypatch.setenv(name, value)
    get_settings.cache_clear()
    assert (get_settings().slurm_queue, get_settings().slurm_account, get_settings().dask_interface) == (
        "gpu", "proj42", "ib0")
    kwargs = task_runner_kwargs("slurm-mlip")["cluster_kwargs"]
    assert kwargs["scheduler_options"]["interface"] == "ib0"
    script = job_script("slurm-mlip")
    assert "#SBATCH -p gpu" in script
    assert "#SBATCH -A proj42" in script
    assert "--interface ib0" in script


def test_local_worker_count_follows_the_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    assert task_runner_kwargs("local")["cluster_kwargs"]["n_workers"] == 2
    monkeypatch.setenv("HOPFLOW_DASK_WORKERS", "3")
    get_settings.cache_clear()
    assert task_runner_kwargs("local")["cluster_kwargs"]["n_workers"] == 3


def test_profile_file_and_default_profile_come_from_settings(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    path = tmp_path / "site.yaml"
    path.write_text("profiles:\n  site:\n    cluster: slurm\n    jobqueue: {cores: 2, memory: 2GB, queue: short}\n")
    monkeypatch.setenv("HOPFLOW_CLUSTER_PROFILES", str(path))
    monkeypatch.setenv("HOPFLOW_DASK_PROFILE", "site")
    get_settings.cache_clear()
    kwargs = task_runner_kwargs()
    assert kwargs["cluster_kwargs"]["queue"] == "short"
    assert kwargs["adapt_kwargs"] is None


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("  p:\n    cluster: slurm\n    jobqueue: {cpus: 4}\n", "unknown key 'cpus'"),
        ("  p:\n    cluster: slurm\n    jobqueue: {env-extra: [x]}\n", "use 'job-script-prologue'"),
        ("  p:\n    cluster: pbs\n", "cluster must be one of"),
        ("  p:\n    cluster: local\n    jobqueue: {cores: 1}\n", "not `jobqueue:`"),
        (
            "  p:\n    cluster: local\n    local: {n-workers: 1}\n    adapt: {maximum-jobs: 2}\n",
            "unknown key 'maximum-jobs'",
        ),
    ],
)
def test_malformed_profiles_are_refused_with_the_reason(tmp_path: Path, body: str, message: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("profiles:\n" + body)
    with pytest.raises(ProfileError, match=message):
        load_profiles(path)


def test_unknown_profile_and_override_keys_are_refused() -> None:
    with pytest.raises(ProfileError, match="no cluster profile 'nope'"):
        task_runner_kwargs("nope")
    with pytest.raises(ProfileError, match="unknown key 'gpus'"):
        task_runner_kwargs("slurm-small", overrides={"gpus": 1})


def test_local_profile_starts_a_loopback_cluster_that_computes() -> None:
    kwargs = task_runner_kwargs("local")
    with LocalCluster(**kwargs["cluster_kwargs"]) as cluster, Client(cluster) as client:
        assert cluster.scheduler_address.startswith("tcp://127.0.0.1:")
        squares = client.gather(client.map(lambda x: x * x, range(10)))
        probes = client.run(probe_worker)
    assert sum(squares) == 285
    assert len(probes) == 2
    assert os.getpid() not in {p.pid for p in probes.values()}  # worker processes, not threads
    assert not any(p.dask_profiler for p in probes.values())  # the nannies passed QUIET_DASK_CONFIG on


def _job_name(job_id: str) -> str:
    shown = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True, timeout=30)
    return shown.stdout.split("JobName=", 1)[1].split()[0]


@pytest.mark.slurm
def test_slurm_profile_runs_a_dask_worker_inside_a_slurm_job(slurm_test_overrides: dict[str, Any]) -> None:
    kwargs = task_runner_kwargs(SLURM_PROFILE, overrides=slurm_test_overrides)
    with SLURMCluster(**kwargs["cluster_kwargs"]) as cluster, Client(cluster) as client:
        cluster.scale(jobs=1)
        client.wait_for_workers(1, timeout=WORKER_TIMEOUT_S)
        probe: WorkerProbe = client.submit(probe_worker, pure=False).result(timeout=WORKER_TIMEOUT_S)
        job_ids = {job.job_id for job in cluster.workers.values()}
        assert probe.slurm_job_id in job_ids
        assert _job_name(probe.slurm_job_id) == "hopflow-small"
    assert probe.pid != os.getpid()
    assert probe.omp_num_threads == "1"  # the profile's job-script-prologue ran
    assert not probe.dask_profiler  # and the quiet Dask settings exported after it


@pytest.mark.slurm
@pytest.mark.prefect
def test_prefect_flow_runs_its_task_on_the_slurm_profile(slurm_test_overrides: dict[str, Any]) -> None:
    required_env("PREFECT_API_URL")
    runner = task_runner(SLURM_PROFILE, overrides=slurm_test_overrides, adapt_overrides={"maximum-jobs": 1})

    @flow(name="probe-slurm-profile", task_runner=runner)
    def probe_flow() -> WorkerProbe:
        return probe_task.submit().result()

    state = probe_flow(return_state=True)
    assert state.is_completed(), state.message
    probe: WorkerProbe = state.result()
    assert probe.slurm_job_id is not None and probe.slurm_job_id.isdigit()
    assert probe.pid != os.getpid()
    assert _job_name(probe.slurm_job_id) == "hopflow-small"
    with get_client(sync_client=True) as client:
        run_id = state.state_details.flow_run_id
        flow_runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id])))
        task_runs = client.read_task_runs(
            task_run_filter=TaskRunFilter(flow_run_id=TaskRunFilterFlowRunId(any_=[run_id]))
        )
    assert [r.state_type.value for r in flow_runs] == ["COMPLETED"]
    assert [(t.name.startswith("probe-worker"), t.state_type.value) for t in task_runs] == [(True, "COMPLETED")]
