"""The one generic stage runner every stage flow calls: start claimed runs, reuse cache hits, map the stage's task
over the flow's Dask task runner, and hand each result or error back to the queue."""

from __future__ import annotations

import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import dask
import distributed
from distributed.scheduler import KilledWorker
from prefect import get_run_logger, task
from prefect.context import FlowRunContext
from prefect.futures import PrefectFuture
from prefect.tasks import Task
from prefect_dask import DaskTaskRunner
from sqlalchemy.orm import Session

from hopflow import queue
from hopflow.db import session_scope
from hopflow.errors import InputError, ItemTimeLimitError, WorkerLostError, is_retryable
from hopflow.models import Run
from hopflow.registry import Stage, get_stage
from hopflow.settings import get_settings

BATCH_MODE_CLAIM = 1_000_000
Postprocess = Callable[[Session, Run, Any], Any]
PROGRESS_TOPIC = "hopflow-item-progress"
"""Dask event topic on which a chunk announces each item it starts (the time limit and bisection read it)."""
POLL_SECONDS = 0.25
RESTART_TIMEOUT_S = 120

# A chunk whose worker dies fails at once (KilledWorker) instead of being rerun by Dask on up to 3 more workers, each
# of which a poison item would kill too: the runner bisects it instead (the scheduler lives in the flow's process).
dask.config.set({"distributed.scheduler.allowed-failures": 0})


@dataclass
class StageReport:
    """What one stage flow run did with its runs."""

    stage: str
    done: list[int] = field(default_factory=list)
    reused: list[int] = field(default_factory=list)
    failed: dict[int, str] = field(default_factory=dict)
    released: list[int] = field(default_factory=list)

    @property
    def summary(self) -> str:
        return (f"{self.stage}: {len(self.done)} done ({len(self.reused)} from cache), {len(self.failed)} failed, "
                f"{len(self.released)} released")


@dataclass(frozen=True)
class ItemOutcome:
    """One item's result, or the exception it raised (kept per item so one bad item never sinks its chunk)."""

    result: Any = None
    error: BaseException | None = None


def _announce(chunk_key: str | None, index: int) -> None:
    """Tell the flow (a Dask event) which item of the chunk this worker starts now; nothing outside Dask."""
    if chunk_key is None:
        return
    try:
        worker = distributed.get_worker()
    except ValueError:
        return
    worker.log_event(PROGRESS_TOPIC, {"chunk": chunk_key, "index": index, "worker": worker.address})


@task(name="stage-chunk")
def run_chunk(process: Task[..., Any], items: list[Any], parameters: dict[str, Any],
              chunk_key: str | None = None) -> list[ItemOutcome]:
    """Run a stage's unit of work over a chunk of items on one Dask worker.

    Chunks rather than one Prefect task per item: submitting a task costs ~0.1 s of CPU in prefect-dask, more than
    many items take.
    """
    outcomes = []
    for index, item in enumerate(items):
        _announce(chunk_key, index)
        try:
            outcomes.append(ItemOutcome(result=process.fn(item, parameters)))
        except Exception as exc:  # noqa: BLE001  (recorded against the item by the flow)
            outcomes.append(ItemOutcome(error=exc))
    return outcomes


def chunked(runs: Sequence[Run], max_chunks: int) -> list[list[Run]]:
    """Split runs into at most `max_chunks` contiguous chunks of near-equal size (rank order kept)."""
    if not runs:
        return []
    n = min(len(runs), max(1, max_chunks))
    size, extra = divmod(len(runs), n)
    chunks, start = [], 0
    for i in range(n):
        end = start + size + (1 if i < extra else 0)
        chunks.append(list(runs[start:end]))
        start = end
    return chunks


def current_flow_run_id() -> str | None:
    ctx = FlowRunContext.get()
    return str(ctx.flow_run.id) if ctx and ctx.flow_run else None


@contextmanager
def release_on_termination(run_ids: Sequence[int]) -> Iterator[set[int]]:
    """Give unfinished claims back at once when the flow is stopped (SIGTERM, Prefect cancellation, Ctrl-C)."""
    open_ids: set[int] = set(run_ids)
    previous = None
    # Inside a flow run Prefect's own SIGTERM bridge raises TerminationSignal, which reaches `finally` below, and must
    # stay installed: the child acknowledges a cancel from the worker only while it is, and reports Cancelled, not
    # Crashed. Only where SIGTERM would kill the process outright is a handler of ours needed.
    if threading.current_thread() is threading.main_thread() and not callable(signal.getsignal(signal.SIGTERM)):
        def _terminate(signum: int, _frame: Any) -> None:
            raise KeyboardInterrupt(f"signal {signum}")

        previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        yield open_ids
    finally:
        if open_ids:
            with session_scope(write=True) as session:
                queue.release(session, open_ids, flow_run_id=current_flow_run_id())
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


class LeaseHeartbeat:
    """Renews the leases of a flow run's open claims every `lease × lease_renew_fraction` while its work advances
    (an item started or finished within `stale_after` seconds; None: always, the time limit stops stalled items);
    a stuck flow run stops renewing and its leases lapse."""

    def __init__(self, open_ids: set[int], lease: float, stale_after: float | None, logger: Any) -> None:
        self.open_ids, self.lease, self.stale_after, self.logger = open_ids, lease, stale_after, logger
        self.flow_run_id = current_flow_run_id()
        self.last_progress = time.monotonic()
        self.renewals = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="hopflow-lease-heartbeat", daemon=True)

    def beat(self) -> None:
        """Record progress (called from the flow's thread and from Dask's event handler)."""
        self.last_progress = time.monotonic()

    def _loop(self) -> None:
        while not self._stop.wait(self.lease * get_settings().lease_renew_fraction):
            ids = self.open_ids.copy()
            stalled = self.stale_after is not None and time.monotonic() - self.last_progress > self.stale_after
            if not ids or stalled:
                continue
            try:
                with session_scope(write=True) as session:
                    queue.renew(session, ids, self.lease, flow_run_id=self.flow_run_id)
                self.renewals += 1
            except Exception as exc:  # noqa: BLE001  (a dropped connection: the next beat tries again)
                self.logger.warning("lease renewal failed: %s: %s", type(exc).__name__, exc)

    def __enter__(self) -> LeaseHeartbeat:
        self._thread.start()
        return self

    def __exit__(self, *_exc: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


@dataclass(eq=False)
class Chunk:
    """Runs submitted together as one Dask task, and the key its progress events carry."""

    runs: list[Run]
    key: str = field(default_factory=lambda: uuid.uuid4().hex)


class ChunkProgress:
    """The item each chunk is on (index, worker, when the flow heard of it), from the workers' progress events."""

    def __init__(self, heartbeat: LeaseHeartbeat | None = None) -> None:
        self.current: dict[str, tuple[int, str, float]] = {}
        self.heartbeat = heartbeat

    def __call__(self, event: tuple[float, dict[str, Any]]) -> None:
        _, msg = event
        self.current[msg["chunk"]] = (int(msg["index"]), str(msg["worker"]), time.monotonic())
        if self.heartbeat is not None:
            self.heartbeat.beat()


def _dask_client() -> distributed.Client | None:
    """The flow's Dask client, when its task runner is a DaskTaskRunner."""
    ctx = FlowRunContext.get()
    runner = ctx.task_runner if ctx else None
    return runner.client if isinstance(runner, DaskTaskRunner) else None


def _is_done(future: PrefectFuture[Any]) -> bool:
    wrapped = getattr(future, "wrapped_future", None)
    return wrapped.done() if wrapped is not None else future.state.is_final()


def _split_after_loss(chunk: Chunk, progress: ChunkProgress) -> list[list[Run]]:
    """Poison isolation inside a flow run: the items a dead worker had finished go on together; the suspects (the
    item it was on and those after) are halved, so the item that kills its worker ends up running alone."""
    index = progress.current.get(chunk.key, (0, "", 0.0))[0]
    finished, suspects = chunk.runs[:index], chunk.runs[index:]
    half = (len(suspects) + 1) // 2
    return [part for part in (finished, suspects[:half], suspects[half:]) if part]


class ChunkDriver:
    """Submits chunks, collects their outcomes, bisects chunks whose worker died and stops items past their time
    limit by restarting their worker; every outcome goes to the queue as it arrives."""

    def __init__(self, stage: Stage, process: Task[..., Any], payloads: dict[int, Any], record: Callable[..., None],
                 heartbeat: LeaseHeartbeat, logger: Any) -> None:
        self.stage, self.process, self.payloads, self.record, self.logger = stage, process, payloads, record, logger
        self.heartbeat = heartbeat
        self.client = _dask_client()
        self.progress = ChunkProgress(heartbeat)
        self.limit = stage.time_limit
        self.pending: dict[Chunk, PrefectFuture[Any]] = {}

    def submit(self, runs: list[Run]) -> None:
        chunk = Chunk(runs)
        self.pending[chunk] = run_chunk.with_options(name=f"{self.process.name}-chunk").submit(
            self.process, [self.payloads[r.input_id] for r in runs], runs[0].parameters, chunk.key)

    def run(self, chunks: list[list[Run]]) -> None:
        if self.client is not None:
            self.client.subscribe_topic(PROGRESS_TOPIC, self.progress)
        try:
            for runs in chunks:
                self.submit(runs)
            while self.pending:
                for chunk, future in list(self.pending.items()):
                    if _is_done(future):
                        del self.pending[chunk]
                        self.heartbeat.beat()
                        self._collect(chunk, future)
                    elif self.limit is not None:
                        self._stop_if_overdue(chunk, future)
                if self.pending:
                    time.sleep(POLL_SECONDS)
        finally:
            if self.client is not None:
                self.client.unsubscribe_topic(PROGRESS_TOPIC)

    def _collect(self, chunk: Chunk, future: PrefectFuture[Any]) -> None:
        try:
            outcomes = future.result()
        except KilledWorker as exc:
            if len(chunk.runs) > 1:
                parts = _split_after_loss(chunk, self.progress)
                self.logger.warning("Dask worker lost running %d items; resubmitted as %s (no attempt counted)",
                                    len(chunk.runs), [len(p) for p in parts])
                for part in parts:
                    self.submit(part)
                return
            run = chunk.runs[0]
            outcomes = [ItemOutcome(error=WorkerLostError(
                f"{self.stage.input_table} #{run.input_id}: its Dask worker died while running it alone "
                f"({type(exc).__name__}: {exc})"))]
        except Exception as exc:  # noqa: BLE001  (the chunk task itself failed: every item gets the error)
            outcomes = [ItemOutcome(error=exc)] * len(chunk.runs)
        for run, outcome in zip(chunk.runs, outcomes):
            self.record(run, outcome)

    def _stop_if_overdue(self, chunk: Chunk, future: PrefectFuture[Any]) -> None:
        now = self.progress.current.get(chunk.key)
        if now is None or time.monotonic() - now[2] <= self.limit:
            return
        index, worker, _ = now
        del self.pending[chunk]
        wrapped = getattr(future, "wrapped_future", None)
        if wrapped is not None:
            wrapped.cancel()  # first, or the scheduler would rerun the chunk once its worker is gone
        hung = chunk.runs[index]
        self.logger.warning("%s #%d exceeded its time limit of %g s: restarting Dask worker %s",
                            self.stage.input_table, hung.input_id, self.limit, worker)
        if self.client is not None:
            try:
                self.client.restart_workers([worker], timeout=RESTART_TIMEOUT_S, raise_for_error=True)
            except Exception as exc:  # noqa: BLE001  (no nanny, e.g. a threaded cluster: the item is failed anyway)
                self.logger.warning("could not restart Dask worker %s: %s: %s", worker, type(exc).__name__, exc)
        self.record(hung, ItemOutcome(error=ItemTimeLimitError(
            f"{self.stage.input_table} #{hung.input_id} exceeded its time limit of {self.limit:g} s")))
        rest = chunk.runs[:index] + chunk.runs[index + 1:]
        if rest:
            self.submit(rest)


def claim_all(stage_name: str, parameters: dict[str, Any] | None = None) -> list[int]:
    """Batch mode: queue, rank and claim every eligible item of a stage."""
    return [c.id for c in queue.claim(stage_name, BATCH_MODE_CLAIM, parameters=parameters, refresh=True)]


def run_stage(stage_name: str, run_ids: Sequence[int] | None, process: Task[..., Any], *,
              parameters: dict[str, Any] | None = None, postprocess: Postprocess | None = None) -> StageReport:
    """Run a stage on claimed runs (controller mode) or on every eligible item (batch mode, `run_ids=None`)."""
    logger = get_run_logger()
    stage = get_stage(stage_name)
    ids = list(run_ids) if run_ids is not None else claim_all(stage_name, parameters)
    report = StageReport(stage=stage_name)
    # with a time limit, no item can stall the batch past it, so the batch renews for as long as it runs; without one,
    # a batch where nothing started or finished for a whole lease stops renewing and sweep takes its runs back
    stale_after = None if stage.time_limit is not None else stage.lease
    with release_on_termination(ids) as open_ids, LeaseHeartbeat(open_ids, stage.lease, stale_after,
                                                                 logger) as heartbeat:
        with session_scope(write=True) as session:
            runs = queue.start(session, ids, flow_run_id=current_flow_run_id(), lease_seconds=stage.lease)
            open_ids.intersection_update(r.id for r in runs)
            prints = queue.fingerprints(session, stage, [r.input_id for r in runs])
            todo = []
            for run in runs:
                hit = queue.set_cache_key(session, run, prints[run.input_id]) if run.input_id in prints else None
                if hit is not None and queue.complete(session, run.id, None, reused_from=hit):
                    report.done.append(run.id)
                    report.reused.append(run.id)
                    open_ids.discard(run.id)
                else:
                    todo.append(run)
            payloads = stage.load(session, [r.input_id for r in todo])
        missing = [r for r in todo if r.input_id not in payloads]
        todo = [r for r in todo if r.input_id in payloads]
        for run in missing:
            _record_failure(run, InputError(f"input {stage.input_table} #{run.input_id} no longer exists"), report)
            open_ids.discard(run.id)

        def record(run: Run, outcome: ItemOutcome) -> None:
            _record_outcome(run, outcome, postprocess, report)
            open_ids.discard(run.id)

        ChunkDriver(stage, process, payloads, record, heartbeat, logger).run(chunked(todo, get_settings().max_chunks))
    logger.info(report.summary)
    _publish_summary(report)
    return report


def _publish_summary(report: StageReport) -> None:
    """The stage's markdown artifact in the Prefect UI; a server that refuses it costs a warning, not the results."""
    from flows.artifacts import publish_stage_summary

    try:
        publish_stage_summary(report.stage, report.summary, report.failed, current_flow_run_id())
    except Exception as exc:  # noqa: BLE001
        get_run_logger().warning("stage summary artifact not published: %s: %s", type(exc).__name__, exc)


def _record_outcome(run: Run, outcome: ItemOutcome, postprocess: Postprocess | None, report: StageReport) -> None:
    if outcome.error is not None:
        _record_failure(run, outcome.error, report)
        return
    try:
        with session_scope(write=True) as session:
            result = postprocess(session, run, outcome.result) if postprocess is not None else outcome.result
            if queue.complete(session, run.id, result):
                report.done.append(run.id)
    except Exception as exc:  # noqa: BLE001  (every item-level error is recorded, the batch goes on)
        _record_failure(run, exc, report)


def _record_failure(run: Run, exc: BaseException, report: StageReport) -> None:
    message = f"{type(exc).__name__}: {exc}" if not isinstance(exc, InputError) else str(exc)
    with session_scope(write=True) as session:
        if queue.fail(session, run.id, message, retryable=is_retryable(exc)):
            report.failed[run.id] = message
