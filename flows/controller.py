"""The controller: each tick sweeps lost work, mirrors live settings to Prefect Variables, and keeps each stage's
target number of flow runs live by claiming ranked batches from the queue and starting a flow run of the stage's
deployment on each. Submission lives in flows/submission.py, the mirror in flows/mirror.py, artifacts in
flows/artifacts.py."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from prefect import flow, get_run_logger
from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.exceptions import ObjectNotFound
from sqlalchemy import Engine

from hopflow import queue
from hopflow.db import get_engine, session_scope
from hopflow.flows.artifacts import publish_artifacts
from hopflow.flows.mirror import MirrorReport, mirror_settings
from hopflow.flows.submission import (
    SubmitReport,
    controller_claimant,
    count_live,
    submit_batch,
    submit_items,
    sweep_lost,
    timed,
)
from hopflow.registry import STAGES, Stage, get_stage


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


def fill_stage(client: SyncPrefectClient, engine: Engine, stage: Stage, target: int, *, deployment: str | None = None,
               batch_size: int | None = None, claimant: str | None = None,
               phases: dict[str, float] | None = None) -> StageTick:
    """Top a stage up to `target` live flow runs: claim one batch per missing run and submit it."""
    name = deployment or stage.deployment
    with timed(phases, "lookup"):
        try:
            found = client.read_deployment_by_name(name)
        except ObjectNotFound:
            return StageTick(stage.name, target, 0, error=f"deployment {name!r} not found (run `prefect deploy --all`)")
        live = count_live(client, found.id)
    batch = batch_size or stage.batch_size
    claimant = claimant or controller_claimant()
    claimed, released, submitted, broadened, error = 0, 0, [], {}, None
    for index in range(max(0, target - live)):
        with timed(phases, "claim"):
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
            with timed(phases, "submit"):
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
        with timed(phases, "mirror"), session_scope(engine, write=True) as session:
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
