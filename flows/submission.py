"""Submitting claimed work to Prefect: one flow run per claimed batch (idempotent), live and finished flow runs of a
deployment, requeueing the work of lost ones, and manual submission of chosen items."""

from __future__ import annotations

import hashlib
import os
import socket
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from uuid import UUID

from prefect.client.orchestration import SyncPrefectClient
from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterDeploymentId,
    FlowRunFilterId,
    FlowRunFilterState,
    FlowRunFilterStateType,
)
from prefect.client.schemas.objects import State, StateType
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from hopflow import queue
from hopflow.db import get_engine, session_scope
from hopflow.models import Run, RunState
from hopflow.registry import get_stage

WAITING_STATES = (StateType.SCHEDULED, StateType.PENDING)
LIVE_STATES = (*WAITING_STATES, StateType.RUNNING)
OVER_STATES = (StateType.COMPLETED, StateType.FAILED, StateType.CANCELLED, StateType.CRASHED)
READ_CHUNK = 200  # flow runs per read (the API's default page size)


@dataclass(frozen=True)
class SubmitReport:
    """A manual submission: the runs claimed, the flow runs created, and the input ids that were not queued."""

    stage: str
    run_ids: tuple[int, ...]
    flow_runs: tuple[str, ...]
    skipped: tuple[int, ...]
    error: str | None = None


def controller_claimant() -> str:
    return f"controller@{socket.gethostname()}:{os.getpid()}"


def _state_filter(types: Iterable[StateType]) -> FlowRunFilterState:
    return FlowRunFilterState(type=FlowRunFilterStateType(any_=list(types)))


def count_live(client: SyncPrefectClient, deployment_id: UUID) -> int:
    """Scheduled, pending and running flow runs of a deployment."""
    return client.count_flow_runs(flow_run_filter=FlowRunFilter(
        deployment_id=FlowRunFilterDeploymentId(any_=[deployment_id]), state=_state_filter(LIVE_STATES)))


def flow_run_states(client: SyncPrefectClient, flow_run_ids: Iterable[str]) -> dict[str, State]:
    """The state of each of the given flow runs the server knows (id -> state).

    Flow runs the server does not know are left out: they may belong to another Prefect API (batch mode in an
    ephemeral server), so only their leases may requeue their work.
    """
    ids: list[UUID] = []
    for value in flow_run_ids:
        try:
            ids.append(UUID(str(value)))
        except ValueError:
            continue
    states: dict[str, State] = {}
    for start in range(0, len(ids), READ_CHUNK):
        chunk = ids[start:start + READ_CHUNK]
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=chunk)), limit=len(chunk))
        states.update({str(r.id): r.state for r in runs if r.state is not None})
    return states


def live_flow_run_ids(session: Session) -> list[str]:
    """Flow runs that own claimed or running work (the lead may move this read into hopflow.queue)."""
    return list(session.scalars(select(Run.flow_run_id).where(
        Run.state.in_(RunState.LIVE), Run.flow_run_id.is_not(None)).distinct()))


@contextmanager
def timed(phases: dict[str, float] | None, name: str) -> Iterator[None]:
    """Add the block's wall time to `phases[name]` (when phases are kept)."""
    started = time.perf_counter()
    try:
        yield
    finally:
        if phases is not None:
            phases[name] = phases.get(name, 0.0) + time.perf_counter() - started


def sweep_lost(client: SyncPrefectClient | None, engine: Engine | None = None, stage: str | None = None,
               phases: dict[str, float] | None = None) -> tuple[queue.SweepReport, dict[str, str]]:
    """Requeue (or fail, past the retry limit) work whose flow run is over or whose lease expired; claims whose flow
    run is still waiting to start are held (their leases renewed, `queue.hold_claims`)."""
    engine = engine or get_engine()
    lost: dict[str, str] = {}
    waiting: list[str] = []
    if client is not None:
        with session_scope(engine) as session:
            owners = live_flow_run_ids(session)
        with timed(phases, "sweep-api"):
            states = flow_run_states(client, owners)
        lost = {run_id: state.name or "unknown" for run_id, state in states.items() if state.type in OVER_STATES}
        waiting = [run_id for run_id, state in states.items() if state.type in WAITING_STATES]
    with timed(phases, "sweep-db"), session_scope(engine, write=True) as session:
        if waiting:
            queue.hold_claims(session, waiting)
        report = queue.sweep(session, stage=stage, lost_flow_runs=lost)
    return report, lost


def batch_key(stage: str, run_ids: Sequence[int], claimed_at: str) -> str:
    """Idempotency key of one claimed batch: a retried submission of the same claim never makes a second flow run,
    while the same items claimed again later (after a release or a sweep) get a new flow run."""
    digest = hashlib.sha256(f"{stage}|{claimed_at}|{sorted(run_ids)}".encode()).hexdigest()[:32]
    return f"hopflow-{stage}-{digest}"


def _claim_time(engine: Engine, run_ids: Sequence[int]) -> str:
    with session_scope(engine) as session:
        times = session.scalars(select(Run.claimed_at).where(Run.id.in_(list(run_ids))))
        return max((t.isoformat() for t in times if t is not None), default="")


def submit_batch(client: SyncPrefectClient, engine: Engine, stage: str, deployment_id: UUID,
                 run_ids: Sequence[int]) -> str:
    """Create one flow run of the stage's deployment on claimed runs and attach it to them; releases them on failure.

    One API call (the deployment is already known), with an idempotency key, so a retry never makes a second run."""
    try:
        flow_run = client.create_flow_run_from_deployment(
            deployment_id, parameters={"run_ids": list(run_ids)},
            idempotency_key=batch_key(stage, run_ids, _claim_time(engine, run_ids)))
    except BaseException:
        with session_scope(engine, write=True) as session:
            queue.release(session, run_ids)
        raise
    with session_scope(engine, write=True) as session:
        queue.attach_flow_run(session, run_ids, str(flow_run.id))
    return str(flow_run.id)


def submit_items(client: SyncPrefectClient, stage_name: str, input_ids: Sequence[int], *,
                 engine: Engine | None = None, deployment: str | None = None,
                 batch_size: int | None = None) -> SubmitReport:
    """Claim chosen input items through the queue (queued ones only, so never twice) and submit them in batches."""
    engine = engine or get_engine()
    stage = get_stage(stage_name)
    name = deployment or stage.deployment
    found = client.read_deployment_by_name(name)  # fail before claiming anything when it is missing
    with session_scope(engine, write=True) as session:
        runs = queue.claim_ids(session, stage, list(input_ids), claimant=f"manual@{socket.gethostname()}")
    run_ids = [r.id for r in runs]
    taken = {r.input_id for r in runs}
    skipped = tuple(i for i in dict.fromkeys(input_ids) if i not in taken)
    batch = batch_size or stage.batch_size
    flow_runs: list[str] = []
    error = None
    for start in range(0, len(run_ids), batch):
        try:
            flow_runs.append(submit_batch(client, engine, stage.name, found.id, run_ids[start:start + batch]))
        except Exception as exc:  # noqa: BLE001
            rest = run_ids[start + batch:]
            with session_scope(engine, write=True) as session:
                queue.release(session, rest)
            error = f"submitting to {name!r} failed: {type(exc).__name__}: {exc}"
            run_ids = run_ids[:start]
            break
    return SubmitReport(stage.name, tuple(run_ids), tuple(flow_runs), skipped, error)
