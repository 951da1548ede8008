"""The one generic stage queue: enqueue, rank, claim, start, complete, fail, release, sweep.

All queue SQL lives here."""

from __future__ import annotations

import hashlib
import json
import os
import socket
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, cast

from sqlalchemy import CursorResult, Engine, and_, delete, exists, func, insert, literal, or_, select, true, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from hopflow.db import get_engine, is_sqlite, session_scope, utcnow
from hopflow.models import Run, RunState, Score, StageSetting
from hopflow.provenance import versions
from hopflow.registry import Stage, get_stage
from hopflow.settings import get_settings
from hopflow.validation import check_cutoff, check_target

CUTOFF_PREFIX = "cutoff."
TARGET_KEY = "target"
RANKER_KEY = "ranker"
ERROR_INPUT = "input"  # bad input: recorded, never retried
ERROR_RETRYABLE = "retryable"


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def param_hash(parameters: Mapping[str, Any]) -> str:
    """Canonical hash of a parameter set: the same settings always give the same hash."""
    return hashlib.sha256(canonical_json(parameters).encode()).hexdigest()[:32]


def cache_key(stage: str, fingerprint: str, phash: str) -> str:
    """Cache key = hash of (stage, input identity, parameter set incl. engine and its version)."""
    return hashlib.sha256(f"{stage}|{fingerprint}|{phash}".encode()).hexdigest()[:40]


def default_claimant() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


@dataclass(frozen=True)
class ClaimedRun:
    """A claimed run as handed to a stage flow."""

    id: int
    stage: str
    input_id: int
    parameters: dict[str, Any]


@dataclass
class SweepReport:
    """What one sweep did."""

    requeued: list[int] = field(default_factory=list)
    failed: list[int] = field(default_factory=list)
    reasons: dict[int, str] = field(default_factory=dict)


# ---------------------------------------------------------------- live stage settings (cutoffs, target, ranker)


def stage_settings(session: Session, stage: str) -> dict[str, Any]:
    """The settings in force for a stage: the newest value per key."""
    latest = (
        select(StageSetting.key, func.max(StageSetting.id).label("id"))
        .where(StageSetting.stage == stage)
        .group_by(StageSetting.key)
        .subquery()
    )
    rows = session.execute(select(StageSetting.key, StageSetting.value).join(latest, StageSetting.id == latest.c.id))
    return {key: value for key, value in rows}


def set_stage_setting(session: Session, stage: str, key: str, value: Any, reason: str) -> bool:
    """Record a new value for a stage setting (history kept); returns False when the value is unchanged."""
    if stage_settings(session, stage).get(key) == value:
        return False
    session.add(StageSetting(stage=stage, key=key, value=value, reason=reason))
    session.flush()
    return True


def cutoff_values(session: Session, stage: Stage) -> dict[str, float]:
    live = stage_settings(session, stage.name)
    return {c.name: float(live.get(CUTOFF_PREFIX + c.name, c.default)) for c in stage.cutoffs}


def set_cutoff(session: Session, stage: Stage, name: str, value: float, reason: str = "set by user") -> bool:
    value = check_cutoff(stage.cutoff(name), value)  # the name against the registry, the value finite and in bounds
    return set_stage_setting(session, stage.name, CUTOFF_PREFIX + name, value, reason)


def active_ranker(session: Session, stage: Stage) -> str:
    return str(stage_settings(session, stage.name).get(RANKER_KEY, stage.default_ranker))


def set_active_ranker(session: Session, stage: Stage, name: str, reason: str = "set by user") -> bool:
    """Make `name` the ranker the stage's claims use; queued runs take its scores as their priority at once."""
    stage.ranker(name)
    changed = set_stage_setting(session, stage.name, RANKER_KEY, name, reason)
    if changed:
        rank(session, stage, name, refresh=False)
        sync_priority(session, stage)
    return changed


def target(session: Session, stage: Stage) -> int:
    return int(stage_settings(session, stage.name).get(TARGET_KEY, stage.default_target))


def set_target(session: Session, stage: Stage, value: int, reason: str = "set by user") -> bool:
    return set_stage_setting(session, stage.name, TARGET_KEY, check_target(value), reason)


# ---------------------------------------------------------------- enqueue and rank


def stage_parameters(stage: Stage, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The stage's parameter set under the settings with `overrides`; a key the stage does not have is a ValueError."""
    params = stage.parameters(get_settings())
    params.update(overrides or {})
    return stage.params.from_mapping(params).as_dict()


def _insert(session: Session, table: Any) -> Any:
    dialect = postgresql if session.get_bind().dialect.name == "postgresql" else sqlite
    return dialect.insert(table)


def enqueue(session: Session, stage: Stage, parameters: Mapping[str, Any] | None = None, *,
            input_ids: Sequence[int] | None = None) -> int:
    """Queue a run for every input item (or only those of `input_ids`) that has none under this parameter set; rank
    the new items. Returns count."""
    session.flush()
    params = stage_parameters(stage, parameters)
    phash = param_hash(params)
    items = stage.inputs().subquery()
    chosen = [items.c.item_id.in_(list(input_ids))] if input_ids is not None else []
    already = exists().where(Run.stage == stage.name, Run.input_id == items.c.item_id, Run.param_hash == phash)
    new_items = select(
        literal(stage.name), items.c.item_id, literal(phash), literal(params, type_=Run.parameters.type),
        literal(RunState.QUEUED), literal(0), literal(stage.attempts_allowed),
    ).where(~already, *chosen)
    cols = ["stage", "input_id", "param_hash", "parameters", "state", "attempts", "max_attempts"]
    stmt = _insert(session, Run.__table__).from_select(cols, new_items).on_conflict_do_nothing()
    added = len(session.execute(stmt.returning(Run.__table__.c.id)).all())  # rowcount is -1 here on psycopg
    for ranker in stage.rankers:
        rank(session, stage, ranker.name, refresh=False)
    return added


def sync_priority(session: Session, stage: Stage, *, only_unset: bool = False) -> None:
    """Copy the active ranker's scores onto queued runs (`runs.priority`), which the claim's index orders by."""
    ranker = active_ranker(session, stage)
    score = (select(Score.score).where(Score.stage == stage.name, Score.ranker == ranker,
                                       Score.item_id == Run.input_id).scalar_subquery())
    where = [Run.stage == stage.name, Run.state == RunState.QUEUED]
    if only_unset:
        where.append(Run.priority.is_(None))
    session.execute(update(Run).where(*where).values(priority=score).execution_options(synchronize_session=False))


def rank(session: Session, stage: Stage, ranker_name: str | None = None, refresh: bool = True) -> int:
    """Write the ranker's score for the stage's input items (all of them, or only unscored ones). Returns count."""
    ranker = stage.ranker(ranker_name)
    if refresh:
        session.execute(delete(Score).where(Score.stage == stage.name, Score.ranker == ranker.name))
    items = stage.inputs().subquery()
    scored = exists().where(Score.stage == stage.name, Score.ranker == ranker.name, Score.item_id == items.c.item_id)
    if ranker.expression is not None:
        source = select(literal(stage.name), literal(ranker.name), items.c.item_id, ranker.expression(items.c))
        # SQLite needs a WHERE in INSERT ... SELECT ... ON CONFLICT (its parser's upsert ambiguity)
        source = source.where(~scored) if not refresh else source.where(true())
        stmt = _insert(session, Score.__table__).from_select(["stage", "ranker", "item_id", "score"], source)
        count = len(session.execute(stmt.on_conflict_do_nothing().returning(Score.__table__.c.id)).all())
    else:
        ids_query = select(items.c.item_id) if refresh else select(items.c.item_id).where(~scored)
        ids = list(session.scalars(ids_query))
        assert ranker.score is not None, f"ranker {ranker.name} has neither an expression nor a score function"
        scores = ranker.score(session, ids) if ids else {}
        rows = [{"stage": stage.name, "ranker": ranker.name, "item_id": i, "score": float(s)}
                for i, s in scores.items()]
        if rows:
            session.execute(_insert(session, Score.__table__).on_conflict_do_nothing(), rows)
        count = len(rows)
    if ranker.name == active_ranker(session, stage):
        sync_priority(session, stage, only_unset=not refresh)
    return count


def write_scores(session: Session, stage: Stage, ranker_name: str, scores: Mapping[int, float]) -> int:
    """Replace a ranker's scores for the given items (model rankers recomputed from outside)."""
    stage.ranker(ranker_name)
    session.execute(
        delete(Score).where(Score.stage == stage.name, Score.ranker == ranker_name, Score.item_id.in_(list(scores)))
    )
    rows = [{"stage": stage.name, "ranker": ranker_name, "item_id": i, "score": float(s)} for i, s in scores.items()]
    if rows:
        session.execute(insert(Score), rows)
    if ranker_name == active_ranker(session, stage):
        sync_priority(session, stage)
    return len(rows)


# ---------------------------------------------------------------- claim


def _claim_order(active: bool) -> tuple[Any, Any]:
    """The claim order's columns: the active ranker's denormalised priority, or another ranker's joined score."""
    return (Run.priority, Run.input_id) if active else (Score.score, Score.item_id)


def _claimable(stage: Stage, ranker: str, phash: str, cutoffs: Mapping[str, float], *, active: bool) -> Any:
    """Queued runs in claim order. The active ranker's order is denormalised onto `runs.priority` (index-ordered);
    any other ranker joins its scores."""
    where = [Run.stage == stage.name, Run.param_hash == phash, Run.state == RunState.QUEUED]
    if active:
        query = select(Run.id).where(*where, Run.priority.is_not(None)).order_by(Run.priority, Run.input_id)
    else:
        query = (select(Run.id)
                 .join(Score, and_(Score.stage == stage.name, Score.ranker == ranker, Score.item_id == Run.input_id))
                 .where(*where).order_by(Score.score, Score.item_id))
    if stage.cutoffs:
        items = stage.inputs().subquery()
        criteria = [c.criterion(items.c, cutoffs[c.name]) for c in stage.cutoffs]
        query = query.where(Run.input_id.in_(select(items.c.item_id).where(*criteria)))
    return query


def claim_statement(session: Session, stage: Stage, n: int, ranker: str, phash: str, claimant: str,
                    lease_seconds: float, cutoffs: Mapping[str, float], *, active: bool = True) -> Any:
    """The one claim statement: mark the top-n eligible queued runs claimed, skipping rows others hold.

    A run whose earlier batch crashed carries a `batch_limit`: the batch is cut at the first run that would exceed the
    smallest limit seen so far in claim order (a prefix, so rank order is kept and the head run is always taken)."""
    now = utcnow()
    order = _claim_order(active)
    top = (_claimable(stage, ranker, phash, cutoffs, active=active)
           .add_columns(Run.batch_limit, *(c.label(f"order_{i}") for i, c in enumerate(order))).limit(n))
    if session.get_bind().dialect.name == "postgresql":
        top = top.with_for_update(of=Run, skip_locked=True)
    top = top.subquery()
    keys = [top.c[f"order_{i}"] for i in range(len(order))]
    positioned = select(
        top.c.id,
        func.row_number().over(order_by=keys).label("position"),
        func.min(func.coalesce(top.c.batch_limit, n)).over(order_by=keys, rows=(None, 0)).label("room"),
    ).subquery()
    pick = select(positioned.c.id).where(positioned.c.position <= positioned.c.room)
    return (
        update(Run)
        .where(Run.id.in_(pick.scalar_subquery()))
        .values(state=RunState.CLAIMED, claimant=claimant, ranker=ranker, attempts=Run.attempts + 1,
                claimed_at=now, lease_expires_at=now + timedelta(seconds=lease_seconds), error=None)
        .returning(Run.id, Run.input_id, Run.parameters)
        .execution_options(synchronize_session=False)
    )


def claim(stage_name: str, n: int, ranker: str | None = None, *, parameters: Mapping[str, Any] | None = None,
          claimant: str | None = None, lease_seconds: float | None = None, engine: Engine | None = None,
          refresh: bool = False) -> list[ClaimedRun]:
    """Atomically take the top `n` eligible items of a stage (by `ranker`) under its parameter set.

    `refresh` first queues and ranks input items that appeared since the last enqueue.
    """
    stage = get_stage(stage_name)
    engine = engine or get_engine()
    params = stage_parameters(stage, parameters)
    phash = param_hash(params)
    with session_scope(engine, write=True) as session:
        if refresh:
            enqueue(session, stage, parameters)
        live = stage_settings(session, stage.name)
        active = str(live.get(RANKER_KEY, stage.default_ranker))
        ranker = ranker or active
        stage.ranker(ranker)
        cutoffs = {c.name: float(live.get(CUTOFF_PREFIX + c.name, c.default)) for c in stage.cutoffs}
        stmt = claim_statement(session, stage, n, ranker, phash, claimant or default_claimant(),
                               lease_seconds or stage.lease, cutoffs, active=ranker == active)
        rows = session.execute(stmt).all()
    return [ClaimedRun(id=r.id, stage=stage.name, input_id=r.input_id, parameters=r.parameters) for r in rows]


def claim_ids(session: Session, stage: Stage, input_ids: Sequence[int], *, claimant: str | None = None,
              parameters: Mapping[str, Any] | None = None, only_named: bool = False) -> list[ClaimedRun]:
    """Claim chosen input items (manual submission) through the same queue: queued ones only, never twice.

    The stage's inputs are queued under `parameters` first (rank, don't remove); with `only_named`, only the named
    ones (an import under a one-off parameter set, e.g. another `--ion`, must not queue every source ever seen)."""
    params = stage_parameters(stage, parameters)
    phash = param_hash(params)
    enqueue(session, stage, parameters, input_ids=input_ids if only_named else None)
    now = utcnow()
    stmt = (
        update(Run)
        .where(Run.stage == stage.name, Run.param_hash == phash, Run.input_id.in_(list(input_ids)),
               Run.state == RunState.QUEUED)
        .values(state=RunState.CLAIMED, claimant=claimant or default_claimant(), ranker="manual",
                attempts=Run.attempts + 1, claimed_at=now,
                lease_expires_at=now + timedelta(seconds=stage.lease))
        .returning(Run.id, Run.input_id, Run.parameters)
        .execution_options(synchronize_session=False)
    )
    return [ClaimedRun(r.id, stage.name, r.input_id, r.parameters) for r in session.execute(stmt)]


# ---------------------------------------------------------------- run life


def runs(session: Session, run_ids: Iterable[int]) -> list[Run]:
    """The runs with these ids, by id."""
    return list(session.scalars(select(Run).where(Run.id.in_(list(run_ids))).order_by(Run.id)))


def attach_flow_run(session: Session, run_ids: Iterable[int], flow_run_id: str) -> None:
    """Record which Prefect flow run owns these claimed runs (sweep uses it to find crashed runs)."""
    session.execute(update(Run).where(Run.id.in_(list(run_ids))).values(flow_run_id=flow_run_id)
                    .execution_options(synchronize_session=False))


def renew(session: Session, run_ids: Iterable[int], lease_seconds: float, *, flow_run_id: str | None = None) -> int:
    """Extend the leases of live runs a flow run is still working on (its heartbeat); returns how many were renewed.

    With `flow_run_id`, only runs still owned by that flow run (or not yet handed to any) are renewed."""
    owner = [or_(Run.flow_run_id.is_(None), Run.flow_run_id == flow_run_id)] if flow_run_id else []
    stmt = (update(Run).where(Run.id.in_(list(run_ids)), Run.state.in_(RunState.LIVE), *owner)
            .values(lease_expires_at=utcnow() + timedelta(seconds=lease_seconds))
            .execution_options(synchronize_session=False))
    return cast(CursorResult[Any], session.execute(stmt)).rowcount or 0


def hold_claims(session: Session, flow_run_ids: Iterable[str], *, now: datetime | None = None) -> int:
    """Renew the leases of claimed runs whose flow run exists but has not started yet (Prefect has it scheduled or
    pending), within `claim_start_seconds` of their claim: a short lease then bounds running work, not the wait for
    a worker. Returns how many were renewed."""
    now = now or utcnow()
    start_by = now - timedelta(seconds=get_settings().claim_start_seconds)
    waiting = session.scalars(select(Run).where(
        Run.state == RunState.CLAIMED, Run.flow_run_id.in_(list(flow_run_ids)), Run.claimed_at > start_by)).all()
    leases: dict[str, float] = {}
    for run in waiting:
        if run.stage not in leases:  # a stage this process does not know keeps the default lease
            try:
                leases[run.stage] = get_stage(run.stage).lease
            except KeyError:
                leases[run.stage] = get_settings().lease_seconds
        run.lease_expires_at = now + timedelta(seconds=leases[run.stage])
    session.flush()
    return len(waiting)


def start(session: Session, run_ids: Iterable[int], *, flow_run_id: str | None = None,
          lease_seconds: float | None = None) -> list[Run]:
    """Mark claimed runs running (with host, versions, flow run); runs no longer claimed, or handed to another flow
    run since, are left out."""
    now = utcnow()
    values: dict[str, Any] = {"state": RunState.RUNNING, "started_at": now, "host": socket.gethostname(),
                              "versions": versions()}
    if flow_run_id:
        values["flow_run_id"] = flow_run_id
    if lease_seconds:
        values["lease_expires_at"] = now + timedelta(seconds=lease_seconds)
    owner = [or_(Run.flow_run_id.is_(None), Run.flow_run_id == flow_run_id)] if flow_run_id else []
    stmt = (update(Run).where(Run.id.in_(list(run_ids)), Run.state.in_(RunState.LIVE), *owner).values(**values)
            .returning(Run).execution_options(synchronize_session=False, populate_existing=True))
    return sorted(session.scalars(stmt).all(), key=lambda run: run.id)


def set_cache_key(session: Session, run: Run, fingerprint: str) -> Run | None:
    """Give the run its cache key; return an earlier done run with the same key, if any (a cache hit)."""
    run.cache_key = cache_key(run.stage, fingerprint, run.param_hash)
    return session.scalars(
        select(Run).where(Run.cache_key == run.cache_key, Run.state == RunState.DONE, Run.id != run.id)
        .order_by(Run.id).limit(1)
    ).first()


def _finish(run: Run, state: str, **values: Any) -> None:
    run.state = state
    run.finished_at = utcnow()
    run.lease_expires_at = None
    for key, value in values.items():
        setattr(run, key, value)


def _owned(session: Session, run_id: int) -> Run | None:
    """The run if it is still live (a swept or finished run must not be completed again)."""
    return live_runs(session, [run_id]).get(run_id)


RESULT_ROW_OWN_COLUMNS = ("id", "created_at", "run_id")
"""Columns of a result row that belong to the row, not to the result: never copied when a result is reused."""


def copy_result(session: Session, stage: Stage, run: Run, old: Run) -> None:
    """Reuse `old`'s result for `run`: copy its result rows under the new run and input (or the stage's own reuse)."""
    if stage.reuse is not None:
        stage.reuse(session, run, old)
        return
    assert stage.output_model is not None and stage.input_columns is not None  # Stage.__post_init__ checks
    model = stage.output_model
    links = stage.input_columns(session, run)
    columns = [c.key for c in model.__mapper__.column_attrs if c.key not in RESULT_ROW_OWN_COLUMNS]
    for row in session.scalars(select(model).where(model.run_id == old.id).order_by(model.id)):
        session.add(model(run_id=run.id, **{name: getattr(row, name) for name in columns} | links))


def live_runs(session: Session, run_ids: Sequence[int]) -> dict[int, Run]:
    """The runs among `run_ids` still live, locked for the caller's transaction and read afresh."""
    stmt = (select(Run).where(Run.id.in_(list(run_ids)), Run.state.in_(RunState.LIVE)).with_for_update()
            .execution_options(populate_existing=True))
    return {run.id: run for run in session.scalars(stmt)}


def complete(session: Session, run_id: int, result: Any, *, reused_from: Run | None = None) -> bool:
    """Write the stage's result rows and mark the run done, in the caller's transaction. False if no longer ours."""
    run = _owned(session, run_id)
    if run is None:
        return False
    complete_run(session, run, result, reused_from=reused_from)
    return True


def complete_run(session: Session, run: Run, result: Any, *, reused_from: Run | None = None) -> None:
    """`complete` for a live run of this session (`live_runs`)."""
    stage = get_stage(run.stage)
    if reused_from is not None:
        copy_result(session, stage, run, reused_from)
        _finish(run, RunState.DONE, reused_run_id=reused_from.id, error=None)
    else:
        stage.store(session, run, result)
        _finish(run, RunState.DONE, error=None)
    session.flush()


def complete_many(session: Session, results: Mapping[int, Any]) -> list[int]:
    """`complete` for many runs at once (one state change statement, one flush); returns the ids completed."""
    stmt = (update(Run).where(Run.id.in_(list(results)), Run.state.in_(RunState.LIVE))
            .values(state=RunState.DONE, finished_at=utcnow(), lease_expires_at=None, error=None)
            .returning(Run).execution_options(synchronize_session=False, populate_existing=True))
    runs = session.scalars(stmt).all()
    for run in runs:
        get_stage(run.stage).store(session, run, results[run.id])
    session.flush()
    return [run.id for run in runs]


def fail(session: Session, run_id: int, error: str, *, retryable: bool = True) -> bool:
    """Record an error and the attempt; sweep requeues retryable failures while attempts remain."""
    run = _owned(session, run_id)
    if run is None:
        return False
    fail_run(session, run, error, retryable=retryable)
    return True


def fail_run(session: Session, run: Run, error: str, *, retryable: bool = True) -> None:
    """`fail` for a live run of this session (`live_runs`)."""
    kind = ERROR_RETRYABLE if retryable else ERROR_INPUT
    history = list(run.history or [])
    history.append({"attempt": run.attempts, "at": utcnow().isoformat(), "error": error, "kind": kind})
    _finish(run, RunState.FAILED, error=error, history=history,
            max_attempts=run.max_attempts if retryable else run.attempts)
    session.flush()


def release(session: Session, run_ids: Iterable[int], *, flow_run_id: str | None = None) -> int:
    """Give claimed or running work back to the queue at once (a graceful stop); the attempt is not counted.

    With `flow_run_id`, only runs still owned by that flow run (or not yet handed to any) are released.
    """
    owner = [or_(Run.flow_run_id.is_(None), Run.flow_run_id == flow_run_id)] if flow_run_id else []
    stmt = (
        update(Run)
        .where(Run.id.in_(list(run_ids)), Run.state.in_(RunState.LIVE), *owner)
        .values(state=RunState.QUEUED, attempts=Run.attempts - 1, claimant=None, lease_expires_at=None,
                flow_run_id=None)
        .execution_options(synchronize_session=False)
    )
    return cast(CursorResult[Any], session.execute(stmt)).rowcount or 0


def _spare_attempt(run: Run, batch_size: int) -> str:
    """Poison isolation across flow runs: a lost run that never started, or that was lost with others of its batch
    (a crashed or killed flow run takes every open item with it), gets its attempt back and at most half that batch
    next time; only a run lost alone spends the attempt. Returns what the run's reason should add."""
    if run.state == RunState.CLAIMED and run.flow_run_id is None:
        run.attempts -= 1
        return " (never handed to a flow run: attempt not counted)"
    if batch_size <= 1 or not get_settings().isolate_crashed_batches:
        return ""
    run.attempts -= 1
    run.batch_limit = max(1, min(run.batch_limit or batch_size, batch_size) // 2)
    return (f" (lost with {batch_size - 1} other open items of its batch: attempt not counted, "
            f"next batch at most {run.batch_limit})")


def sweep(session: Session, *, stage: str | None = None, lost_flow_runs: Mapping[str, str] | None = None,
          now: datetime | None = None) -> SweepReport:
    """Requeue lost work (expired leases, crashed flow runs, retryable failures) while attempts remain; fail the rest.

    `lost_flow_runs` maps Prefect flow-run ids that ended badly (crashed, failed, cancelled) to their state name.
    """
    now = now or utcnow()
    report = SweepReport()
    scope = [Run.stage == stage] if stage else []
    lost = dict(lost_flow_runs or {})
    expired = session.scalars(
        select(Run).where(*scope, Run.state.in_(RunState.LIVE), Run.lease_expires_at < now).with_for_update()
    ).all()
    reasons = {run.id: f"lease expired at {run.lease_expires_at} (claimant {run.claimant})" for run in expired}
    candidates = {run.id: run for run in expired}
    if lost:
        crashed = session.scalars(
            select(Run).where(*scope, Run.state.in_(RunState.LIVE), Run.flow_run_id.in_(list(lost))).with_for_update()
        ).all()
        for run in crashed:
            assert run.flow_run_id is not None  # selected by it
            reasons.setdefault(run.id, f"flow run {run.flow_run_id} ended {lost[run.flow_run_id]}")
            candidates[run.id] = run
    retry_failed = session.scalars(
        select(Run).where(*scope, Run.state == RunState.FAILED, Run.attempts < Run.max_attempts).with_for_update()
    ).all()
    batches: dict[str, list[Run]] = {}
    for run in candidates.values():
        batches.setdefault(run.flow_run_id or f"claimant {run.claimant}", []).append(run)
    for batch in batches.values():
        for run in batch:
            reason = reasons[run.id] + _spare_attempt(run, len(batch))
            history = list(run.history or [])
            history.append({"attempt": run.attempts, "at": now.isoformat(), "error": reason, "kind": "lost"})
            run.history = history
            run.error = reason
    for run in [*candidates.values(), *retry_failed]:
        if run.attempts < run.max_attempts:
            run.state = RunState.QUEUED
            run.claimant = None
            run.lease_expires_at = None
            run.flow_run_id = None
            report.requeued.append(run.id)
        else:
            if run.state != RunState.FAILED:
                _finish(run, RunState.FAILED, error=f"{run.error} (gave up after {run.attempts} attempts)")
            report.failed.append(run.id)
        report.reasons[run.id] = run.error or ""
    session.flush()
    return report


# ---------------------------------------------------------------- cutoffs that broaden


def broaden(session: Session, stage: Stage, parameters: Mapping[str, Any] | None = None) -> dict[str, float]:
    """If nothing is claimable but queued items are held back by cutoffs, widen each broadenable cutoff one step."""
    if not any(c.broaden_step for c in stage.cutoffs):
        return {}
    phash = param_hash(stage_parameters(stage, parameters))
    ranker = active_ranker(session, stage)
    cutoffs = cutoff_values(session, stage)
    if session.execute(_claimable(stage, ranker, phash, cutoffs, active=True).limit(1)).first() is not None:
        return {}
    held = session.scalar(select(func.count()).select_from(Run).where(
        Run.stage == stage.name, Run.param_hash == phash, Run.state == RunState.QUEUED))
    if not held:
        return {}
    changed = {}
    for cutoff in stage.cutoffs:
        if not cutoff.broaden_step:
            continue
        value = cutoffs[cutoff.name] + cutoff.broaden_step
        if cutoff.broaden_limit is not None:
            bound = cutoff.broaden_limit
            value = min(value, bound) if cutoff.broaden_step > 0 else max(value, bound)
        reason = f"broadened: no eligible item while {held} queued items were held back by cutoffs"
        if set_cutoff(session, stage, cutoff.name, value, reason):
            changed[cutoff.name] = value
    return changed


# ---------------------------------------------------------------- reading


def counts_by_state(session: Session) -> dict[str, dict[str, int]]:
    """Runs per stage and state."""
    out: dict[str, dict[str, int]] = {}
    for stage, state, count in session.execute(
        select(Run.stage, Run.state, func.count()).group_by(Run.stage, Run.state)
    ):
        out.setdefault(stage, {})[state] = count
    return out


@dataclass(frozen=True)
class StageCounts:
    """Runs of one stage by state; `cached` counts the done runs that reused an earlier result."""

    queued: int = 0
    claimed: int = 0
    running: int = 0
    done: int = 0
    failed: int = 0
    cached: int = 0

    @property
    def finished(self) -> int:
        return self.done + self.failed

    @property
    def total(self) -> int:
        return self.queued + self.claimed + self.running + self.done + self.failed


def progress_counts(session: Session, since: datetime | None = None) -> dict[str, StageCounts]:
    """Runs per stage and state, cache hits apart; with `since`, only runs claimed at or after it (one batch's work:
    items given back to the queue count no more)."""
    scope = [Run.claimed_at >= since, Run.state != RunState.QUEUED] if since is not None else []
    rows = session.execute(select(Run.stage, Run.state, Run.reused_run_id.is_not(None), func.count())
                           .where(*scope).group_by(Run.stage, Run.state, Run.reused_run_id.is_not(None)))
    tallies: dict[str, dict[str, int]] = {}
    for stage, state, reused, count in rows:
        tally = tallies.setdefault(stage, {})
        tally[state] = tally.get(state, 0) + count
        if reused and state == RunState.DONE:
            tally["cached"] = tally.get("cached", 0) + count
    return {stage: StageCounts(**{k: v for k, v in tally.items() if k in StageCounts.__dataclass_fields__})
            for stage, tally in sorted(tallies.items())}


def queue_head(session: Session, stage: Stage, n: int = 20, ranker: str | None = None,
               parameters: Mapping[str, Any] | None = None) -> list[tuple[int, int, float]]:
    """The next `n` claimable items: (run id, input id, score), in claim order."""
    active = active_ranker(session, stage)
    ranker = ranker or active
    phash = param_hash(stage_parameters(stage, parameters))
    query = _claimable(stage, ranker, phash, cutoff_values(session, stage), active=ranker == active)
    score = Run.priority if ranker == active else Score.score
    return [(r[0], r[1], r[2]) for r in session.execute(query.add_columns(Run.input_id, score).limit(n))]


def is_backend_sqlite(session: Session) -> bool:
    return is_sqlite(session.get_bind().engine)


def fingerprints(session: Session, stage: Stage, input_ids: Sequence[int]) -> dict[int, str]:
    """Content identity of input items (the cache key's input part); items without one are never cached."""
    if stage.fingerprint is None:
        return {}
    items = stage.inputs().subquery()
    rows = session.execute(select(items.c.item_id, stage.fingerprint(items.c)).where(
        items.c.item_id.in_(list(input_ids))))
    return {item_id: str(fp) for item_id, fp in rows if fp is not None}
