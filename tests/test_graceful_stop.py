"""Graceful stop: SIGTERM to a running stage flow gives its claims back to the queue at once (not at lease expiry)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from datetime import timezone
from pathlib import Path

from sqlalchemy import select

from hopflow import queue
from hopflow.db import init_db, make_engine, session_scope, utcnow
from hopflow.models import Run, RunState, SyntheticItem

ROOT = Path(__file__).resolve().parents[1]
ITEMS = 3
WAIT_S = 180.0  # generous bound for the subprocess to start Prefect and Dask on a loaded 2-core machine
POLL_S = 0.5


def _states(engine, run_ids: list[int]) -> list[Run]:
    with session_scope(engine) as session:
        runs = session.scalars(select(Run).where(Run.id.in_(run_ids)).order_by(Run.id)).all()
        session.expunge_all()
        return list(runs)


def _wait_for(engine, run_ids: list[int], state: str, proc: subprocess.Popen[bytes], log: Path) -> list[Run]:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        runs = _states(engine, run_ids)
        if all(r.state == state for r in runs):
            return runs
        if state == RunState.RUNNING and proc.poll() is not None:
            raise AssertionError(f"flow process exited ({proc.returncode}) first:\n{log.read_text()[-4000:]}")
        time.sleep(POLL_S)
    raise AssertionError(f"runs never all {state}: {[(r.id, r.state) for r in runs]}\n{log.read_text()[-4000:]}")


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
    code = f"from flows.synthetic import synthetic; synthetic(run_ids={run_ids!r})"
    log = tmp_path / "flow.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        running = _wait_for(engine, run_ids, RunState.RUNNING, proc, log)
        assert all(r.attempts == 1 and r.flow_run_id for r in running)
        lease_ends = min(r.lease_expires_at for r in running)

        proc.send_signal(signal.SIGTERM)
        released = _wait_for(engine, run_ids, RunState.QUEUED, proc, log)
        # given back by the flow itself, long before any lease could expire (the stage's lease is 300 s)
        assert utcnow() < (lease_ends if lease_ends.tzinfo else lease_ends.replace(tzinfo=timezone.utc))
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
