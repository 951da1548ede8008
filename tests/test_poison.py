"""Poison isolation in the queue: with HOPFLOW_ISOLATE_CRASHED_BATCHES a crashed batch's runs come back without
an attempt counted and in smaller batches (without it they spend the attempt); claims never handed to a flow run come
back free; leases renew. Inside a flow run: a chunk whose Dask worker an item kills is bisected until the item fails
alone."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from types import SimpleNamespace

import dask
import pytest
from sqlalchemy import insert, select

from hopflow import queue
from hopflow.db import session_scope
from hopflow.models import Run, RunState, SyntheticItem
from hopflow.registry import get_stage
from hopflow.settings import get_settings

from prefect_helpers import prefect_api_url

SYN = "synthetic"


def _add(engine, kinds: list[str], fail_attempts: int = 1) -> None:
    with session_scope(engine, write=True) as s:
        s.execute(insert(SyntheticItem), [{"cpu_ms": 0.0, "sleep_ms": 0.0, "failure": kind,
                                           "fail_attempts": fail_attempts, "priority": float(i)}
                                          for i, kind in enumerate(kinds)])


@pytest.fixture
def isolation(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("HOPFLOW_ISOLATE_CRASHED_BATCHES", "1")
    get_settings.cache_clear()
    yield
    monkeypatch.delenv("HOPFLOW_ISOLATE_CRASHED_BATCHES")
    get_settings.cache_clear()


def _crash(engine, run_ids: list[int], flow_run_id: str) -> queue.SweepReport:
    """The runs' flow run starts them, then its process dies (Prefect reports it Crashed)."""
    with session_scope(engine, write=True) as s:
        queue.start(s, run_ids, flow_run_id=flow_run_id)
    with session_scope(engine, write=True) as s:
        return queue.sweep(s, lost_flow_runs={flow_run_id: "Crashed"})


def test_a_crashed_batch_comes_back_free_in_halves_until_one_run_is_lost_alone(engine, isolation) -> None:
    _add(engine, ["none"] * 8)
    sizes = []
    batch = [c.id for c in queue.claim(SYN, 8, engine=engine, refresh=True)]
    for crash in range(3):
        sizes.append(len(batch))
        report = _crash(engine, batch, f"flow-{crash}")
        assert sorted(report.requeued) == sorted(batch)
        batch = [c.id for c in queue.claim(SYN, 8, engine=engine)]
    assert sizes == [8, 4, 2] and len(batch) == 1  # each crash halves the batch its runs may be claimed in
    with session_scope(engine) as s:
        runs = {r.id: r for r in s.scalars(select(Run))}
    lone = runs[batch[0]]
    assert lone.attempts == 1  # claimed again now; every crash with company was free
    assert "attempt not counted" in lone.history[0]["error"] and "ended Crashed" in lone.history[0]["error"]
    # lost alone: this one spends its attempt
    _crash(engine, batch, "flow-alone")
    with session_scope(engine) as s:
        again = s.get(Run, batch[0])
        assert again.state == RunState.QUEUED and again.attempts == 1 and again.batch_limit == 1
        assert "attempt not counted" not in again.history[-1]["error"]
    # the claim is one prefix in rank order: the lowest-priority runs with a small limit cut the batch
    head = queue.claim(SYN, 8, engine=engine)
    assert [c.id for c in head] == [batch[0]]


def test_an_item_that_always_kills_its_process_still_fails_at_the_retry_limit(engine, isolation) -> None:
    _add(engine, ["none", "exit"])
    both = [c.id for c in queue.claim(SYN, 2, engine=engine, refresh=True)]
    _crash(engine, both, "together")  # the two were lost together: free, and claimed one by one from now on
    crashes = 0
    while batch := [c.id for c in queue.claim(SYN, 2, engine=engine)]:
        assert len(batch) == 1
        with session_scope(engine, write=True) as s:
            (run,) = queue.runs(s, batch)
            item = run.input_id
        if item == 1:
            with session_scope(engine, write=True) as s:
                queue.start(s, batch)
                queue.complete(s, batch[0], SimpleNamespace(value=1.0, elapsed_s=0.0))
        else:
            crashes += 1
            assert crashes <= 10, "the poison run was never failed"
            _crash(engine, batch, f"alone-{crashes}")
    with session_scope(engine) as s:
        states = {r.input_id: (r.state, r.attempts) for r in s.scalars(select(Run))}
    limit = get_stage(SYN).attempts_allowed
    assert states == {1: (RunState.DONE, 1), 2: (RunState.FAILED, limit)} and crashes == limit


def test_without_isolation_a_crashed_batch_spends_its_attempt_and_keeps_its_size(engine) -> None:
    assert not get_settings().isolate_crashed_batches
    _add(engine, ["none"] * 4)
    batch = [c.id for c in queue.claim(SYN, 4, engine=engine, refresh=True)]
    _crash(engine, batch, "flow-default")
    with session_scope(engine) as s:
        runs = s.scalars(select(Run).where(Run.id.in_(batch))).all()
        assert {(r.state, r.attempts, r.batch_limit) for r in runs} == {(RunState.QUEUED, 1, None)}
    assert len(queue.claim(SYN, 4, engine=engine)) == 4


def test_claims_never_started_by_a_flow_run_come_back_free_and_leases_renew(engine) -> None:
    _add(engine, ["none"] * 3)
    claimed = [c.id for c in queue.claim(SYN, 3, engine=engine, refresh=True, lease_seconds=0.01)]
    with session_scope(engine, write=True) as s:
        assert queue.renew(s, claimed[:1], 3600) == 1  # a heartbeat keeps this one
    time.sleep(0.05)
    with session_scope(engine, write=True) as s:
        report = queue.sweep(s)
    assert sorted(report.requeued) == sorted(claimed[1:])
    with session_scope(engine) as s:
        runs = {r.id: r for r in s.scalars(select(Run))}
    assert runs[claimed[0]].state == RunState.CLAIMED
    assert all(runs[i].attempts == 0 and runs[i].batch_limit is None for i in claimed[1:])


def test_an_item_that_kills_its_dask_worker_fails_alone_and_its_chunk_companions_complete(engine, monkeypatch) -> None:
    """Eight items in one chunk on worker processes (the `local` profile), the sixth kills its worker process on
    every attempt: the chunk is split in halves down to that item, which alone records a lost worker. Lost workers
    are left to their nannies (`NannyLocalCluster`) even with a lost-worker timeout of 0 s, at which a plain
    LocalCluster closed every nanny caught restarting its worker and the flow run waited for ever."""
    prefect_api_url()
    monkeypatch.setenv("HOPFLOW_PROFILE_SYNTHETIC", "local")  # processes: the item kills a worker, not this process
    monkeypatch.setenv("HOPFLOW_MAX_CHUNKS", "1")  # the flow run submits one chunk of all eight
    get_settings.cache_clear()
    kinds = ["none"] * 8
    kinds[5] = "exit"
    _add(engine, kinds, fail_attempts=99)
    from hopflow.flows.common import stage_task_runner
    from hopflow.flows.synthetic import synthetic

    with dask.config.set({"distributed.deploy.lost-worker-timeout": "0s"}):
        report = synthetic.with_options(task_runner=stage_task_runner(SYN))(run_ids=None)
    with session_scope(engine) as s:
        runs = {r.input_id: r for r in s.scalars(select(Run))}
        crasher = runs.pop(6)
        assert {(r.state, r.attempts, len(r.history or [])) for r in runs.values()} == {(RunState.DONE, 1, 0)}
        assert crasher.state in (RunState.FAILED, RunState.QUEUED) and crasher.attempts == 1
        assert "lost worker" in (crasher.error or "") and "KilledWorker" in (crasher.error or ""), crasher.error
        assert [h["kind"] for h in crasher.history] == [queue.ERROR_RETRYABLE]
    assert list(report.failed) == [crasher.id] and len(report.done) == 7, report.summary


def test_a_chunk_is_recorded_as_soon_as_it_finishes_while_an_earlier_one_still_runs(engine, monkeypatch) -> None:
    """Two chunks, the first (rank order) three seconds of CPU, the second nothing: the second's run is done in the
    database while the first is still running, so a flow run that dies then loses only the unfinished chunk."""
    prefect_api_url()
    monkeypatch.setenv("HOPFLOW_PROFILE_SYNTHETIC", "local")
    monkeypatch.setenv("HOPFLOW_MAX_CHUNKS", "2")
    get_settings.cache_clear()
    with session_scope(engine, write=True) as s:
        s.execute(insert(SyntheticItem), [{"cpu_ms": cpu_ms, "sleep_ms": 0.0, "failure": "none", "fail_attempts": 1,
                                           "priority": float(i)} for i, cpu_ms in enumerate([3000.0, 0.0])])
    from hopflow.flows.common import stage_task_runner
    from hopflow.flows.synthetic import synthetic

    seen: dict[int, str] = {}
    stop = threading.Event()

    def watch() -> None:
        while not stop.wait(0.05):
            with session_scope(engine) as s:
                states = {r.input_id: r.state for r in s.scalars(select(Run))}
            if states.get(2) == RunState.DONE:
                seen.update(states)
                return

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        report = synthetic.with_options(task_runner=stage_task_runner(SYN))(run_ids=None)
    finally:
        stop.set()
        watcher.join()
    assert seen == {1: RunState.RUNNING, 2: RunState.DONE}, seen
    assert len(report.done) == 2 and not report.failed, report.summary
