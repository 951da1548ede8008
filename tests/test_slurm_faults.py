"""SLURM faults: the Dask worker job of a stage flow is cancelled with `scancel` mid-batch. The flow runs the lost
chunk again, split in halves, on a fresh job and completes it (chunk bisection); with bisection off it records the loss
against the chunk's items, sweep requeues them and a later flow run completes them. Each result is written once."""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dask
import pytest
from prefect.client.orchestration import SyncPrefectClient
from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterFlowRunId
from prefect.client.schemas.objects import StateType
from sqlalchemy import Engine, func, insert, select

from hopflow import queue
from hopflow.db import init_db, make_engine, session_scope
from hopflow.deployments.clusters import task_runner
from hopflow.flows.synthetic import synthetic
from hopflow.models import Run, RunState, SyntheticItem, SyntheticResult
from hopflow.settings import get_settings

from prefect_helpers import wait_for

SLURM_PROFILE = "slurm-small"
ITEMS = 4
SLEEP_MS = 8000.0  # each item sleeps up to 8 s: the batch is still running when its job is cancelled
WORKER_TIMEOUT_S = 180.0  # a SLURM job and a Dask worker on a loaded 2-core machine
FLOW_TIMEOUT_S = 240.0


@pytest.fixture
def slurm_overrides(tmp_path: Path) -> dict[str, Any]:
    """slurm-small shrunk to one core on the single-node test SLURM (as in test_clusters); job logs in tmp_path."""
    if not subprocess.run(["sinfo", "-h"], capture_output=True).stdout:
        pytest.fail("no SLURM: run the tests with `bash scripts/test.sh`", pytrace=False)
    return {"cores": 1, "processes": 1, "memory": "1GB", "walltime": "00:10:00", "log-directory": str(tmp_path)}


@pytest.fixture
def sqlite_engine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Engine]:
    """The flow runs in this process; one chunk per flow run, so the cancelled job holds the whole batch."""
    url = f"sqlite:///{tmp_path / 'slurm-faults.sqlite'}"
    monkeypatch.setenv("HOPFLOW_DATABASE_URL", url)
    monkeypatch.setenv("HOPFLOW_MAX_CHUNKS", "1")
    get_settings.cache_clear()
    from hopflow.db import get_engine

    get_engine.cache_clear()
    engine = init_db(make_engine(url))
    yield engine
    engine.dispose()
    get_engine.cache_clear()


def _squeue_jobs(name: str) -> list[tuple[str, str]]:
    """(job id, state) of the SLURM jobs with this name."""
    out = subprocess.run(["squeue", "-h", "-n", name, "-o", "%i %T"], capture_output=True, text=True, timeout=30)
    return [tuple(line.split()) for line in out.stdout.splitlines() if line.strip()]


def _chunk_running(client: SyncPrefectClient, flow_run_id: str) -> bool:
    runs = client.read_task_runs(task_run_filter=TaskRunFilter(flow_run_id=TaskRunFilterFlowRunId(any_=[flow_run_id])))
    return any(r.state_type == StateType.RUNNING for r in runs)


@pytest.mark.slow
@pytest.mark.slurm
@pytest.mark.prefect
@pytest.mark.parametrize("bisect", [True, False], ids=["bisect", "no-bisect"])
def test_scancel_of_the_worker_job_loses_no_item_and_writes_no_result_twice(
        sqlite_engine, slurm_overrides, prefect_client, monkeypatch, bisect):
    if not bisect:
        monkeypatch.setenv("HOPFLOW_CHUNK_BISECT_DEPTH", "0")
        get_settings.cache_clear()
    with session_scope(sqlite_engine, write=True) as session:
        session.execute(insert(SyntheticItem), [{"cpu_ms": 0.0, "sleep_ms": SLEEP_MS, "failure": "none",
                                                 "fail_attempts": 0, "priority": float(i)} for i in range(ITEMS)])
    claimed = [c.id for c in queue.claim("synthetic", ITEMS, engine=sqlite_engine, refresh=True, claimant="test")]
    assert len(claimed) == ITEMS
    runner = task_runner(SLURM_PROFILE, overrides=slurm_overrides, adapt_overrides={"maximum-jobs": 1})
    flow_on_slurm = synthetic.with_options(task_runner=runner)
    flow_run_ids: list[str] = []
    states: list[Any] = []
    # A worker that dies while running a task fails that task at once (Dask does not rerun it on a fresh job): what
    # happens next is the flow's (bisection) or the queue's (a later flow run).
    with dask.config.set({"distributed.scheduler.allowed-failures": 0}):
        thread = threading.Thread(target=lambda: states.append(flow_on_slurm(run_ids=claimed, return_state=True)))
        thread.start()
        try:
            def running_job() -> str | None:
                with session_scope(sqlite_engine) as session:
                    owners = session.execute(select(Run.flow_run_id, Run.state).where(Run.id.in_(claimed))).all()
                if {s for _, s in owners} != {RunState.RUNNING}:
                    return None
                if not flow_run_ids:
                    flow_run_ids.append(owners[0][0])
                jobs = [job for job, state in _squeue_jobs("hopflow-small") if state == "RUNNING"]
                return jobs[0] if jobs and _chunk_running(prefect_client, flow_run_ids[0]) else None

            job_id = wait_for(running_job, timeout=WORKER_TIMEOUT_S, interval=0.5,
                              what="the chunk to run on a SLURM worker job")
            time.sleep(1.0)  # mid-batch: the chunk is sleeping through its items
            with session_scope(sqlite_engine) as session:
                assert session.scalar(select(func.count()).select_from(SyntheticResult)) == 0
            subprocess.run(["scancel", job_id], check=True, timeout=30)
        finally:
            thread.join(FLOW_TIMEOUT_S)
    assert not thread.is_alive(), "the flow run did not finish after its worker job was cancelled"
    assert states and states[0].is_completed(), states
    first = states[0].result()
    if bisect:  # the halves ran on a fresh job within the same flow run: every item done at its first attempt
        assert sorted(first.done) == sorted(claimed) and not first.failed
        with session_scope(sqlite_engine) as session:
            runs = session.scalars(select(Run).where(Run.id.in_(claimed))).all()
            per_item = dict(session.execute(select(SyntheticResult.item_id, func.count())
                                            .group_by(SyntheticResult.item_id)).all())
            assert {r.state for r in runs} == {RunState.DONE}
            assert all(r.attempts == 1 and not r.history and r.flow_run_id == flow_run_ids[0] for r in runs)
            assert per_item == {r.input_id: 1 for r in runs}
        return
    assert sorted(first.failed) == sorted(claimed) and not first.done
    assert all("KilledWorker" in message for message in first.failed.values()), first.failed

    # sweep requeues the lost batch; a later flow run on a fresh SLURM job completes it
    with session_scope(sqlite_engine, write=True) as session:
        swept = queue.sweep(session, stage="synthetic")
    assert sorted(swept.requeued) == sorted(claimed)
    again = [c.id for c in queue.claim("synthetic", ITEMS, engine=sqlite_engine, claimant="test")]
    assert sorted(again) == sorted(claimed)
    second_state = flow_on_slurm(run_ids=again, return_state=True)
    assert second_state.is_completed(), second_state.message
    second = second_state.result()
    assert sorted(second.done) == sorted(claimed) and not second.failed

    with session_scope(sqlite_engine) as session:
        runs = session.scalars(select(Run).where(Run.id.in_(claimed))).all()
        per_item = dict(session.execute(select(SyntheticResult.item_id, func.count())
                                        .group_by(SyntheticResult.item_id)).all())
        flow_runs = {r.id: r.flow_run_id for r in runs}
        assert {r.state for r in runs} == {RunState.DONE}
        assert all(r.attempts == 2 and "KilledWorker" in r.history[0]["error"] for r in runs)
        assert per_item == {r.input_id: 1 for r in runs}  # no result written twice
    assert flow_run_ids[0] not in set(flow_runs.values())  # completed by the later flow run
    assert _squeue_jobs("hopflow-small") == [] or all(s != "RUNNING" for _, s in _squeue_jobs("hopflow-small"))
