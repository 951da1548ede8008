"""Graceful stop: SIGTERM to a running stage flow, its cancellation in Prefect, or Ctrl-C to a batch command gives its
claims back to the queue at once (not at lease expiry)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from datetime import UTC
from pathlib import Path
from typing import Any

import httpx
import pytest
from prefect.client.schemas.objects import StateType
from prefect.states import Cancelling
from sqlalchemy import select

from hopflow import queue
from hopflow.db import init_db, make_engine, session_scope, utcnow
from hopflow.models import Run, RunState, SyntheticItem

from prefect_helpers import (
    add_synthetic_items,
    delete_waiting_runs,
    deploy_stage,
    start_worker,
    stop_process_group,
    wait_for,
    wait_for_worker,
)

ROOT = Path(__file__).resolve().parents[1]
ITEMS = 3
WAIT_S = 180.0  # generous bound for the subprocess to start Prefect and Dask on a loaded 2-core machine
POLL_S = 0.5
SETTLE_S = 3.0  # let the flow finish its start-up imports before the stop request (see _stop_until_released)
RESEND_S = 20.0


def _states(engine, run_ids: list[int]) -> list[Run]:
    with session_scope(engine) as session:
        runs = session.scalars(select(Run).where(Run.id.in_(run_ids)).order_by(Run.id)).all()
        session.expunge_all()
        return list(runs)


def _wait_for(engine, run_ids: list[int], state: str, proc: subprocess.Popen[bytes] | None, log: Path) -> list[Run]:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        runs = _states(engine, run_ids)
        if all(r.state == state for r in runs):
            return runs
        if state == RunState.RUNNING and proc is not None and proc.poll() is not None:
            raise AssertionError(f"flow process exited ({proc.returncode}) first:\n{log.read_text()[-4000:]}")
        time.sleep(POLL_S)
    raise AssertionError(f"runs never all {state}: {[(r.id, r.state) for r in runs]}\n{log.read_text()[-4000:]}")


def _stop_until_released(engine, run_ids: list[int], stop: Any, log: Path) -> list[Run]:
    """Ask the flow to stop, then wait for its claims to come back.

    Python runs a signal handler between any two bytecodes, also inside callbacks whose exceptions it ignores (seen:
    importlib's module-lock weakref callback during start-up imports), and then the handler's exception is lost.
    Prefect's own SIGTERM bridge has the same limit; runners follow up with SIGKILL, after which the controller's sweep
    requeues the work. So the request is repeated, as a supervisor would, if nothing came back within RESEND_S."""
    time.sleep(SETTLE_S)
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        stop()
        resend_at = time.monotonic() + RESEND_S
        while time.monotonic() < resend_at:
            runs = _states(engine, run_ids)
            if all(r.state == RunState.QUEUED for r in runs):
                return runs
            time.sleep(POLL_S)
    raise AssertionError(f"runs never all queued: {[(r.id, r.state) for r in runs]}\n{log.read_text()[-4000:]}")


def test_sigterm_releases_claims_at_once(tmp_path) -> None:
    assert os.environ.get("PREFECT_API_URL"), "run through scripts/test.sh (it starts the Prefect server)"
    url = f"sqlite:///{tmp_path / 'stop.sqlite'}"
    engine = init_db(make_engine(url))
    with session_scope(engine, write=True) as session:
        session.add_all(SyntheticItem(cpu_ms=0.0, failure="hang", fail_attempts=1, priority=i) for i in range(ITEMS))
    claimed = queue.claim("synthetic", ITEMS, engine=engine, refresh=True, claimant="graceful-stop-test")
    run_ids = [c.id for c in claimed]
    assert len(run_ids) == ITEMS

    env = {**os.environ, "HOPFLOW_DATABASE_URL": url, "HOPFLOW_HOME": str(tmp_path / "home"),
           "HOPFLOW_PROFILE_SYNTHETIC": "local-threads", "PYTHONPATH": str(ROOT)}
    code = f"from hopflow.flows.synthetic import synthetic; synthetic(run_ids={run_ids!r})"
    log = tmp_path / "flow.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        running = _wait_for(engine, run_ids, RunState.RUNNING, proc, log)
        assert all(r.attempts == 1 and r.flow_run_id for r in running)
        lease_ends = min(r.lease_expires_at for r in running)

        released = _stop_until_released(engine, run_ids, lambda: proc.send_signal(signal.SIGTERM), log)
        # given back by the flow itself, long before any lease could expire (the stage's lease is 300 s)
        assert utcnow() < (lease_ends if lease_ends.tzinfo else lease_ends.replace(tzinfo=UTC))
        assert all(r.attempts == 0 and r.claimant is None and r.lease_expires_at is None and r.flow_run_id is None
                   for r in released)
        assert all(r.error is None for r in released)
        try:
            proc.wait(timeout=30)  # a hung worker thread may keep the process a while; its claims are back already
        except subprocess.TimeoutExpired:
            pass
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    # the released items are claimable again, first in priority order
    again = queue.claim("synthetic", ITEMS, engine=engine, claimant="after-stop")
    assert sorted(c.id for c in again) == sorted(run_ids)
    engine.dispose()


@pytest.mark.prefect
def test_prefect_cancellation_releases_claims_at_once(prefect_client, tmp_path) -> None:
    """Cancel a running stage flow from Prefect (as the UI's Cancel button does): the process worker stops its process,
    the flow gives its claims back at once, and Prefect records the flow run as Cancelled."""
    from hopflow.deployments.bootstrap import POOL_NAME
    from hopflow.flows.controller import tick
    from hopflow.registry import get_stage

    url = f"sqlite:///{tmp_path / 'cancel.sqlite'}"
    engine = init_db(make_engine(url))
    with session_scope(engine, write=True) as session:
        session.add_all(SyntheticItem(cpu_ms=0.0, failure="hang", fail_attempts=1, priority=i) for i in range(ITEMS))
        queue.set_target(session, get_stage("synthetic"), 1, "cancellation test")
    deployment = deploy_stage(prefect_client, "synthetic/synthetic")
    since = time.time()
    worker = start_worker(POOL_NAME, {
        "HOPFLOW_DATABASE_URL": url, "HOPFLOW_HOME": str(tmp_path / "home"),
        "HOPFLOW_PROFILE_SYNTHETIC": "local-threads",
        "PREFECT_WORKER_QUERY_SECONDS": "1", "PREFECT_WORKER_PREFETCH_SECONDS": "1"}, tmp_path / "worker.log")
    log = tmp_path / "worker.log"
    try:
        wait_for_worker(prefect_client, POOL_NAME, since)
        report = tick(prefect_client, engine=engine, stages=["synthetic"], batch_sizes={"synthetic": ITEMS},
                      mirror=False, publish=False)
        (stage_tick,) = report.stages
        assert stage_tick.error is None and len(stage_tick.submitted) == 1, stage_tick
        with session_scope(engine) as session:
            run_ids = list(session.scalars(select(Run.id).where(Run.stage == "synthetic").order_by(Run.id)))
        running = _wait_for(engine, run_ids, RunState.RUNNING, None, log)
        (flow_run_id,) = {r.flow_run_id for r in running}
        lease_ends = min(r.lease_expires_at for r in running)

        time.sleep(SETTLE_S)
        prefect_client.set_flow_run_state(flow_run_id, Cancelling(), force=True)
        released = _wait_for(engine, run_ids, RunState.QUEUED, None, log)
        assert utcnow() < (lease_ends if lease_ends.tzinfo else lease_ends.replace(tzinfo=UTC))
        assert all(r.attempts == 0 and r.claimant is None and r.flow_run_id is None and r.error is None
                   for r in released)
        state = wait_for(lambda: (s := prefect_client.read_flow_run(flow_run_id).state) and s.is_final() and s,
                         timeout=WAIT_S, what="the cancelled flow run to reach a final state")
        assert state.type == StateType.CANCELLED, (state, log.read_text()[-4000:])
    finally:
        stop_process_group(worker)
        delete_waiting_runs(prefect_client, deployment.id)
    again = queue.claim("synthetic", ITEMS, engine=engine, claimant="after-cancel")
    assert sorted(c.id for c in again) == sorted(run_ids)
    engine.dispose()


def test_claims_go_back_even_when_the_signal_handlers_exception_is_lost(engine, monkeypatch) -> None:
    """The release must not depend on the handler's exception reaching the stage's frame: here the Python handler
    swallows SIGTERM (as when it lands in a callback whose errors are ignored), and the claims still go back."""
    from hopflow.flows.runner import release_on_termination

    add_synthetic_items(engine, ITEMS)
    claimed = queue.claim("synthetic", ITEMS, engine=engine, refresh=True, claimant="lost-exception-test")
    run_ids = [c.id for c in claimed]
    with session_scope(engine, write=True) as session:
        queue.start(session, run_ids)
    swallowed: list[int] = []
    previous = signal.signal(signal.SIGTERM, lambda signum, _frame: swallowed.append(signum))
    try:
        with release_on_termination(run_ids) as open_claims:
            open_claims.discard(run_ids[0])  # finished before the stop: not released
            os.kill(os.getpid(), signal.SIGTERM)
            deadline = time.monotonic() + 10.0
            while any(r.state != RunState.QUEUED for r in _states(engine, run_ids[1:])):
                assert time.monotonic() < deadline, [(r.id, r.state) for r in _states(engine, run_ids)]
                time.sleep(0.05)
            assert swallowed == [signal.SIGTERM]  # no exception came: the releaser thread gave the claims back
            assert not open_claims
    finally:
        signal.signal(signal.SIGTERM, previous)
    runs = _states(engine, run_ids)
    assert runs[0].state == RunState.RUNNING and runs[0].attempts == 1
    assert all(r.state == RunState.QUEUED and r.attempts == 0 and r.claimant is None for r in runs[1:])


@pytest.mark.slow
def test_ctrl_c_in_batch_mode_gives_claims_back_stops_the_temporary_server_last_and_fails(tmp_path) -> None:
    """`hopflow run` with its own temporary Prefect server, stopped by Ctrl-C to its whole process group: exit code
    130 within 10 s (items still sleeping in worker threads do not hold it), every claim back in the queue, and the
    temporary server, which the Ctrl-C did not reach, stopped by the command at the end."""
    url = f"sqlite:///{tmp_path / 'ctrl-c.sqlite'}"
    engine = init_db(make_engine(url))
    with session_scope(engine, write=True) as session:
        # items that hang on their first attempt (a sleep of an hour): none can finish before the Ctrl-C
        session.add_all(SyntheticItem(cpu_ms=0.0, sleep_ms=0.0, failure="hang", fail_attempts=1, priority=i)
                        for i in range(ITEMS))
    env = {key: value for key, value in os.environ.items() if key != "PREFECT_API_URL"}  # batch mode: its own server
    env.update({"HOPFLOW_DATABASE_URL": url, "HOPFLOW_HOME": str(tmp_path / "home"),
                "HOPFLOW_PROFILE_SYNTHETIC": "local-threads", "PYTHONPATH": str(ROOT)})
    log = tmp_path / "run.log"
    with log.open("wb") as out:
        # as from a terminal: SIGINT at its default (a shell starts background jobs, CI's too, with it ignored)
        proc = subprocess.Popen([str(Path(sys.executable).with_name("hopflow")), "run", "synthetic"], cwd=ROOT,
                                env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + WAIT_S
        while True:
            with session_scope(engine) as session:
                states = list(session.scalars(select(Run.state)))
            if len(states) == ITEMS and set(states) == {RunState.RUNNING}:
                break
            assert proc.poll() is None, f"the command ended first ({proc.returncode}):\n{log.read_text()[-4000:]}"
            assert time.monotonic() < deadline, f"items never all running: {states}\n{log.read_text()[-4000:]}"
            time.sleep(POLL_S)
        time.sleep(SETTLE_S)
        os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
        interrupted_at = time.monotonic()
        code = proc.wait(timeout=60)
        took = time.monotonic() - interrupted_at
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    output = log.read_text()
    assert code == 130, output[-4000:]
    assert took < 10.0, f"{took:.1f} s from Ctrl-C to exit"
    assert "interrupted: unfinished claims went back to the queue" in output
    with session_scope(engine) as session:
        runs = session.scalars(select(Run)).all()
        assert [(r.state, r.attempts, r.claimant) for r in runs] == [(RunState.QUEUED, 0, None)] * ITEMS
    servers = re.findall(r"Stopping temporary server on (http://\S+)", output)
    assert len(servers) == 1, output[-4000:]
    with pytest.raises(httpx.ConnectError):  # stopped by the command, not left behind
        httpx.get(f"{servers[0]}/health", timeout=5)
    engine.dispose()
