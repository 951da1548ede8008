"""The generic queue on SQLite and PostgreSQL: exactly-once claims, leases, sweep, rankers, cutoffs, cache,
provenance."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time
from types import SimpleNamespace

import pytest
from sqlalchemy import func, select, text

from hopflow import queue
from hopflow.db import session_scope
from hopflow.errors import ImmutableResultError
from hopflow.models import Run, RunState, StageSetting, SyntheticItem, SyntheticResult
from hopflow.registry import Cutoff, Ranker, get_stage

SYN = "synthetic"


def add_items(engine, n: int, **fields) -> None:
    with session_scope(engine, write=True) as s:
        s.execute(SyntheticItem.__table__.insert(), [{"priority": float(i % 97), "cpu_ms": 0.0, "sleep_ms": 0.0,
                                                       "failure": "none", "fail_attempts": 0, **fields}
                                                      for i in range(n)])
        queue.enqueue(s, get_stage(SYN))


def done_result() -> SimpleNamespace:
    return SimpleNamespace(value=1.0, elapsed_s=0.0)


def _claimant_loop(url: str, out: mp.Queue, batch: int, hold: float) -> None:
    from hopflow.db import get_engine

    engine = get_engine(url)
    taken: list[int] = []
    while True:
        claimed = queue.claim(SYN, batch, engine=engine, lease_seconds=2 if hold else 3600)
        if not claimed:
            break
        if hold:
            out.put([c.input_id for c in claimed])
            time.sleep(hold)  # killed while holding its claim
        with session_scope(engine, write=True) as s:
            queue.start(s, [c.id for c in claimed])
            for c in claimed:
                queue.complete(s, c.id, done_result())
        taken.extend(c.input_id for c in claimed)
    out.put(taken)


def test_eight_claimants_take_every_item_exactly_once(engine) -> None:
    n_items, n_proc = 10_000, 8
    add_items(engine, n_items)
    url = engine.url.render_as_string(hide_password=False)
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_claimant_loop, args=(url, out, 10, 0.0)) for _ in range(n_proc)]
    for p in procs:
        p.start()
    taken = [i for _ in procs for i in out.get(timeout=600)]
    for p in procs:
        p.join(timeout=60)
    assert len(taken) == n_items
    assert len(set(taken)) == n_items
    with session_scope(engine) as s:
        assert s.scalar(select(func.count()).select_from(SyntheticResult)) == n_items
        assert s.scalar(select(func.count()).select_from(Run).where(Run.state != RunState.DONE)) == 0
        assert s.scalar(select(func.max(Run.attempts))) == 1


def test_killed_claimant_items_are_recovered_by_sweep(engine) -> None:
    add_items(engine, 30)
    url = engine.url.render_as_string(hide_password=False)
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    victim = ctx.Process(target=_claimant_loop, args=(url, out, 10, 600.0))
    victim.start()
    held = out.get(timeout=120)
    os.kill(victim.pid, signal.SIGKILL)
    victim.join()
    assert len(held) == 10
    with session_scope(engine, write=True) as s:
        assert queue.sweep(s).requeued == []  # lease still valid: nothing to recover yet
    time.sleep(2.5)
    with session_scope(engine, write=True) as s:
        report = queue.sweep(s)
        assert len(report.requeued) == 10
        assert all("lease expired" in r for r in report.reasons.values())
    _claimant_loop(url, ctx.Queue(), 10, 0.0)  # a healthy claimant finishes everything
    with session_scope(engine) as s:
        states = dict(s.execute(select(Run.input_id, Run.state)).all())
        assert set(states.values()) == {RunState.DONE}
        retried = s.scalars(select(Run).where(Run.input_id.in_(held))).all()
        assert {r.attempts for r in retried} == {1}  # claimed but never handed to a flow run: attempt given back
        assert all("lease expired" in r.history[0]["error"] and "attempt not counted" in r.history[0]["error"]
                   for r in retried)


def test_failures_are_retried_up_to_the_limit_then_failed_with_reasons(engine) -> None:
    add_items(engine, 2)
    stage = get_stage(SYN)
    for attempt in range(1, stage.attempts_allowed + 1):
        claimed = queue.claim(SYN, 1, engine=engine, ranker="id")
        assert [c.input_id for c in claimed] == [1]
        with session_scope(engine, write=True) as s:
            queue.start(s, [claimed[0].id])
            queue.fail(s, claimed[0].id, f"boom {attempt}")
            queue.sweep(s)
    with session_scope(engine) as s:
        run = s.scalars(select(Run).where(Run.input_id == 1)).one()
        assert run.state == RunState.FAILED and run.attempts == stage.attempts_allowed
        assert [h["error"] for h in run.history] == [f"boom {i}" for i in range(1, stage.attempts_allowed + 1)]
    # a bad input is never retried
    claimed = queue.claim(SYN, 1, engine=engine)
    with session_scope(engine, write=True) as s:
        queue.start(s, [claimed[0].id])
        queue.fail(s, claimed[0].id, "no F sites", retryable=False)
        assert queue.sweep(s).requeued == []
    assert queue.claim(SYN, 5, engine=engine) == []


def test_release_gives_work_back_at_once_and_done_is_never_claimed_again(engine) -> None:
    add_items(engine, 3)
    first = queue.claim(SYN, 3, engine=engine)
    with session_scope(engine, write=True) as s:
        queue.start(s, [first[0].id])
        assert queue.complete(s, first[0].id, done_result())
        assert not queue.complete(s, first[0].id, done_result())  # a result is never written twice
        assert queue.release(s, [c.id for c in first[1:]]) == 2
    again = queue.claim(SYN, 10, engine=engine)
    assert sorted(c.input_id for c in again) == sorted(c.input_id for c in first[1:])
    with session_scope(engine) as s:
        assert s.scalar(select(func.count()).select_from(SyntheticResult)) == 1
        assert {r.attempts for r in s.scalars(select(Run))} == {1}


def test_ranker_switch_and_rankers_side_by_side(engine) -> None:
    with session_scope(engine, write=True) as s:
        s.add_all([SyntheticItem(priority=float(10 - i)) for i in range(10)])  # ids 1..10, priority 10..1
        queue.enqueue(s, get_stage(SYN))
        stage = get_stage(SYN)
        head = [i for _, i, _ in queue.queue_head(s, stage, 3)]
        assert head == [10, 9, 8]  # default ranker "priority": lowest value first
        assert [i for _, i, _ in queue.queue_head(s, stage, 3, ranker="id")] == [1, 2, 3]
    assert sorted(c.input_id for c in queue.claim(SYN, 2, engine=engine)) == [9, 10]
    with session_scope(engine, write=True) as s:
        queue.set_active_ranker(s, get_stage(SYN), "id")
    # the switch changes the next claims; the claimed ones stay claimed
    assert sorted(c.input_id for c in queue.claim(SYN, 2, engine=engine)) == [1, 2]
    assert sorted(c.input_id for c in queue.claim(SYN, 2, engine=engine, ranker="priority")) == [7, 8]
    with session_scope(engine) as s:
        assert s.scalar(select(func.count()).select_from(Run).where(Run.state == RunState.CLAIMED)) == 6


def test_ties_are_broken_by_id(engine) -> None:
    with session_scope(engine, write=True) as s:
        s.add_all([SyntheticItem(priority=1.0) for _ in range(5)])
        queue.enqueue(s, get_stage(SYN))
    assert [c.input_id for c in sorted(queue.claim(SYN, 3, engine=engine), key=lambda c: c.input_id)] == [1, 2, 3]


def test_model_score_ranker_is_recomputed_by_rank(engine, register_stage) -> None:
    calls: list[int] = []

    def reverse_id(session, ids):
        calls.append(len(ids))
        return {i: -float(i) for i in ids}

    stage = register_stage("synthetic-scored", rankers=(Ranker("reverse", "model score", score=reverse_id),),
                           default_ranker="reverse")
    with session_scope(engine, write=True) as s:
        s.add_all([SyntheticItem(priority=0.0) for _ in range(4)])
        s.flush()
        queue.enqueue(s, stage)
        assert [i for _, i, _ in queue.queue_head(s, stage, 4)] == [4, 3, 2, 1]
        queue.write_scores(s, stage, "reverse", {1: -100.0})
        assert [i for _, i, _ in queue.queue_head(s, stage, 2)] == [1, 4]
        assert queue.rank(s, stage, "reverse") == 4  # recomputed from the model for every item
        assert [i for _, i, _ in queue.queue_head(s, stage, 1)] == [4]
    assert calls == [4, 4]


def test_cutoff_holds_items_back_and_broadens_one_bounded_step(engine, register_stage) -> None:
    stage = register_stage("synthetic-cut", default_ranker="priority", cutoffs=(
        Cutoff("max_priority", "largest priority value eligible", default=2.0, criterion=lambda c, v: c.priority <= v,
               broaden_step=3.0, broaden_limit=6.0),))
    with session_scope(engine, write=True) as s:
        s.add_all([SyntheticItem(priority=float(p)) for p in (1, 4, 7, 9)])
        s.flush()
        queue.enqueue(s, stage)
        assert queue.broaden(s, stage) == {}  # an item is eligible: nothing to broaden
    assert [c.input_id for c in queue.claim("synthetic-cut", 10, engine=engine)] == [1]
    with session_scope(engine, write=True) as s:
        assert queue.broaden(s, stage) == {"max_priority": 5.0}
    assert [c.input_id for c in queue.claim("synthetic-cut", 10, engine=engine)] == [2]
    with session_scope(engine, write=True) as s:
        assert queue.broaden(s, stage) == {"max_priority": 6.0}  # bounded by the limit
        assert queue.broaden(s, stage) == {}
        history = s.scalars(select(StageSetting).where(StageSetting.stage == "synthetic-cut")
                            .order_by(StageSetting.id)).all()
        assert [h.value for h in history] == [5.0, 6.0]
        assert all("held back by cutoffs" in h.reason for h in history)
        with pytest.raises(KeyError):
            queue.set_cutoff(s, stage, "max_priority; DROP TABLE runs", 1.0)


def test_cache_reuses_a_done_result_with_the_same_key(engine) -> None:
    from hopflow.flows.runner import run_stage  # noqa: F401  (import check: the runner uses the same verbs)

    with session_scope(engine, write=True) as s:
        s.add_all([SyntheticItem(priority=1.0, fingerprint="same"), SyntheticItem(priority=2.0, fingerprint="same")])
        s.flush()
        queue.enqueue(s, get_stage(SYN))
    first, second = sorted(queue.claim(SYN, 2, engine=engine), key=lambda c: c.input_id)
    with session_scope(engine, write=True) as s:
        run1, run2 = queue.start(s, [first.id, second.id])
        fps = queue.fingerprints(s, get_stage(SYN), [1, 2])
        assert queue.set_cache_key(s, run1, fps[1]) is None
        queue.complete(s, run1.id, SimpleNamespace(value=42.0, elapsed_s=3.0))
        hit = queue.set_cache_key(s, run2, fps[2])
        assert hit is not None and hit.id == run1.id
        queue.complete(s, run2.id, None, reused_from=hit)
    with session_scope(engine) as s:
        reused = s.get(Run, second.id)
        assert reused.state == RunState.DONE and reused.reused_run_id == first.id
        values = dict(s.execute(select(SyntheticResult.item_id, SyntheticResult.value)).all())
        assert values == {1: 42.0, 2: 42.0}


def test_results_are_immutable_and_runs_carry_provenance(engine) -> None:
    add_items(engine, 1)
    claimed = queue.claim(SYN, 1, engine=engine)
    with session_scope(engine, write=True) as s:
        queue.start(s, [claimed[0].id], flow_run_id="f-123")
        queue.complete(s, claimed[0].id, done_result())
    with pytest.raises(ImmutableResultError):
        with session_scope(engine, write=True) as s:
            s.scalars(select(SyntheticResult)).one().value = 2.0
    with pytest.raises(ImmutableResultError):
        with session_scope(engine, write=True) as s:
            s.delete(s.scalars(select(SyntheticResult)).one())
    with session_scope(engine) as s:
        run = s.get(Run, claimed[0].id)
        assert s.scalars(select(SyntheticResult)).one().value == 1.0
        assert run.flow_run_id == "f-123" and run.host and run.started_at and run.finished_at
        assert run.versions["pymatgen"] and run.versions["prefect"] and "hopflow" in run.versions
        assert run.parameters == {"engine": "synthetic", "version": 1}


def test_same_input_under_two_parameter_sets_is_two_runs(engine) -> None:
    add_items(engine, 1)
    a = queue.claim(SYN, 5, engine=engine)
    b = queue.claim(SYN, 5, engine=engine, parameters={"engine": "other"}, refresh=True)
    assert len(a) == len(b) == 1 and a[0].id != b[0].id and a[0].input_id == b[0].input_id


def test_claim_uses_an_index_not_a_scan_of_the_run_table(engine) -> None:
    add_items(engine, 20_000)
    stage = get_stage(SYN)
    with session_scope(engine, write=True) as s:
        if s.get_bind().dialect.name == "postgresql":
            s.execute(text("ANALYZE"))
        stmt = queue.claim_statement(s, stage, 100, "priority", queue.param_hash(queue.stage_parameters(stage)),
                                     "explain", 60.0, {})
        compiled = stmt.compile(dialect=s.get_bind().dialect, compile_kwargs={"literal_binds": True})
        prefix = "EXPLAIN QUERY PLAN " if s.get_bind().dialect.name == "sqlite" else "EXPLAIN "
        plan = "\n".join(str(r[-1]) for r in s.execute(text(prefix + str(compiled))))
        s.rollback()
    if engine.dialect.name == "sqlite":
        assert "SCAN runs" not in plan and "SCAN r" not in plan.replace("SCAN scores", ""), plan
        assert "USING INDEX" in plan or "USING COVERING INDEX" in plan, plan
    else:
        assert "Seq Scan on runs" not in plan, plan
        assert "Index" in plan, plan


def test_enqueue_and_rank_report_what_they_added(engine) -> None:
    stage = get_stage(SYN)
    with session_scope(engine, write=True) as s:
        s.add_all([SyntheticItem(priority=float(i)) for i in range(5)])
        s.flush()
        assert queue.enqueue(s, stage) == 5
        assert queue.enqueue(s, stage) == 0  # a queued item is never queued twice
        assert queue.rank(s, stage, "id") == 5  # a refresh rescores every item
        assert queue.rank(s, stage, "id", refresh=False) == 0
