"""Orchestration end to end: `prefect deploy`, a real process worker, the synthetic stage and controller ticks driven
by the test (target kept, target lowered, a flow-run process killed, no result twice); and the orchestration CLI."""

from __future__ import annotations

import itertools
import os
import signal
import time

import pytest
import typer
from prefect.client.schemas.objects import StateType
from sqlalchemy import func, select, update
from typer.testing import CliRunner

from hopflow import queue
from hopflow.cli import orchestration
from hopflow.db import session_scope, utcnow
from hopflow.deployments.bootstrap import POOL_NAME, deploy_all, ensure_work_pool, pause_services
from hopflow.flows import controller as ctl
from hopflow.flows import mirror, submission
from hopflow.models import Run, RunState, StageSetting, SyntheticItem, SyntheticResult
from hopflow.registry import get_stage

from prefect_helpers import (
    add_synthetic_items,
    create_deployment,
    delete_deployment,
    deployment_flow_runs,
    entrypoint_file,
    flow_run_pids,
    start_worker,
    stop_process_group,
    wait_for,
    yaml_deployments,
)

SYNTHETIC = "synthetic"
ITEMS = 40
BATCH = 10
FLOW_RUN_START_S = 180.0
SLOW_SLEEP_MS = 4000.0  # the first batch sleeps up to 4 s per item: a wide window to kill its flow run mid-run
TICK_INTERVAL_S = 1.0
DRAIN_TIMEOUT_S = 150.0
THREADED_PROFILE = """\
profiles:
  threads:
    description: "tests: the flow-run process itself runs the tasks on two threads"
    cluster: local
    local:
      n-workers: 1
      threads-per-worker: 2
      processes: false
      dashboard-address: ":0"
"""


def _set_target(engine, n: int) -> None:
    with session_scope(engine, write=True) as session:
        queue.set_target(session, get_stage(SYNTHETIC), n, "acceptance test")


def _counts(engine) -> dict[str, int]:
    with session_scope(engine) as session:
        return queue.counts_by_state(session).get(SYNTHETIC, {})


def _deploy_stage_deployment(client) -> object:
    """`prefect deploy` of the project (every deployment whose flow file exists), services paused, queue emptied."""
    ensure_work_pool(client)
    names = yaml_deployments()
    present = [name for name, d in names.items() if entrypoint_file(d).exists()]
    done = deploy_all(names=None if len(present) == len(names) else present)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    pause_services(client)
    deployment = client.read_deployment_by_name(get_stage(SYNTHETIC).deployment)
    for run in deployment_flow_runs(client, deployment.id):  # leftovers of earlier runs must not count as live
        if run.state_type in (StateType.SCHEDULED, StateType.PENDING, StateType.RUNNING):
            client.delete_flow_run(run.id)
    return deployment


def _kill_flow_run_of(engine, run_ids: set[int]) -> tuple[str, set[int]]:
    """SIGKILL the flow-run process that is running these runs, once they are running.

    Returns its flow run id and the runs it left unfinished (items that ended before the kill are done).
    """
    def running_owner() -> str | None:
        # one flow run started them all and some are still running (a fast item may already be done: its sleep is
        # random, so waiting for all ten to be running at once can miss a short window on a loaded machine)
        with session_scope(engine) as session:
            owners = session.execute(select(Run.flow_run_id, Run.state).where(Run.id.in_(run_ids))).all()
        states = {state for _, state in owners}
        if RunState.RUNNING in states and states <= {RunState.RUNNING, RunState.DONE} \
                and len({fr for fr, _ in owners}) == 1:
            return owners[0][0]
        return None

    # a flow-run process took 63 s to start in one CI run (three at once on a loaded 2-core machine)
    flow_run_id = wait_for(running_owner, timeout=FLOW_RUN_START_S, interval=0.1,
                           what="the slow batch to start running")
    pids = wait_for(lambda: flow_run_pids(flow_run_id), timeout=10, what="the flow-run process")
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not flow_run_pids(flow_run_id), timeout=10, what="the killed process to be gone")
    with session_scope(engine) as session:
        unfinished = set(session.scalars(select(Run.id).where(Run.id.in_(run_ids), Run.state == RunState.RUNNING)))
    return flow_run_id, unfinished


@pytest.mark.slow
@pytest.mark.prefect
def test_controller_drains_the_synthetic_stage_through_a_real_worker(engine, prefect_client, tmp_path):
    url = engine.url.render_as_string(hide_password=False)  # the worker's flow runs share this database
    deployment = _deploy_stage_deployment(prefect_client)
    slow = add_synthetic_items(engine, BATCH, cpu_ms=20.0, sleep_ms=SLOW_SLEEP_MS)
    add_synthetic_items(engine, ITEMS - BATCH, cpu_ms=20.0, sleep_ms=200.0, priorities=range(BATCH, ITEMS))
    profiles = tmp_path / "profiles.yaml"
    profiles.write_text(THREADED_PROFILE)
    worker = start_worker(POOL_NAME, {
        "HOPFLOW_DATABASE_URL": url, "HOPFLOW_CLUSTER_PROFILES": str(profiles), "HOPFLOW_PROFILE_SYNTHETIC": "threads",
        "PREFECT_WORKER_QUERY_SECONDS": "1", "PREFECT_WORKER_PREFETCH_SECONDS": "2"}, tmp_path / "worker.log")
    _set_target(engine, 3)
    ticks: list[tuple[int, ctl.StageTick]] = []
    live_seen: list[tuple[int, int]] = []  # (target, live right after the tick)
    killed, interrupted = None, set()
    lowered = False
    try:
        deadline = time.monotonic() + DRAIN_TIMEOUT_S
        while _counts(engine).get(RunState.DONE, 0) < ITEMS:
            assert time.monotonic() < deadline, f"not drained: {_counts(engine)}; see {tmp_path / 'worker.log'}"
            target = 1 if lowered else 3
            report = ctl.tick(prefect_client, stages=[SYNTHETIC], batch_sizes={SYNTHETIC: BATCH}, mirror=False,
                              publish=False)
            (stage_tick,) = report.stages
            assert stage_tick.error is None, stage_tick.error
            ticks.append((target, stage_tick))
            live_seen.append((target, submission.count_live(prefect_client, deployment.id)))
            if killed is None:
                with session_scope(engine) as session:
                    slow_runs = set(session.scalars(select(Run.id).where(Run.stage == SYNTHETIC,
                                                                         Run.input_id.in_(slow))))
                killed, interrupted = _kill_flow_run_of(engine, slow_runs)
            elif not lowered and _counts(engine).get(RunState.DONE, 0) >= ITEMS // 2:
                _set_target(engine, 1)
                lowered = True
            time.sleep(TICK_INTERVAL_S)
    finally:
        stop_process_group(worker)
        for run in deployment_flow_runs(prefect_client, deployment.id):
            if run.state_type in (StateType.SCHEDULED, StateType.PENDING):
                prefect_client.delete_flow_run(run.id)

    # the target holds: a tick never submits past it, and live runs never exceed it
    for target, stage_tick in ticks:
        assert stage_tick.target == target
        assert len(stage_tick.submitted) <= max(0, target - stage_tick.live)
    assert max(live for target, live in live_seen if target == 3) <= 3
    assert lowered, "the target was never lowered"
    after = [stage_tick for target, stage_tick in ticks if target == 1]
    assert after[0].submitted == () or after[0].live == 0  # the next tick already obeys the new target
    # runs submitted under the old target may still be draining the last items; none is added above the new one:
    # live after the lowering only falls (runs finish) or rises to 1 (a submission at 0 live)
    live_after = [live for target, live in live_seen if target == 1]
    assert all(b <= max(a, 1) for a, b in itertools.pairwise(live_after)), live_after

    # the killed flow run crashed, its items were requeued by sweep and completed later, once each
    assert prefect_client.read_flow_run(killed).state_type == StateType.CRASHED
    with session_scope(engine) as session:
        runs = session.scalars(select(Run).where(Run.stage == SYNTHETIC)).all()
        per_item = dict(session.execute(select(SyntheticResult.item_id, func.count()).group_by(
            SyntheticResult.item_id)).all())
        items = session.scalar(select(func.count()).select_from(SyntheticItem))
    assert items == ITEMS and len(runs) == ITEMS
    assert {r.state for r in runs} == {RunState.DONE}
    assert per_item == {r.input_id: 1 for r in runs}  # no result written twice
    assert interrupted, "every item of the killed flow run had finished before the kill"
    lost_attempts = 2  # a lost run spends its attempt (HOPFLOW_ISOLATE_CRASHED_BATCHES is off)
    for run in runs:
        if run.id in interrupted:
            assert run.attempts == lost_attempts and f"flow run {killed} ended Crashed" in run.history[-1]["error"]
        else:
            assert run.attempts == 1 and not run.history


# ---------------------------------------------------------------- the command line


@pytest.fixture
def cli():
    app = typer.Typer()
    orchestration.register(app)
    runner = CliRunner()
    return lambda *args: runner.invoke(app, [str(a) for a in args])


def test_target_command_records_the_target(engine, cli):
    result = cli("target", SYNTHETIC, 4, "--reason", "more throughput")
    assert result.exit_code == 0, result.output
    assert "synthetic: target 4" in result.output
    with session_scope(engine) as session:
        assert queue.target(session, get_stage(SYNTHETIC)) == 4
        reason = session.scalars(select(StageSetting.reason).where(StageSetting.stage == SYNTHETIC)).one()
    assert reason == "more throughput"
    assert cli("target", SYNTHETIC, 4).output.strip().endswith("(unchanged)")
    assert cli("target", "no-such-stage", 1).exit_code != 0
    assert cli("target", SYNTHETIC, -1).exit_code != 0


@pytest.mark.prefect
def test_submit_command_claims_through_the_queue(engine, cli, prefect_client):
    name, deployment_id = create_deployment(prefect_client)
    try:
        items = add_synthetic_items(engine, 6)
        result = cli("submit", SYNTHETIC, items[0], items[1], items[2], "--batch-size", 2, "--deployment", name)
        assert result.exit_code == 0, result.output
        assert "3 runs claimed" in result.output
        again = cli("submit", SYNTHETIC, items[2], items[3], "--deployment", name)
        assert again.exit_code == 0 and f"not queued (already claimed, running, done or failed, or not an input): " \
            f"{items[2]}" in again.output
        runs = deployment_flow_runs(prefect_client, deployment_id)
        assert sorted(len(r.parameters["run_ids"]) for r in runs) == [1, 1, 2]
    finally:
        delete_deployment(prefect_client, deployment_id)
    assert _counts(engine) == {RunState.CLAIMED: 4, RunState.QUEUED: 2}


def test_sweep_command_requeues_expired_leases(engine, cli):
    add_synthetic_items(engine, 3)
    claimed = queue.claim(SYNTHETIC, 2, engine=engine, refresh=True)
    with session_scope(engine, write=True) as session:
        session.execute(update(Run).where(Run.id == claimed[0].id).values(lease_expires_at=utcnow()))
    result = cli("sweep", "--no-prefect")
    assert result.exit_code == 0, result.output
    assert "requeued 1, failed for good 0" in result.output and "lease expired" in result.output
    assert _counts(engine) == {RunState.QUEUED: 2, RunState.CLAIMED: 1}


@pytest.mark.prefect
def test_bootstrap_tick_and_maintenance_commands(engine, cli, prefect_client, tmp_path):
    result = cli("bootstrap")
    assert result.exit_code == 0, result.output
    assert prefect_client.read_work_pool(POOL_NAME).type == "process"
    assert prefect_client.read_variable_by_name(mirror.TARGETS_VARIABLE).value[SYNTHETIC] == 0
    tick = cli("tick", "--no-publish")
    assert tick.exit_code == 0 and "no stage has a target" in tick.output
    add_synthetic_items(engine, 4)
    checkpoint = cli("checkpoint", "--dest", tmp_path / "ck")
    assert checkpoint.exit_code == 0, checkpoint.output
    (folder,) = (tmp_path / "ck").iterdir()
    assert (folder / "tables" / "synthetic_items.parquet").exists() and "tables" in checkpoint.output
    cleanup = cli("cleanup", "--older-than-days", 3650)
    assert cleanup.exit_code == 0 and cleanup.output.startswith("deleted ")


# ---------------------------------------------------------------- the acceptance on a science stage


@pytest.mark.slow
@pytest.mark.prefect
@pytest.mark.parametrize("db_url", ["postgres"], indirect=True)  # the SQLite path is covered by the synthetic test
def test_controller_drains_twenty_structures_through_the_pathways_stage(engine, prefect_client, tmp_path):
    from hopflow.flows.batch import import_raw_inputs
    from hopflow.models import Pathway, Structure
    from hopflow.tasks.structures import bundled_inputs

    stage = get_stage("pathways")
    outcomes = import_raw_inputs(bundled_inputs()[:20])
    assert sum(o["new"] for o in outcomes) == 20
    _deploy_stage_deployment(prefect_client)
    deployment = prefect_client.read_deployment_by_name(stage.deployment)
    url = engine.url.render_as_string(hide_password=False)
    profiles = tmp_path / "profiles.yaml"
    profiles.write_text(THREADED_PROFILE)
    worker = start_worker(POOL_NAME, {
        "HOPFLOW_DATABASE_URL": url, "HOPFLOW_CLUSTER_PROFILES": str(profiles), "HOPFLOW_PROFILE_PATHWAYS": "threads",
        "PREFECT_WORKER_QUERY_SECONDS": "1", "PREFECT_WORKER_PREFETCH_SECONDS": "2"}, tmp_path / "worker.log")
    with session_scope(engine, write=True) as session:
        queue.set_target(session, stage, 3, "acceptance test")
    live_seen: list[int] = []
    try:
        deadline = time.monotonic() + 240.0
        while True:
            with session_scope(engine) as session:
                counts = queue.counts_by_state(session).get("pathways", {})
            if counts.get(RunState.DONE, 0) + counts.get(RunState.FAILED, 0) == 20:
                break
            assert time.monotonic() < deadline, f"not drained: {counts}; see {tmp_path / 'worker.log'}"
            report = ctl.tick(prefect_client, stages=["pathways"], batch_sizes={"pathways": 2}, mirror=False,
                              publish=False)
            (stage_tick,) = report.stages
            assert stage_tick.error is None, stage_tick.error
            assert len(stage_tick.submitted) <= max(0, 3 - stage_tick.live)
            live_seen.append(submission.count_live(prefect_client, deployment.id))
            time.sleep(TICK_INTERVAL_S)
    finally:
        stop_process_group(worker)
        for run in deployment_flow_runs(prefect_client, deployment.id):
            if run.state_type in (StateType.SCHEDULED, StateType.PENDING):
                prefect_client.delete_flow_run(run.id)
    assert max(live_seen) <= 3
    with session_scope(engine) as session:
        runs = session.scalars(select(Run).where(Run.stage == "pathways")).all()
        assert {r.state for r in runs} == {RunState.DONE}, [(r.input_id, r.error) for r in runs if r.error]
        per_structure = dict(session.execute(select(Pathway.structure_id, func.count(func.distinct(Pathway.run_id)))
                                             .group_by(Pathway.structure_id)).all())
        structures = set(session.scalars(select(Structure.id)))
    assert set(per_structure) == structures and set(per_structure.values()) == {1}  # every structure, once
