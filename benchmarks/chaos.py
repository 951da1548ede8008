"""Chaos run: synthetic items through controller ticks, a real Prefect server, a process worker and PostgreSQL, while
items fail (exception, hang past the lease, hard exit), flow-run processes are SIGKILLed, one controller dies in the
middle of a tick and PostgreSQL drops every connection twice. Ends with an audit: nothing lost, nothing written twice.

    eval "$(bash scripts/services.sh env)"   # PostgreSQL + Prefect server (or set PREFECT_API_URL yourself)
    .venv/bin/python benchmarks/chaos.py [--items 1000] [--kills 20] [--database-url postgresql+psycopg://...]

Without --database-url it creates (and drops at the end) a fresh database on the HOPFLOW_TEST_POSTGRES_URL server.
"""

from __future__ import annotations

import os
import sys

# `python benchmarks/chaos.py` puts benchmarks/ first on sys.path, where benchmarks/queue.py shadows the standard
# library's `queue` (which Dask imports): take it off, and put the project root and tests/ (prefect_helpers) on.
_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_HERE)
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]
for _path in (os.path.join(_ROOT, "tests"), _ROOT):
    if _path not in sys.path:
        sys.path.insert(0, _path)

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import random  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402
from collections import Counter  # noqa: E402
from collections.abc import Iterator  # noqa: E402
from contextlib import contextmanager  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

from sqlalchemy import Engine, func, insert, select, text  # noqa: E402
from sqlalchemy.pool import NullPool  # noqa: E402

ROOT = Path(_ROOT)
STAGE = "synthetic"
DEPLOYMENT = "synthetic/synthetic"
PROFILE = "local-threads"  # the flow-run process runs the items on threads: an `exit` item kills the whole flow run
TERMINATE_SQL = ("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                 "WHERE datname = current_database() AND pid <> pg_backend_pid()")
KINDS = ("exception", "hang", "exit")
CONTROLLER_KILL_TIMEOUT_S = 120.0
REAP_GRACE_S = 8.0  # a running flow run that owns no live work this long is hung (its items were swept): kill it
KILL_SPAN = 0.75  # random kills and the other events happen before this fraction of items is finished
DB_DROP_AT = (0.3, 0.6)
CONTROLLER_KILL_AT = 0.45
FLOW_RUN_PAGE = 200
PERMANENT = 1_000  # fail_attempts of an item that fails every attempt (it must end failed, at the retry limit)
PROGRESS_EVERY = 15  # ticks between progress lines


@dataclass(frozen=True)
class ChaosConfig:
    """One chaos run's size and the faults it injects."""

    items: int = 1000
    batch_size: int = 20
    target: int = 4
    lease_seconds: float = 15.0
    time_limit_s: float = 10.0  # per item: a hang is killed after this, in its item process
    retry_limit: int = 5
    failure_fraction: float = 0.3
    fail_attempts: int = 1
    permanent_exceptions: float = 0.5  # share of the exception items that raise on every attempt
    kills: int = 20
    db_drops: int = 2
    kill_controller: bool = True
    cpu_ms: float = 2.0
    sleep_ms: float = 200.0
    max_chunks: int = 2
    tick_interval_s: float = 2.0
    timeout_s: float = 1800.0
    seed: int = 7


@dataclass
class ChaosEvents:
    """What the run did to itself."""

    kills: list[str] = field(default_factory=list)
    reaped: list[str] = field(default_factory=list)
    db_drops: list[int] = field(default_factory=list)
    controller_killed: bool = False
    controller_claimed: int = 0
    controller_orphaned: int = 0
    tick_errors: list[str] = field(default_factory=list)
    ticks: int = 0
    flow_runs: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class ChaosAudit:
    """The end state: every figure the acceptance asks for."""

    items: int
    runs: int
    by_state: dict[str, int]
    lost: int
    results_twice: int
    done_without_one_result: int
    failed_with_result: int
    over_retry_limit: int
    missing_reasons: int
    attempts: dict[int, int]
    reasons: dict[str, int]
    injected: dict[str, int]
    injected_seen: dict[str, int]
    permanent: int
    permanent_failed_at_limit: int
    innocent_failed: int
    """Items that do not raise on every attempt yet ended failed (the acceptance: none)."""
    max_attempts: int

    @property
    def clean(self) -> bool:
        return not (self.lost or self.results_twice or self.done_without_one_result or self.failed_with_result
                    or self.over_retry_limit or self.missing_reasons or self.innocent_failed)


@dataclass(frozen=True)
class ChaosReport:
    """A chaos run: its configuration, what was injected, the end state and the flow runs' fates."""

    config: ChaosConfig
    events: ChaosEvents
    audit: ChaosAudit
    flow_run_states: dict[str, int]
    seconds: float

    def lines(self) -> list[str]:
        a, e, c = self.audit, self.events, self.config
        return [
            f"chaos run: {a.items} synthetic items, batch {c.batch_size}, target {c.target}, "
            f"lease {c.lease_seconds:g} s, item time limit {c.time_limit_s:g} s, "
            f"retry limit {a.max_attempts}; {self.seconds:.0f} s wall",
            f"injected item failures: {sum(a.injected.values())} of {a.items} "
            f"({', '.join(f'{k} {v}' for k, v in a.injected.items())}); seen happening: "
            f"{', '.join(f'{k} {v}' for k, v in a.injected_seen.items())}",
            f"flow-run processes SIGKILLed at random: {len(e.kills)}; hung flow runs killed after their items were "
            f"swept: {len(e.reaped)}",
            f"controller SIGKILLed mid-tick: {'yes' if e.controller_killed else 'NO'} (it had claimed "
            f"{e.controller_claimed} items, {e.controller_orphaned} of them without a flow run)",
            f"PostgreSQL connection drops: {len(e.db_drops)} (backends terminated: {e.db_drops}); "
            f"ticks {e.ticks}, of which failed {len(e.tick_errors)}",
            f"flow runs submitted by ticks: {len(e.flow_runs)}; their end states: {self.flow_run_states}",
            f"items that raise on every attempt: {a.permanent}, failed for good at the retry limit: "
            f"{a.permanent_failed_at_limit}; other items failed for good: {a.innocent_failed}",
            f"end state: {a.by_state}; attempts per run: {dict(sorted(a.attempts.items()))}",
            f"recorded reasons (history entries): {a.reasons}",
            f"items lost: {a.lost}; results written twice: {a.results_twice}; done without exactly one result: "
            f"{a.done_without_one_result}; failed with a result: {a.failed_with_result}; over the retry limit: "
            f"{a.over_retry_limit}; attempts without a recorded reason: {a.missing_reasons}",
            "VERDICT: " + ("clean" if self.audit.clean else "NOT CLEAN"),
        ]


# ---------------------------------------------------------------- set-up


@contextmanager
def chaos_stage(lease_seconds: float, retry_limit: int) -> Iterator[None]:
    """The synthetic stage with a short lease and this retry limit in this process (the controller's claims take the
    stage's lease; its enqueue gives each run the stage's retry limit)."""
    from hopflow.registry import get_stage, register

    original = get_stage(STAGE)
    register(dataclasses.replace(original, lease_seconds=lease_seconds, retry_limit=retry_limit), replace=True)
    try:
        yield
    finally:
        register(original, replace=True)


def add_items(engine: Engine, config: ChaosConfig, rng: random.Random) -> dict[str, int]:
    """Insert the items; `failure_fraction` of them misbehave, split evenly over the failure kinds. Returns counts."""
    from hopflow.db import session_scope
    from hopflow.models import SyntheticItem

    n_failing = round(config.items * config.failure_fraction)
    n_permanent = round(n_failing / len(KINDS) * config.permanent_exceptions)
    kinds = [KINDS[i % len(KINDS)] for i in range(n_failing)]
    attempts = [PERMANENT if i < n_permanent * len(KINDS) and kind == "exception" else config.fail_attempts
                for i, kind in enumerate(kinds)]
    failing = list(zip(kinds, attempts, strict=True)) + [("none", 0)] * (config.items - n_failing)
    rng.shuffle(failing)
    rows = [{"cpu_ms": config.cpu_ms, "sleep_ms": config.sleep_ms, "failure": kind, "fail_attempts": fails,
             "priority": float(i)} for i, (kind, fails) in enumerate(failing)]
    with session_scope(engine, write=True) as session:
        session.execute(insert(SyntheticItem), rows)
    return dict(Counter(k for k in kinds if k != "none"))


def worker_env(url: str, config: ChaosConfig, home: Path) -> dict[str, str]:
    return {"HOPFLOW_DATABASE_URL": url, "HOPFLOW_HOME": str(home), "HOPFLOW_PROFILE_SYNTHETIC": PROFILE,
            "HOPFLOW_LEASES": json.dumps({STAGE: config.lease_seconds}),
            "HOPFLOW_TIME_LIMITS": json.dumps({STAGE: config.time_limit_s}),
            "HOPFLOW_MAX_CHUNKS": str(config.max_chunks), "PREFECT_WORKER_QUERY_SECONDS": "1",
            "PREFECT_WORKER_PREFETCH_SECONDS": "1"}


# ---------------------------------------------------------------- faults


def drop_connections(url: str) -> int:
    """Terminate every other PostgreSQL backend of the database; returns how many."""
    from sqlalchemy import create_engine

    admin = create_engine(url, poolclass=NullPool)
    try:
        with admin.connect() as conn:
            count = int(conn.execute(text(TERMINATE_SQL)).scalar() or 0)
            conn.commit()
            return count
    finally:
        admin.dispose()


def kill_flow_run(flow_run_id: str) -> bool:
    """SIGKILL the process(es) of a flow run; False when none was found."""
    from prefect_helpers import flow_run_pids

    pids = flow_run_pids(flow_run_id)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return bool(pids)


def running_flow_runs(client: Any, deployment_id: Any) -> list[Any]:
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterDeploymentId,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType

    return client.read_flow_runs(flow_run_filter=FlowRunFilter(
        deployment_id=FlowRunFilterDeploymentId(any_=[deployment_id]),
        state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.RUNNING]))), limit=FLOW_RUN_PAGE)


def owners(engine: Engine, states: tuple[str, ...]) -> set[str]:
    """Flow runs that own runs in these states."""
    from hopflow.db import session_scope
    from hopflow.models import Run

    with session_scope(engine) as session:
        return set(session.scalars(select(Run.flow_run_id).where(Run.state.in_(states),
                                                                 Run.flow_run_id.is_not(None)).distinct()))


def kill_controller_mid_tick(engine: Engine, url: str, config: ChaosConfig, home: Path,
                             log: Path) -> tuple[bool, int, int]:
    """Run one tick in a subprocess and SIGKILL it once it has claimed work (before it finishes submitting).

    Returns (killed mid-tick, items it claimed, of those the ones left without a flow run).
    """
    from hopflow.db import session_scope
    from hopflow.models import Run

    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--tick-once",
        "--lease-seconds",
        str(config.lease_seconds),
        "--retry-limit",
        str(config.retry_limit),
        "--batch-size",
        str(config.batch_size),
    ]
    env = {**os.environ, "HOPFLOW_DATABASE_URL": url, "HOPFLOW_HOME": str(home)}
    with log.open("ab") as out:
        proc = subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    claimant = f"controller@{socket.gethostname()}:{proc.pid}"
    killed = False
    deadline = time.monotonic() + CONTROLLER_KILL_TIMEOUT_S
    while proc.poll() is None and time.monotonic() < deadline:
        with session_scope(engine) as session:
            claimed = session.scalar(select(func.count()).select_from(Run).where(Run.claimant == claimant))
        if claimed:
            os.kill(proc.pid, signal.SIGKILL)
            killed = True
            break
        time.sleep(0.02)
    if proc.poll() is None and not killed:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    with session_scope(engine) as session:
        rows = session.execute(select(Run.flow_run_id).where(Run.claimant == claimant)).all()
    return killed and proc.returncode == -signal.SIGKILL, len(rows), sum(1 for (fr,) in rows if fr is None)


def tick_once(lease_seconds: float, retry_limit: int, batch_size: int) -> None:
    """One controller tick of the synthetic stage (the subprocess that gets killed mid-way)."""
    from prefect.client.orchestration import get_client

    from hopflow.flows.controller import tick

    with chaos_stage(lease_seconds, retry_limit), get_client(sync_client=True) as client:
        report = tick(client, stages=[STAGE], batch_sizes={STAGE: batch_size}, mirror=False, publish=False)
    print(report.summary, flush=True)


# ---------------------------------------------------------------- the audit


def terminal_count(engine: Engine) -> tuple[int, int]:
    """(runs finished for good: done, or failed with no attempt left; all runs)."""
    from hopflow.db import session_scope
    from hopflow.models import Run, RunState

    with session_scope(engine) as session:
        finished = session.scalar(
            select(func.count())
            .select_from(Run)
            .where(
                Run.stage == STAGE,
                (Run.state == RunState.DONE) | ((Run.state == RunState.FAILED) & (Run.attempts >= Run.max_attempts)),
            )
        )
        total = session.scalar(select(func.count()).select_from(Run).where(Run.stage == STAGE))
    return int(finished or 0), int(total or 0)


HANG_ENDINGS = {"time limit", "lease expired", "flow run crashed"}
"""How a hung item's attempt ends: its item process is killed at the time limit; or, when its flow run is killed
first, the lease runs out or Prefect reports the flow run crashed."""
EXIT_ENDINGS = {"item process died", "flow run crashed"}
"""How an exiting item's attempt ends: its item process dies alone; or its flow run is killed first."""


def _reason_kind(entry: dict[str, Any]) -> str:
    error = str(entry.get("error", ""))
    if "lease expired" in error:
        return "lease expired"
    if "ended Crashed" in error:
        return "flow run crashed"
    if error.startswith("flow run "):
        return "flow run ended " + error.split(" ended ", 1)[-1]
    if "SyntheticFailure" in error:
        return "injected exception"
    if "TimeLimitError" in error:
        return "time limit"
    if "WorkerLostError" in error:
        return "item process died"
    return f"{entry.get('kind')}: {error[:60]}"


def audit(engine: Engine) -> ChaosAudit:
    """Count what the acceptance asks for, from the database alone."""
    from hopflow.db import session_scope
    from hopflow.models import Run, RunState, SyntheticItem, SyntheticResult

    with session_scope(engine) as session:
        rows = session.scalars(select(SyntheticItem)).all()
        items = {i.id: i.failure for i in rows}
        permanent = {i.id for i in rows if i.fail_attempts >= PERMANENT}
        runs = session.scalars(select(Run).where(Run.stage == STAGE)).all()
        results = dict(
            session.execute(select(SyntheticResult.item_id, func.count()).group_by(SyntheticResult.item_id)).all()
        )
        run_rows = [(r.input_id, r.state, r.attempts, r.max_attempts, r.error, list(r.history or [])) for r in runs]
    per_item = Counter(input_id for input_id, *_ in run_rows)
    by_state = Counter(state for _, state, *_ in run_rows)
    terminal = {RunState.DONE, RunState.FAILED}
    lost = sum(1 for i in items if per_item.get(i, 0) != 1) + sum(
        1
        for _, state, attempts, limit, *_ in run_rows
        if state not in terminal or (state == RunState.FAILED and attempts < limit)
    )
    reasons: Counter[str] = Counter()
    seen: Counter[str] = Counter()
    missing = 0
    for input_id, state, attempts, _limit, error, history in run_rows:
        reasons.update(_reason_kind(h) for h in history)
        kind = items.get(input_id, "none")
        kinds = {_reason_kind(h) for h in history}
        if (
            (kind == "exception" and "injected exception" in kinds)
            or (kind == "hang" and kinds & HANG_ENDINGS)
            or (kind == "exit" and kinds & EXIT_ENDINGS)
        ):
            seen[kind] += 1
        if len(history) < attempts - 1 or (state == RunState.FAILED and not (error and history)):
            missing += 1
    return ChaosAudit(
        items=len(items),
        runs=len(run_rows),
        by_state=dict(by_state),
        lost=lost,
        results_twice=sum(1 for n in results.values() if n > 1),
        done_without_one_result=sum(1 for i, s, *_ in run_rows if s == RunState.DONE and results.get(i, 0) != 1),
        failed_with_result=sum(1 for i, s, *_ in run_rows if s == RunState.FAILED and results.get(i, 0)),
        over_retry_limit=sum(1 for _, _, attempts, limit, *_ in run_rows if attempts > limit),
        missing_reasons=missing,
        attempts=dict(Counter(a for _, _, a, *_ in run_rows)),
        reasons=dict(reasons),
        injected=dict(Counter(k for k in items.values() if k != "none")),
        injected_seen={k: seen.get(k, 0) for k in KINDS},
        permanent=len(permanent),
        permanent_failed_at_limit=sum(
            1 for i, s, attempts, limit, *_ in run_rows if i in permanent and s == RunState.FAILED and attempts == limit
        ),
        innocent_failed=sum(1 for i, s, *_ in run_rows if i not in permanent and s == RunState.FAILED),
        max_attempts=max((limit for _, _, _, limit, *_ in run_rows), default=0),
    )


def flow_run_states(client: Any, flow_run_ids: list[str]) -> dict[str, int]:
    """End states of these flow runs, by state type."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    states: Counter[str] = Counter()
    ids = [uuid.UUID(i) for i in flow_run_ids]
    for start in range(0, len(ids), FLOW_RUN_PAGE):
        chunk = ids[start : start + FLOW_RUN_PAGE]
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=chunk)), limit=len(chunk))
        states.update(r.state_type.value if r.state_type else "none" for r in runs)
    return dict(states)


# ---------------------------------------------------------------- the run


def run_chaos(engine: Engine, client: Any, config: ChaosConfig, workdir: Path) -> ChaosReport:
    """Drive a full chaos run against the database behind `engine` and the Prefect server of `client`."""
    from hopflow import queue
    from hopflow.db import session_scope
    from hopflow.deployments.bootstrap import POOL_NAME
    from hopflow.flows.controller import tick
    from hopflow.flows.submission import count_live
    from hopflow.models import RunState
    from hopflow.registry import get_stage

    from prefect_helpers import delete_waiting_runs, deploy_stage, start_worker, stop_process_group, wait_for_worker

    rng = random.Random(config.seed)
    url = engine.url.render_as_string(hide_password=False)
    home = workdir / "home"
    add_items(engine, config, rng)
    with session_scope(engine, write=True) as session:
        queue.set_target(session, get_stage(STAGE), config.target, "chaos run")
    deployment = deploy_stage(client, DEPLOYMENT)
    events = ChaosEvents()
    kill_at = sorted(KILL_SPAN * (k + 0.5) / config.kills for k in range(config.kills)) if config.kills else []
    drop_at = list(DB_DROP_AT[: config.db_drops])
    controller_at = CONTROLLER_KILL_AT if config.kill_controller else None
    idle_since: dict[str, float] = {}
    since = time.time()
    worker = start_worker(POOL_NAME, worker_env(url, config, home), workdir / "worker.log")
    started = time.monotonic()
    try:
        wait_for_worker(client, POOL_NAME, since)
        with chaos_stage(config.lease_seconds, config.retry_limit):
            while True:
                loop_start = time.monotonic()
                if loop_start - started > config.timeout_s:
                    raise RuntimeError(f"chaos run not finished after {config.timeout_s:.0f} s; see {workdir}")
                try:
                    report = tick(
                        client,
                        engine=engine,
                        stages=[STAGE],
                        batch_sizes={STAGE: config.batch_size},
                        mirror=False,
                        publish=False,
                    )
                    events.flow_runs += [fr for stage_tick in report.stages for fr in stage_tick.submitted]
                except Exception as exc:  # noqa: BLE001  (a dropped connection fails one tick; the next one goes on)
                    events.tick_errors.append(f"{type(exc).__name__}: {str(exc)[:200]}")
                events.ticks += 1
                finished, total = terminal_count(engine)
                if total == config.items and finished == total:
                    break
                progress = finished / config.items
                try:  # a dropped connection or a busy Prefect server fails this round; the next one goes on
                    running = running_flow_runs(client, deployment.id)
                    live_owners = owners(engine, RunState.LIVE)
                    # hung flow runs: still running, but their items were swept away from them
                    now = time.monotonic()
                    for fr in running:
                        key = str(fr.id)
                        if key in live_owners:
                            idle_since.pop(key, None)
                        elif now - idle_since.setdefault(key, now) >= REAP_GRACE_S and kill_flow_run(key):
                            events.reaped.append(key)
                            idle_since.pop(key, None)
                    while kill_at and progress >= kill_at[0]:
                        busy = owners(engine, (RunState.RUNNING,))
                        candidates = [str(fr.id) for fr in running if str(fr.id) in busy]
                        rng.shuffle(candidates)
                        victim = next((c for c in candidates if kill_flow_run(c)), None)
                        if victim is None:
                            break  # nothing running now: try at the next tick
                        events.kills.append(victim)
                        kill_at.pop(0)
                    if drop_at and progress >= drop_at[0]:
                        events.db_drops.append(drop_connections(url))
                        drop_at.pop(0)
                    if controller_at is not None and progress >= controller_at:
                        controller_at = None
                        live = count_live(client, deployment.id)
                        with session_scope(engine, write=True) as session:  # room for the dying tick to claim
                            queue.set_target(session, get_stage(STAGE), max(config.target, live + 2), "chaos: room")
                        killed, claimed, orphaned = kill_controller_mid_tick(
                            engine, url, config, home, workdir / "controller.log"
                        )
                        with session_scope(engine, write=True) as session:
                            queue.set_target(session, get_stage(STAGE), config.target, "chaos run")
                        events.controller_killed = killed
                        events.controller_claimed, events.controller_orphaned = claimed, orphaned
                except Exception as exc:  # noqa: BLE001
                    events.tick_errors.append(f"faults: {type(exc).__name__}: {str(exc)[:200]}")
                if events.ticks % PROGRESS_EVERY == 0:
                    print(
                        f"[chaos] {time.monotonic() - started:5.0f} s: {finished}/{config.items} finished, "
                        f"{len(events.kills)} kills, {len(events.reaped)} hung runs killed, "
                        f"{len(events.db_drops)} db drops, {len(events.tick_errors)} failed rounds",
                        flush=True,
                    )
                time.sleep(max(0.0, config.tick_interval_s - (time.monotonic() - loop_start)))
        seconds = time.monotonic() - started
    finally:
        for fr in running_flow_runs(client, deployment.id):  # hung runs whose items were all done elsewhere
            kill_flow_run(str(fr.id))
        stop_process_group(worker)
        delete_waiting_runs(client, deployment.id)
    return ChaosReport(config, events, audit(engine), flow_run_states(client, events.flow_runs), seconds)


# ---------------------------------------------------------------- command line


def _fresh_database(server_url: str) -> tuple[str, str]:
    from sqlalchemy import create_engine

    name = f"hopflow_chaos_{uuid.uuid4().hex[:10]}"
    admin = create_engine(server_url, poolclass=NullPool, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    return server_url.rsplit("/", 1)[0] + "/" + name, name


def _drop_database(server_url: str, name: str) -> None:
    from sqlalchemy import create_engine

    admin = create_engine(server_url, poolclass=NullPool, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@contextmanager
def benchmark_database(
    parser: argparse.ArgumentParser, database_url: str | None, prefix: str
) -> Iterator[tuple[Engine, Path]]:
    """A work dir (HOPFLOW_HOME inside) and an initialised database: `database_url`, or a fresh one on the
    HOPFLOW_TEST_POSTGRES_URL server, dropped at the end. Needs PREFECT_API_URL (the services' environment)."""
    if not os.environ.get("PREFECT_API_URL"):
        parser.error("PREFECT_API_URL is not set (eval \"$(bash scripts/services.sh env)\")")
    server, dropped = os.environ.get("HOPFLOW_TEST_POSTGRES_URL"), None
    url = database_url
    if url is None:
        if not server:
            parser.error("give --database-url or set HOPFLOW_TEST_POSTGRES_URL")
        url, dropped = _fresh_database(server)
    workdir = Path(tempfile.mkdtemp(prefix=prefix))
    os.environ["HOPFLOW_HOME"] = str(workdir / "home")
    os.environ["HOPFLOW_DATABASE_URL"] = url
    from hopflow.db import init_db, make_engine

    engine = init_db(make_engine(url))
    print(
        f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}; Prefect API "
        f"{os.environ['PREFECT_API_URL']}; work dir {workdir}",
        flush=True,
    )
    try:
        yield engine, workdir
    finally:
        engine.dispose()
        if dropped and server:
            _drop_database(server, dropped)


def main(argv: list[str] | None = None) -> int:
    defaults = ChaosConfig()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=defaults.items)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--target", type=int, default=defaults.target)
    parser.add_argument("--lease-seconds", type=float, default=defaults.lease_seconds)
    parser.add_argument("--retry-limit", type=int, default=defaults.retry_limit)
    parser.add_argument("--failure-fraction", type=float, default=defaults.failure_fraction)
    parser.add_argument("--kills", type=int, default=defaults.kills)
    parser.add_argument("--db-drops", type=int, default=defaults.db_drops)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument(
        "--database-url",
        default=None,
        help="an empty PostgreSQL database (default: a fresh one on "
        "the HOPFLOW_TEST_POSTGRES_URL server, dropped at the end)",
    )
    parser.add_argument("--tick-once", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.tick_once:
        tick_once(args.lease_seconds, args.retry_limit, args.batch_size)
        return 0
    config = dataclasses.replace(
        defaults,
        items=args.items,
        batch_size=args.batch_size,
        target=args.target,
        lease_seconds=args.lease_seconds,
        retry_limit=args.retry_limit,
        failure_fraction=args.failure_fraction,
        kills=args.kills,
        db_drops=args.db_drops,
        seed=args.seed,
    )
    from prefect.client.orchestration import get_client

    with benchmark_database(parser, args.database_url, "hopflow-chaos-") as (engine, workdir):
        with get_client(sync_client=True) as client:
            report = run_chaos(engine, client, config, workdir)
        for line in report.lines():
            print(line)
    return 0 if report.audit.clean else 1


if __name__ == "__main__":
    sys.exit(main())
