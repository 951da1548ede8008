"""The one generic stage runner every stage flow calls: start claimed runs, reuse cache hits, map the stage's task
over the flow's Dask task runner, and hand each result or error back to the queue."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from queue import Empty, SimpleQueue
from typing import Any

from prefect import get_run_logger, task
from prefect.context import FlowRunContext
from prefect.futures import PrefectFuture
from prefect.tasks import Task
from prefect_dask import DaskTaskRunner
from sqlalchemy.orm import Session

from hopflow import queue
from hopflow.db import get_engine, is_in_memory, session_scope
from hopflow.errors import InputError, TimeLimitError, WorkerLostError, is_lost_worker, is_retryable
from hopflow.isolation import borrowed_item_process, pack, unpack
from hopflow.models import Run
from hopflow.registry import StageParams, get_stage
from hopflow.settings import get_settings

BATCH_MODE_CLAIM = 1_000_000
Postprocess = Callable[[Session, Run, Any], Any]


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
    """One item's result, or the exception it raised (kept per item so one bad item never sinks its chunk); from an
    item process, its answer still packed (`unpacked()` opens it in the flow)."""

    result: Any = None
    error: BaseException | None = None
    packed: bytes | None = None

    def unpacked(self) -> ItemOutcome:
        """The outcome with a packed answer opened: its result, or the error the item raised."""
        if self.packed is None:
            return self
        try:
            return ItemOutcome(result=unpack(self.packed))
        except Exception as exc:  # noqa: BLE001  (the item's own error, or an answer that cannot be read)
            return ItemOutcome(error=exc)


@task(name="stage-chunk")
def run_chunk(process: Task[..., Any], items: list[Any], parameters: StageParams) -> list[ItemOutcome]:
    """Run a stage's unit of work over a chunk of items on one Dask worker.

    Chunks rather than one Prefect task per item: submitting a task costs ~0.1 s of CPU in prefect-dask, more than
    many items take.
    """
    outcomes = []
    for item in items:
        try:
            outcomes.append(ItemOutcome(result=process.fn(item, parameters)))
        except Exception as exc:  # noqa: BLE001  (recorded against the item by the flow)
            outcomes.append(ItemOutcome(error=exc))
    return outcomes


@task(name="stage-chunk-isolated")
def run_isolated_chunk(calls: list[bytes], time_limit: float) -> list[ItemOutcome]:
    """Run a chunk of packed item calls (`hopflow.isolation.pack`) one at a time in an item process of this worker,
    each within `time_limit` seconds: a hang or a crash costs that item alone. Calls and answers stay packed here
    (the worker never unpickles an item or a result; the flow opens the answers)."""
    outcomes = []
    with borrowed_item_process() as process:
        for call in calls:
            try:
                outcomes.append(ItemOutcome(packed=process.run_packed(call, time_limit)))
            except (TimeLimitError, WorkerLostError) as exc:
                outcomes.append(ItemOutcome(error=exc))
    return outcomes


ChunkFuture = PrefectFuture[list[ItemOutcome]]
SETTLE_POLL_S = 1.0
"""How often the flow's wait for its next finished chunk wakes (a stop signal is handled at once regardless)."""


def settled(chunks: Sequence[list[Run]], submit: Callable[[list[Run]], ChunkFuture],
            depth: int) -> Iterator[list[tuple[Run, ItemOutcome]]]:
    """Each chunk's runs with their outcomes, chunk by chunk as their tasks finish (a result comes back to the flow
    at once: a worker that dies later cannot take it along and have it computed again). A chunk that fails as a
    whole (its worker died, say, killed by one of its items) is bisected: both halves are submitted again, and so on
    down to single runs (at most `depth` times), so only the run that brings its chunk down records the failure,
    and its companions complete with their one attempt."""
    finished: SimpleQueue[tuple[list[Run], ChunkFuture, int]] = SimpleQueue()
    pending = 0

    def launch(chunk: list[Run], splits_left: int) -> None:
        nonlocal pending
        future = submit(chunk)
        pending += 1
        future.add_done_callback(lambda f: finished.put((chunk, f, splits_left)))

    for chunk in chunks:
        launch(chunk, depth)
    while pending:
        try:
            chunk, future, splits_left = finished.get(timeout=SETTLE_POLL_S)
        except Empty:
            continue
        pending -= 1
        try:
            outcomes = [outcome.unpacked() for outcome in future.result()]
        except Exception as exc:  # noqa: BLE001  (recorded against the runs, the lone one when bisected down to it)
            if len(chunk) > 1 and splits_left > 0:
                for half in (chunk[:len(chunk) // 2], chunk[len(chunk) // 2:]):  # both at once: side by side
                    launch(half, splits_left - 1)
                continue
            error: BaseException = exc
            if is_lost_worker(exc):
                alone = "alone" if len(chunk) == 1 else f"with {len(chunk) - 1} others"
                error = WorkerLostError(f"lost worker: the Dask worker process running this item {alone} died "
                                        f"({type(exc).__name__}: {exc})")
            outcomes = [ItemOutcome(error=error)] * len(chunk)
        yield list(zip(chunk, outcomes, strict=True))


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


def by_parameters(runs: Sequence[Run]) -> list[list[Run]]:
    """Runs grouped by parameter set (a chunk runs under one), rank order kept within each group."""
    groups: dict[str, list[Run]] = {}
    for run in runs:
        groups.setdefault(queue.param_hash(run.parameters), []).append(run)
    return list(groups.values())


def current_flow_run_id() -> str | None:
    ctx = FlowRunContext.get()
    return str(ctx.flow_run.id) if ctx and ctx.flow_run else None


class OpenClaims:
    """The runs a flow run still owes a result, given back to the queue once (`release`) from any thread."""

    def __init__(self, run_ids: Sequence[int], flow_run_id: str | None) -> None:
        self._ids = set(run_ids)
        self._lock = threading.Lock()
        self.flow_run_id = flow_run_id
        self.last_settled = time.monotonic()
        """When a run last left the open set (monotonic clock): the flow run's progress, for the heartbeat."""

    def __bool__(self) -> bool:
        with self._lock:
            return bool(self._ids)

    def snapshot(self) -> list[int]:
        """The runs open now."""
        with self._lock:
            return sorted(self._ids)

    def keep_only(self, run_ids: Iterable[int]) -> None:
        with self._lock:
            self._ids.intersection_update(run_ids)

    def discard(self, run_id: int) -> None:
        with self._lock:
            self._ids.discard(run_id)
            self.last_settled = time.monotonic()

    def release(self) -> int:
        """Requeue every run still open (their attempt not counted); later calls find none."""
        with self._lock:
            ids, self._ids = self._ids, set()
        if not ids:
            return 0
        with session_scope(write=True) as session:
            return queue.release(session, ids, flow_run_id=self.flow_run_id)


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


@contextmanager
def _released_on_signal(claims: OpenClaims) -> Iterator[None]:
    """Release the claims from a thread woken by the signal itself (`signal.set_wakeup_fd`): the interpreter writes
    every signal's number to the wakeup socket at C level, so the release does not depend on the exception a Python
    handler raises in the interrupted frame, which is lost when it lands in a callback whose errors are ignored (seen
    during start-up imports). A wakeup fd set before (an event loop's) still receives every byte."""
    reader, writer = socket.socketpair()
    writer.setblocking(False)
    try:
        previous_fd = signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
    except ValueError:  # not the main thread of the main interpreter
        reader.close()
        writer.close()
        yield
        return

    def watch() -> None:
        while data := reader.recv(64):
            if previous_fd != -1:
                with contextlib.suppress(OSError):
                    os.write(previous_fd, data)
            if any(signum in STOP_SIGNALS for signum in data):
                claims.release()

    watcher = threading.Thread(target=watch, name="hopflow-claim-releaser", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        signal.set_wakeup_fd(previous_fd)
        writer.close()  # the watcher reads end-of-file and ends
        watcher.join(timeout=5)
        reader.close()


@contextmanager
def release_on_termination(run_ids: Sequence[int], *, release_at_end: bool = True) -> Iterator[OpenClaims]:
    """Give unfinished claims back at once when the flow is stopped (SIGTERM, Prefect cancellation, Ctrl-C), and
    when the block ends (unless `release_at_end` is False: a phase before the runs' own work, whose end, or error,
    keeps them)."""
    claims = OpenClaims(run_ids, current_flow_run_id())
    previous = None
    in_main_thread = threading.current_thread() is threading.main_thread()
    # Inside a flow run Prefect's own SIGTERM bridge raises TerminationSignal, which reaches `finally` below, and must
    # stay installed: the child acknowledges a cancel from the worker only while it is, and reports Cancelled, not
    # Crashed. Only where SIGTERM would kill the process outright is a handler of ours needed (a Python-level handler
    # is also what makes the interpreter write the signal to the wakeup fd).
    if in_main_thread and not callable(signal.getsignal(signal.SIGTERM)):
        def _terminate(signum: int, _frame: Any) -> None:
            raise KeyboardInterrupt(f"signal {signum}")

        previous = signal.signal(signal.SIGTERM, _terminate)
    release = release_at_end
    try:
        with _released_on_signal(claims) if in_main_thread else contextlib.nullcontext():
            yield claims
    except Exception:
        raise
    except BaseException:  # a stop (KeyboardInterrupt, SystemExit, Prefect's TerminationSignal): always give back
        release = True
        raise
    finally:
        if release:
            claims.release()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


HEARTBEATS_PER_LEASE = 3
"""How often a flow run renews its open runs' leases within one lease (a missed beat or two cost nothing)."""


@contextmanager
def renewing_leases(claims: OpenClaims, stage_name: str) -> Iterator[None]:
    """The flow run's heartbeat: a thread renews the leases of its open runs while it makes progress, so a lease can
    be short (a dead flow run's work is requeued soon) whatever a batch's length. Only for a stage with a per-item
    time limit, which bounds every item: the beat stops once no run has settled for a lease plus that limit for each
    open run (a flow run stuck outside its items), and sweep requeues the work when the lease runs out."""
    stage = get_stage(stage_name)
    limit, lease = stage.time_limit, stage.lease
    if limit is None or is_in_memory(get_engine()):  # one in-memory connection: no second thread may write
        yield
        return
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(lease / HEARTBEATS_PER_LEASE):
            open_runs = claims.snapshot()
            if not open_runs or time.monotonic() - claims.last_settled > lease + limit * len(open_runs):
                continue
            try:
                with session_scope(write=True) as session:
                    queue.renew(session, open_runs, lease, flow_run_id=claims.flow_run_id)
            except Exception as exc:  # noqa: BLE001  (a missed beat is retried at the next; the lease is the bound)
                logging.getLogger(__name__).warning("lease renewal failed: %s: %s", type(exc).__name__, exc)

    heart = threading.Thread(target=beat, name="hopflow-lease-heartbeat", daemon=True)
    heart.start()
    try:
        yield
    finally:
        stop.set()
        heart.join(timeout=10)


@contextmanager
def holding_claims(run_ids: Sequence[int], stage_name: str, *, release_at_end: bool = True) -> Iterator[OpenClaims]:
    """The claims of a flow run while it works on them: given back at once on a stop signal, their leases renewed
    while they progress (`release_on_termination`, `renewing_leases`); what is still open at the end is released
    (unless `release_at_end` is False)."""
    with (release_on_termination(run_ids, release_at_end=release_at_end) as claims,
          renewing_leases(claims, stage_name)):
        yield claims


def start_cluster() -> None:
    """Start (or connect to) the flow's Dask cluster now, before its runs are marked running: prefect-dask starts it
    on the first submit otherwise, and the runs' start times (and the first chunks) would include its start-up."""
    context = FlowRunContext.get()
    runner = context.task_runner if context is not None else None
    if isinstance(runner, DaskTaskRunner):
        runner.client  # noqa: B018  (the property starts the cluster)


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
    with holding_claims(ids, stage_name) as open_ids:
        if ids:
            start_cluster()
        with session_scope(write=True) as session:
            runs = queue.start(session, ids, flow_run_id=current_flow_run_id())
            open_ids.keep_only(r.id for r in runs)
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
        chunks = [chunk for group in by_parameters(todo) for chunk in
                  chunked(group, min(get_settings().max_chunks, -(-len(group) // stage.min_chunk_items)))]
        chunk_task = run_chunk.with_options(name=f"{process.name}-chunk")
        isolated_task = run_isolated_chunk.with_options(name=f"{process.name}-chunk")
        time_limit = stage.time_limit

        def submit(chunk: list[Run]) -> ChunkFuture:
            params = stage.params.from_mapping(chunk[0].parameters)
            if time_limit is None:
                return chunk_task.submit(process, [payloads[r.input_id] for r in chunk], params)
            calls = [pack(process.fn, payloads[r.input_id], params) for r in chunk]
            return isolated_task.submit(calls, time_limit)

        for outcomes in settled(chunks, submit, get_settings().chunk_bisect_depth):
            _record_chunk(outcomes, postprocess, report)
            for run, _ in outcomes:
                open_ids.discard(run.id)
    logger.info(report.summary)
    _publish_summary(report)
    return report


def _publish_summary(report: StageReport) -> None:
    """The stage's markdown artifact in the Prefect UI; a server that refuses it costs a warning, not the results."""
    from hopflow.flows.artifacts import publish_stage_summary

    try:
        publish_stage_summary(report.stage, report.summary, report.failed, current_flow_run_id())
    except Exception as exc:  # noqa: BLE001
        get_run_logger().warning("stage summary artifact not published: %s: %s", type(exc).__name__, exc)


def _record_chunk(outcomes: list[tuple[Run, ItemOutcome]], postprocess: Postprocess | None,
                  report: StageReport) -> None:
    """Record a chunk's outcomes in one transaction, each result in a savepoint of its own: one that cannot be stored
    fails its item alone. A transaction that fails as a whole (a lost connection) is done again item by item, and an
    item whose own transaction fails records that failure."""
    done: list[int] = []
    failed: dict[int, str] = {}
    try:
        with session_scope(write=True) as session:
            live = queue.live_runs(session, [run.id for run, _ in outcomes])
            for run, outcome in outcomes:
                owned = live.get(run.id)
                if owned is None:
                    continue
                error = outcome.error
                if error is None:
                    try:
                        with session.begin_nested():
                            result = (postprocess(session, owned, outcome.result) if postprocess is not None
                                      else outcome.result)
                            queue.complete_run(session, owned, result)
                        done.append(run.id)
                        continue
                    except Exception as exc:  # noqa: BLE001  (recorded against the item, the chunk goes on)
                        error = exc
                failed[run.id] = _failure_message(error)
                queue.fail_run(session, owned, failed[run.id], retryable=is_retryable(error))
    except Exception as exc:  # noqa: BLE001
        if len(outcomes) > 1:
            for one in outcomes:
                _record_chunk([one], postprocess, report)
        else:
            run, outcome = outcomes[0]
            _record_failure(run, outcome.error or exc, report)
        return
    report.done.extend(done)
    report.failed.update(failed)


def _failure_message(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if not isinstance(exc, InputError) else str(exc)


def _record_failure(run: Run, exc: BaseException, report: StageReport) -> None:
    message = _failure_message(exc)
    with session_scope(write=True) as session:
        if queue.fail(session, run.id, message, retryable=is_retryable(exc)):
            report.failed[run.id] = message
