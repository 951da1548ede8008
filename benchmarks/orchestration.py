"""Orchestration benchmark, one command: synthetic items of 50 ms CPU through controller + Prefect + Dask against a
2-process pool over the same function, and the controller's tick time with 100,000 eligible items.

Throughput is printed with start-up excluded (the pool: its processes up; the controller path: from the first item
its flow run started, once its Dask cluster is up, to the last one recorded) and included (the pool from its
creation; the controller path from the first tick: the worker picking the flow run up, its process and cluster
starting).

    .venv/bin/python benchmarks/orchestration.py [--items 1000] [--target 1] [--batch-size 1000] [--tick-items 100000]

Uses the Prefect server at PREFECT_API_URL when one answers, else starts a throw-away one; starts its own process
worker; keeps its SQLite databases in a temporary folder (`--tick-database-url` for PostgreSQL).
"""

from __future__ import annotations

import os
import sys

# `python benchmarks/orchestration.py` puts benchmarks/ first on sys.path, where a module may shadow the standard
# library (benchmarks/queue.py shadows `queue`, which concurrent.futures and Dask import): run from the project root.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]
_TESTS = os.path.join(os.path.dirname(_HERE), "tests")  # prefect_helpers: deploy, worker, clean-up
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)

import argparse  # noqa: E402
import shutil  # noqa: E402
import socket  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import urllib.request  # noqa: E402
from concurrent.futures import ProcessPoolExecutor  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PREFECT = Path(sys.executable).with_name("prefect")
SERVER_START_TIMEOUT_S = 120.0
TICK_INTERVAL_S = 5.0
DONE_POLL_S = 0.5
DRAIN_TIMEOUT_S = 1800.0
TICK_BATCH = 20  # the synthetic stage's own batch size, used for the tick-time part


@dataclass(frozen=True)
class Throughput:
    """Items per second of one way of running the same work."""

    label: str
    items: int
    seconds: float

    @property
    def per_second(self) -> float:
        return self.items / self.seconds


# ---------------------------------------------------------------- services


def _healthy(api_url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{api_url}/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def ensure_prefect_server(workdir: Path) -> subprocess.Popen[bytes] | None:
    """Reuse the server at PREFECT_API_URL, or start one (returned, to stop at the end) and point PREFECT_API_URL to
    it."""
    url = os.environ.get("PREFECT_API_URL")
    if url and _healthy(url):
        return None
    port = _free_port()
    env = {**os.environ, "PREFECT_HOME": str(workdir / "prefect-home"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_UI_ENABLED": "false", "PREFECT_API_URL": "", "PREFECT_LOGGING_LEVEL": "WARNING"}
    log = (workdir / "prefect-server.log").open("wb")
    server = subprocess.Popen([str(PREFECT), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                              env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}/api"
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while not _healthy(url):
        if server.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"Prefect server did not start; see {workdir / 'prefect-server.log'}")
        time.sleep(0.5)
    os.environ["PREFECT_API_URL"] = url
    return server


# ---------------------------------------------------------------- the two ways of running the items


def _items(n: int, cpu_ms: float) -> list[dict[str, Any]]:
    return [{"item_id": i, "cpu_ms": cpu_ms, "sleep_ms": 0.0, "failure": "none", "fail_attempts": 0}
            for i in range(n)]


def _pid(_: int) -> int:
    time.sleep(0.2)
    return os.getpid()


@dataclass(frozen=True)
class PoolRun:
    """The reference's throughput with its start-up (processes started, with the task module) and without."""

    whole: Throughput
    items: Throughput


def run_pool(n: int, cpu_ms: float, processes: int) -> PoolRun:
    """The reference: a ProcessPoolExecutor over tasks.synthetic.synthetic_work."""
    from hopflow.tasks.synthetic import synthetic_work

    started = time.perf_counter()
    with ProcessPoolExecutor(processes) as pool:
        while len(set(pool.map(_pid, range(processes)))) < processes:  # every process up before the items
            pass
        mapped = time.perf_counter()
        results = list(pool.map(synthetic_work, _items(n, cpu_ms)))
        ended = time.perf_counter()
    assert len(results) == n
    label = f"{processes}-process pool"
    return PoolRun(Throughput(label, n, ended - started), Throughput(label, n, ended - mapped))


def _engine(url: str) -> Any:
    from hopflow.db import init_db, make_engine

    return init_db(make_engine(url))


def _add_items(engine: Any, n: int, cpu_ms: float) -> None:
    from sqlalchemy import insert

    from hopflow.db import session_scope
    from hopflow.models import SyntheticItem

    rows = [{"cpu_ms": cpu_ms, "sleep_ms": 0.0, "failure": "none", "fail_attempts": 0, "priority": float(i)}
            for i in range(n)]
    with session_scope(engine, write=True) as session:
        for start in range(0, n, 10_000):
            session.execute(insert(SyntheticItem), rows[start:start + 10_000])


def _set_target(engine: Any, n: int) -> None:
    from hopflow import queue
    from hopflow.db import session_scope
    from hopflow.registry import get_stage

    with session_scope(engine, write=True) as session:
        queue.set_target(session, get_stage("synthetic"), n, "benchmark")


def _item_phase_seconds(engine: Any) -> float:
    """From the first item started to the last one recorded (the flow runs' start-up, their Dask clusters', left
    out: the runs are started once the flow run's cluster is up)."""
    from sqlalchemy import func, select

    from hopflow.db import session_scope
    from hopflow.models import Run

    with session_scope(engine) as session:
        first, last = session.execute(select(func.min(Run.started_at), func.max(Run.finished_at))
                                      .where(Run.stage == "synthetic")).one()
    return float((last - first).total_seconds())


def _done(engine: Any) -> int:
    from hopflow import queue
    from hopflow.db import session_scope

    with session_scope(engine) as session:
        return queue.counts_by_state(session).get("synthetic", {}).get("done", 0)


@dataclass(frozen=True)
class PrefectRun:
    """The controller path: throughput (from the first tick, and from the first item started), flow runs made, and
    the ticks it took."""

    throughput: Throughput
    items: Throughput
    flow_runs: int
    tick_seconds: list[float]


def run_prefect(workdir: Path, url: str, n: int, cpu_ms: float, target: int, batch: int, profile: str) -> PrefectRun:
    """Controller ticks (driven here) claim batches; a process worker runs the synthetic flow on a Dask cluster."""
    from prefect.client.orchestration import get_client

    from hopflow.deployments.bootstrap import POOL_NAME
    from hopflow.flows.controller import tick

    from prefect_helpers import deploy_stage, start_worker, stop_process_group, wait_for_worker

    engine = _engine(url)
    _add_items(engine, n, cpu_ms)
    _set_target(engine, target)
    with get_client(sync_client=True) as client:
        deploy_stage(client, "synthetic/synthetic")
        since = time.time()
        env = {"HOPFLOW_DATABASE_URL": url, "HOPFLOW_HOME": str(workdir / "home"), "HOPFLOW_PROFILE_SYNTHETIC": profile,
               "PREFECT_WORKER_QUERY_SECONDS": "1", "PREFECT_WORKER_PREFETCH_SECONDS": "1"}
        worker = start_worker(POOL_NAME, env, workdir / "worker.log")
        try:
            wait_for_worker(client, POOL_NAME, since)
            ticks: list[float] = []
            flow_runs = 0
            started = time.perf_counter()
            last_tick = -TICK_INTERVAL_S
            while _done(engine) < n:
                now = time.perf_counter()
                if now - started > DRAIN_TIMEOUT_S:
                    raise RuntimeError(f"not drained after {DRAIN_TIMEOUT_S} s; see {workdir / 'worker.log'}")
                if now - last_tick >= TICK_INTERVAL_S:  # ticks cost CPU too: not more often than this
                    report = tick(client, engine=engine, stages=["synthetic"], batch_sizes={"synthetic": batch},
                                  mirror=False, publish=False)
                    ticks.append(report.seconds)
                    flow_runs += report.submitted
                    last_tick = now
                time.sleep(DONE_POLL_S)
            seconds = time.perf_counter() - started
        finally:
            stop_process_group(worker)
    item_seconds = _item_phase_seconds(engine)
    engine.dispose()
    label = f"controller+Prefect+Dask ({profile}, target {target}, batch {batch})"
    return PrefectRun(Throughput(label, n, seconds), Throughput(label, n, item_seconds), flow_runs, ticks)


# ---------------------------------------------------------------- tick time at scale


@dataclass(frozen=True)
class TickTimes:
    """Controller tick times with many eligible items."""

    items: int
    first: float
    steady: list[float]


def measure_ticks(url: str, n: int, ticks: int) -> TickTimes:
    """Ticks over `n` eligible items: the first one queues and ranks them all; each later one claims a batch and
    submits a flow run (to a deployment without a work pool, so its runs stay scheduled and count as live)."""
    import uuid

    from prefect.client.orchestration import get_client

    from hopflow.flows.controller import tick

    engine = _engine(url)
    _add_items(engine, n, 50.0)
    with get_client(sync_client=True) as client:
        flow_id = client.create_flow_from_name("synthetic")
        name = f"bench-ticks-{uuid.uuid4().hex[:8]}"
        deployment_id = client.create_deployment(flow_id=flow_id, name=name)
        try:
            _set_target(engine, 1)
            first = tick(client, engine=engine, stages=["synthetic"], deployments={"synthetic": f"synthetic/{name}"})
            steady = []
            for k in range(ticks):
                _set_target(engine, k + 2)  # one more live run wanted: every tick claims and submits one batch
                report = tick(client, engine=engine, stages=["synthetic"],
                              deployments={"synthetic": f"synthetic/{name}"})
                assert report.submitted == 1, report.summary
                steady.append(report.seconds)
        finally:
            from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterDeploymentId

            for run in client.read_flow_runs(flow_run_filter=FlowRunFilter(
                    deployment_id=FlowRunFilterDeploymentId(any_=[deployment_id]))):
                client.delete_flow_run(run.id)
            client.delete_deployment(deployment_id)
    engine.dispose()
    return TickTimes(n, first.seconds, steady)


# ---------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=1000)
    parser.add_argument("--cpu-ms", type=float, default=50.0)
    parser.add_argument("--processes", type=int, default=2, help="processes of the reference pool")
    parser.add_argument("--target", type=int, default=1, help="live flow runs the controller keeps")
    parser.add_argument("--batch-size", type=int, default=1000, help="items per flow run")
    parser.add_argument("--profile", default="local", help="Dask cluster profile of the synthetic flow")
    parser.add_argument("--tick-items", type=int, default=100_000)
    parser.add_argument("--ticks", type=int, default=10)
    parser.add_argument("--tick-database-url", default=None,
                        help="an empty database for the tick-time part (default: a SQLite file in a temporary folder)")
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--skip-ticks", action="store_true")
    args = parser.parse_args(argv)

    workdir = Path(tempfile.mkdtemp(prefix="hopflow-bench-"))
    os.environ["HOPFLOW_HOME"] = str(workdir / "home")
    sys.path.insert(0, str(ROOT))
    server = ensure_prefect_server(workdir)
    print(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}; "
          f"Prefect API {os.environ['PREFECT_API_URL']}{' (started here)' if server else ''}; work dir {workdir}")
    try:
        if not args.skip_throughput:
            pool = run_pool(args.items, args.cpu_ms, args.processes)
            url = f"sqlite:///{workdir / 'throughput.sqlite'}"
            run = run_prefect(workdir, url, args.items, args.cpu_ms, args.target, args.batch_size, args.profile)
            print(f"({run.flow_runs} flow runs, {len(run.tick_seconds)} ticks)")
            for what, ours, theirs in (("start-up excluded", run.items, pool.items),
                                       ("start-up included", run.throughput, pool.whole)):
                print(f"{what}:")
                for t in (theirs, ours):
                    print(f"  {t.label:58s} {t.items} items in {t.seconds:6.1f} s = {t.per_second:6.1f} items/s")
                print(f"  ratio (controller path / pool): {ours.per_second / theirs.per_second:.2f}x"
                      + ("  (goal >= 0.9x)" if what == "start-up excluded" else ""))
        if not args.skip_ticks:
            url = args.tick_database_url or f"sqlite:///{workdir / 'ticks.sqlite'}"
            times = measure_ticks(url, args.tick_items, args.ticks)
            print(f"tick with {times.items:,} eligible items: first (queues and ranks them all) {times.first:.2f} s; "
                  f"then claim + submit one batch: median {statistics.median(times.steady):.3f} s, "
                  f"max {max(times.steady):.3f} s over {len(times.steady)} ticks  (goal < 1 s)")
    finally:
        if server is not None:
            from prefect_helpers import stop_process_group  # after the project root went on sys.path

            stop_process_group(server)
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
