"""The controller: each tick sweeps lost work, mirrors live settings to Prefect Variables, and keeps each stage's
target number of flow runs live by claiming ranked batches from the queue and starting a flow run of the stage's
deployment on each."""

from __future__ import annotations

import hashlib
import json
import math
import os
import socket
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any
from uuid import UUID

from prefect import flow, get_run_logger
from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.actions import ArtifactCreate, VariableCreate, VariableUpdate
from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterDeploymentId,
    FlowRunFilterId,
    FlowRunFilterState,
    FlowRunFilterStateType,
)
from prefect.client.schemas.objects import StateType
from prefect.context import FlowRunContext
from prefect.exceptions import ObjectNotFound
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from hopflow import queue
from hopflow.db import get_engine, session_scope
from hopflow.flows.artifacts import publish_overview
from hopflow.leaderboard import material_leaderboard, pathway_leaderboard
from hopflow.models import Run, RunState
from hopflow.registry import STAGES, Stage, get_stage

TARGETS_VARIABLE = "hopflow_targets"
"""Prefect Variable {stage: live flow runs wanted}; edit it in the UI, the next tick reads it into the database."""
CUTOFFS_VARIABLE = "hopflow_cutoffs"
"""Prefect Variable {stage: {cutoff: value}} for stages that have cutoffs; same round trip as the targets."""
MIRROR_STAGE = "_prefect"
"""stage_settings rows under this pseudo-stage hold the value last written to each Variable (to tell UI edits)."""
PROGRESS_KEY = "hopflow-progress"
LEADERBOARD_KEY = "hopflow-leaderboard"
"""Artifact of the per-pathway leaderboard (hopflow.leaderboard.pathway_leaderboard)."""
MATERIALS_KEY = "hopflow-materials"
"""Artifact of the per-structure leaderboard (hopflow.leaderboard.material_leaderboard)."""
LEADERBOARD_SIZE = 20
LIVE_STATES = (StateType.SCHEDULED, StateType.PENDING, StateType.RUNNING)
OVER_STATES = (StateType.COMPLETED, StateType.FAILED, StateType.CANCELLED, StateType.CRASHED)
READ_CHUNK = 200  # flow runs per read (the API's default page size)
UI_EDIT_REASON = "edited in the Prefect UI (variable {name})"


# ---------------------------------------------------------------- reports


@dataclass(frozen=True)
class MirrorReport:
    """What one settings mirror did: values read back from UI edits, edits rejected, Variables written."""

    read_back: tuple[str, ...] = ()
    rejected: tuple[str, ...] = ()
    pushed: tuple[str, ...] = ()


@dataclass(frozen=True)
class StageTick:
    """One stage in one tick: its target, the live flow runs found, what was claimed and submitted."""

    stage: str
    target: int
    live: int
    claimed: int = 0
    submitted: tuple[str, ...] = ()
    released: int = 0
    broadened: Mapping[str, float] = field(default_factory=dict)
    error: str | None = None


@dataclass(frozen=True)
class TickReport:
    """What one controller tick did."""

    stages: tuple[StageTick, ...]
    requeued: tuple[int, ...]
    failed: tuple[int, ...]
    lost_flow_runs: Mapping[str, str]
    mirror: MirrorReport
    seconds: float
    phases: Mapping[str, float] = field(default_factory=dict)  # seconds per part: mirror, sweep, lookup, claim, submit

    @property
    def submitted(self) -> int:
        return sum(len(s.submitted) for s in self.stages)

    @property
    def summary(self) -> str:
        parts = [f"{s.stage}: {s.live}/{s.target} live, +{len(s.submitted)} runs ({s.claimed} items)"
                 + (f", error: {s.error}" if s.error else "") for s in self.stages]
        swept = f"swept: {len(self.requeued)} requeued, {len(self.failed)} failed"
        return f"tick {self.seconds:.2f} s; {swept}; " + ("; ".join(parts) or "no stage has a target")


@dataclass(frozen=True)
class SubmitReport:
    """A manual submission: the runs claimed, the flow runs created, and the input ids that were not queued."""

    stage: str
    run_ids: tuple[int, ...]
    flow_runs: tuple[str, ...]
    skipped: tuple[int, ...]
    error: str | None = None


# ---------------------------------------------------------------- Prefect helpers


def controller_claimant() -> str:
    return f"controller@{socket.gethostname()}:{os.getpid()}"


def _state_filter(types: Iterable[StateType]) -> FlowRunFilterState:
    return FlowRunFilterState(type=FlowRunFilterStateType(any_=list(types)))


def count_live(client: SyncPrefectClient, deployment_id: UUID) -> int:
    """Scheduled, pending and running flow runs of a deployment."""
    return client.count_flow_runs(flow_run_filter=FlowRunFilter(
        deployment_id=FlowRunFilterDeploymentId(any_=[deployment_id]), state=_state_filter(LIVE_STATES)))


def over_flow_runs(client: SyncPrefectClient, flow_run_ids: Iterable[str]) -> dict[str, str]:
    """Of the given flow runs, those that are over (completed, failed, cancelled, crashed): id -> state name.

    Flow runs the server does not know are left out: they may belong to another Prefect API (batch mode in an
    ephemeral server), so only their leases may requeue their work.
    """
    ids: list[UUID] = []
    for value in flow_run_ids:
        try:
            ids.append(UUID(str(value)))
        except ValueError:
            continue
    over: dict[str, str] = {}
    for start in range(0, len(ids), READ_CHUNK):
        chunk = ids[start:start + READ_CHUNK]
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=chunk),
                                                                   state=_state_filter(OVER_STATES)),
                                     limit=len(chunk))
        over.update({str(r.id): (r.state.name or "unknown") if r.state else "unknown" for r in runs})
    return over


def live_flow_run_ids(session: Session) -> list[str]:
    """Flow runs that own claimed or running work (the lead may move this read into hopflow.queue)."""
    return list(session.scalars(select(Run.flow_run_id).where(
        Run.state.in_(RunState.LIVE), Run.flow_run_id.is_not(None)).distinct()))


@contextmanager
def _timed(phases: dict[str, float] | None, name: str) -> Iterator[None]:
    """Add the block's wall time to `phases[name]` (when phases are kept)."""
    started = time.perf_counter()
    try:
        yield
    finally:
        if phases is not None:
            phases[name] = phases.get(name, 0.0) + time.perf_counter() - started


def sweep_lost(client: SyncPrefectClient | None, engine: Engine | None = None, stage: str | None = None,
               phases: dict[str, float] | None = None) -> tuple[queue.SweepReport, dict[str, str]]:
    """Requeue (or fail, past the retry limit) work whose flow run is over or whose lease expired."""
    engine = engine or get_engine()
    lost: dict[str, str] = {}
    if client is not None:
        with session_scope(engine) as session:
            owners = live_flow_run_ids(session)
        with _timed(phases, "sweep-api"):
            lost = over_flow_runs(client, owners)
    with _timed(phases, "sweep-db"), session_scope(engine, write=True) as session:
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


# ---------------------------------------------------------------- settings mirror (database <-> Prefect Variables)


@dataclass(frozen=True)
class _Mirrored:
    """One mirrored Variable: how to read the database's values and apply one edited entry."""

    variable: str
    read: Callable[[Session], dict[str, Any]]
    apply: Callable[[Session, str, str | None, Any, str], None]


def _read_targets(session: Session) -> dict[str, Any]:
    return {name: queue.target(session, stage) for name, stage in sorted(STAGES.items())}


def _apply_target(session: Session, stage_name: str, _key: str | None, value: Any, reason: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"target of {stage_name!r} must be a whole number >= 0, got {value!r}")
    queue.set_target(session, get_stage(stage_name), value, reason)


def _read_cutoffs(session: Session) -> dict[str, Any]:
    return {name: queue.cutoff_values(session, stage) for name, stage in sorted(STAGES.items()) if stage.cutoffs}


def _apply_cutoff(session: Session, stage_name: str, key: str | None, value: Any, reason: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"cutoff {stage_name}.{key} must be a finite number, got {value!r}")
    queue.set_cutoff(session, get_stage(stage_name), str(key), float(value), reason)


_UNSET = object()
MIRRORED = (_Mirrored(TARGETS_VARIABLE, _read_targets, _apply_target),
            _Mirrored(CUTOFFS_VARIABLE, _read_cutoffs, _apply_cutoff))


def _entries(value: Any) -> dict[tuple[str, str | None], Any]:
    """Flatten {stage: n} or {stage: {name: x}} into {(stage, name or None): value}."""
    if not isinstance(value, Mapping):
        return {}
    flat: dict[tuple[str, str | None], Any] = {}
    for stage, inner in value.items():
        if isinstance(inner, Mapping):
            flat.update({(str(stage), str(k)): v for k, v in inner.items()})
        else:
            flat[(str(stage), None)] = inner
    return flat


def mirror_settings(client: SyncPrefectClient, session: Session) -> MirrorReport:
    """Read UI edits of the Variables into the database, then write the database's values to the Variables.

    An entry counts as edited in the UI when it differs from what the controller last wrote there; such an edit is
    recorded in the database with a reason. Everything else flows from the database (the truth) to the Variable, so a
    `hopflow target` or a cutoff broadened by the queue shows up in the UI at the next tick. An invalid edit is
    rejected (reported, then overwritten by the database's value).
    """
    read_back: list[str] = []
    rejected: list[str] = []
    pushed: list[str] = []
    last_written = queue.stage_settings(session, MIRROR_STAGE)
    for mirrored in MIRRORED:
        variable = client.read_variable_by_name(mirrored.variable)
        current = variable.value if variable is not None else None
        last = last_written.get(mirrored.variable)
        if current is not None and last is not None:
            if not isinstance(current, Mapping):
                rejected.append(f"{mirrored.variable}: not a JSON object")
            before, stored = _entries(last), _entries(mirrored.read(session))
            for (stage, key), value in _entries(current).items():
                if before.get((stage, key), _UNSET) == value or stored.get((stage, key), _UNSET) == value:
                    continue
                label = f"{stage}.{key}" if key else stage
                try:
                    mirrored.apply(session, stage, key, value, UI_EDIT_REASON.format(name=mirrored.variable))
                    read_back.append(f"{mirrored.variable}: {label}={value!r}")
                except (KeyError, ValueError) as exc:
                    rejected.append(f"{mirrored.variable}: {label}: {exc}")
        wanted = mirrored.read(session)
        if variable is None:
            client.create_variable(VariableCreate(name=mirrored.variable, value=wanted))
            pushed.append(mirrored.variable)
        elif current != wanted:
            client.update_variable(VariableUpdate(name=mirrored.variable, value=wanted))
            pushed.append(mirrored.variable)
        queue.set_stage_setting(session, MIRROR_STAGE, mirrored.variable, wanted, "mirrored to the Prefect Variable")
    return MirrorReport(tuple(read_back), tuple(rejected), tuple(pushed))


# ---------------------------------------------------------------- one tick


def fill_stage(client: SyncPrefectClient, engine: Engine, stage: Stage, target: int, *, deployment: str | None = None,
               batch_size: int | None = None, claimant: str | None = None,
               phases: dict[str, float] | None = None) -> StageTick:
    """Top a stage up to `target` live flow runs: claim one batch per missing run and submit it."""
    name = deployment or stage.deployment
    with _timed(phases, "lookup"):
        try:
            found = client.read_deployment_by_name(name)
        except ObjectNotFound:
            return StageTick(stage.name, target, 0, error=f"deployment {name!r} not found (run `prefect deploy --all`)")
        live = count_live(client, found.id)
    batch = batch_size or stage.batch_size
    claimant = claimant or controller_claimant()
    claimed, released, submitted, broadened, error = 0, 0, [], {}, None
    for index in range(max(0, target - live)):
        with _timed(phases, "claim"):
            runs = queue.claim(stage.name, batch, claimant=claimant, engine=engine, refresh=index == 0)
            if not runs and index == 0:
                with session_scope(engine, write=True) as session:
                    broadened = queue.broaden(session, stage)
                if broadened:
                    runs = queue.claim(stage.name, batch, claimant=claimant, engine=engine)
        if not runs:
            break
        ids = [r.id for r in runs]
        claimed += len(ids)
        try:
            with _timed(phases, "submit"):
                submitted.append(submit_batch(client, engine, stage.name, found.id, ids))
        except Exception as exc:  # noqa: BLE001  (the claims went back; report and try again next tick)
            released += len(ids)
            error = f"submitting to {name!r} failed: {type(exc).__name__}: {exc}"
            break
    return StageTick(stage.name, target, live, claimed, tuple(submitted), released, broadened, error)


def tick(client: SyncPrefectClient, *, engine: Engine | None = None, stages: Sequence[str] | None = None,
         deployments: Mapping[str, str] | None = None, batch_sizes: Mapping[str, int] | None = None,
         mirror: bool = True, publish: bool = True) -> TickReport:
    """One controller tick: mirror settings, sweep lost work, fill every stage that has a target, publish artifacts.

    `stages` limits the tick to some stages; `deployments` and `batch_sizes` override the registry per stage
    (tests and benchmarks submit to their own deployments).
    """
    started = time.perf_counter()
    engine = engine or get_engine()
    names = list(stages) if stages is not None else sorted(STAGES)
    mirror_report = MirrorReport()
    phases: dict[str, float] = {}
    if mirror:
        with _timed(phases, "mirror"), session_scope(engine, write=True) as session:
            mirror_report = mirror_settings(client, session)
    swept, lost = sweep_lost(client, engine, phases=phases)
    with session_scope(engine) as session:
        targets = {name: queue.target(session, get_stage(name)) for name in names}
    claimant = controller_claimant()
    results = []
    for name in names:
        stage = get_stage(name)
        if targets[name] <= 0:
            continue
        results.append(fill_stage(client, engine, stage, targets[name], deployment=(deployments or {}).get(name),
                                  batch_size=(batch_sizes or {}).get(name), claimant=claimant, phases=phases))
    report = TickReport(tuple(results), tuple(swept.requeued), tuple(swept.failed), lost, mirror_report,
                        time.perf_counter() - started, phases)
    if publish:
        publish_artifacts(client, engine, report)
    return report


# ---------------------------------------------------------------- artifacts


def progress_rows(session: Session, report: TickReport) -> list[dict[str, Any]]:
    """One row per stage: runs per state (done runs that reused a result also counted as cached), target, live flow
    runs, submitted this tick."""
    counts = queue.progress_counts(session)
    ticks = {s.stage: s for s in report.stages}
    rows = []
    for name in sorted(STAGES):
        stage_tick = ticks.get(name)
        c = counts.get(name, queue.StageCounts())
        rows.append({"stage": name, **{state: getattr(c, state) for state in RunState.ALL}, "cached": c.cached,
                     "target": queue.target(session, STAGES[name]),
                     "live_flow_runs": stage_tick.live if stage_tick else None,
                     "submitted": len(stage_tick.submitted) if stage_tick else 0,
                     "note": (stage_tick.error or "") if stage_tick else ""})
    return rows


def _artifact(client: SyncPrefectClient, key: str, kind: str, data: Any, description: str) -> None:
    ctx = FlowRunContext.get()
    flow_run_id = ctx.flow_run.id if ctx and ctx.flow_run else None
    payload = json.dumps(data, default=str) if kind == "table" else data
    client.create_artifact(ArtifactCreate(key=key, type=kind, data=payload, description=description,
                                          flow_run_id=flow_run_id))


def publish_artifacts(client: SyncPrefectClient, engine: Engine, report: TickReport) -> None:
    """Progress per stage and both leaderboards, as Prefect table artifacts (a new version every tick), and the
    markdown overview with the plots when the leaderboards changed."""
    with session_scope(engine) as session:
        progress = progress_rows(session, report)
        materials = material_leaderboard(session, LEADERBOARD_SIZE)  # once per tick: the tables and the overview
        board = pathway_leaderboard(session, LEADERBOARD_SIZE)
        _artifact(client, PROGRESS_KEY, "table", progress, f"hopflow progress per stage. {report.summary}")
        _artifact(client, MATERIALS_KEY, "table", [asdict(m) for m in materials],
                  "hopflow materials: percolation barriers E*(3D/2D/1D) per structure, lowest first (eV)")
        _artifact(client, LEADERBOARD_KEY, "table", [asdict(p) for p in board],
                  "hopflow leaderboard: lowest trusted barrier per pathway (eV)")
        targets = {row["stage"]: row["target"] for row in progress}
        live = {row["stage"]: row["live_flow_runs"] for row in progress}
        ctx = FlowRunContext.get()
        publish_overview(client, session, targets, live, ctx.flow_run.id if ctx and ctx.flow_run else None,
                         boards=(materials, board))


# ---------------------------------------------------------------- manual submission


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


# ---------------------------------------------------------------- flows


@flow(name="controller", log_prints=False)
def controller(publish: bool = True) -> TickReport:
    """One tick (the deployment runs it every minute, one at a time)."""
    with get_client(sync_client=True) as client:
        report = tick(client, publish=publish)
    logger = get_run_logger()
    logger.info(report.summary)
    for line in (*report.mirror.read_back, *report.mirror.rejected):
        logger.info("settings: %s", line)
    return report


@flow(name="submit", flow_run_name="submit-{stage}")
def submit(stage: str, input_ids: list[int]) -> SubmitReport:
    """Manual submission from the UI: run a stage on chosen input items, through the queue."""
    with get_client(sync_client=True) as client:
        report = submit_items(client, stage, input_ids)
    get_run_logger().info("%s: %d runs claimed in %d flow runs; not queued: %s", report.stage, len(report.run_ids),
                          len(report.flow_runs), list(report.skipped) or "none")
    if report.error:
        raise RuntimeError(report.error)
    return report
