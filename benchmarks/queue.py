"""Queue throughput: claimants looping claim(10) + complete on SQLite and PostgreSQL, and claim(100) latency at 100,000
eligible items. Run: `python benchmarks/queue.py [--postgres URL] [--items N]` (the PostgreSQL URL defaults to
HOPFLOW_TEST_POSTGRES_URL, which `scripts/services.sh env` prints)."""

from __future__ import annotations

import sys
from pathlib import Path

# This file's name shadows the standard library's `queue` (which multiprocessing needs) when run as a script.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse  # noqa: E402
import multiprocessing as mp
import os
import statistics
import tempfile
import time
import uuid
from types import SimpleNamespace

from sqlalchemy import text

from hopflow import queue
from hopflow.db import init_db, make_engine, session_scope
from hopflow.models import SyntheticItem
from hopflow.registry import get_stage

STAGE = "synthetic"


def fresh_database(backend: str, pg_url: str | None, workdir: str) -> tuple[str, str | None]:
    if backend == "sqlite":
        return f"sqlite:///{workdir}/bench-{uuid.uuid4().hex[:6]}.sqlite", None
    name = f"bench_{uuid.uuid4().hex[:10]}"
    admin = make_engine(pg_url).execution_options(isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    return pg_url.rsplit("/", 1)[0] + "/" + name, name


def drop_database(pg_url: str, name: str) -> None:
    admin = make_engine(pg_url).execution_options(isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


def seed(url: str, n: int) -> None:
    engine = init_db(make_engine(url))
    with session_scope(engine, write=True) as s:
        s.execute(SyntheticItem.__table__.insert(), [{"priority": float(i % 997), "cpu_ms": 0.0, "sleep_ms": 0.0,
                                                       "failure": "none", "fail_attempts": 0} for i in range(n)])
        queue.enqueue(s, get_stage(STAGE))
    engine.dispose()


def claimant(url: str, start_at: float, out: mp.Queue) -> None:
    engine = make_engine(url)
    done = 0
    while time.time() < start_at:
        time.sleep(0.001)
    while claimed := queue.claim(STAGE, 10, engine=engine):
        with session_scope(engine, write=True) as s:
            queue.start(s, [c.id for c in claimed])
            queue.complete_many(s, {c.id: SimpleNamespace(value=1.0, elapsed_s=0.0) for c in claimed})
        done += len(claimed)
    out.put(done)


def throughput(url: str, n_items: int, n_claimants: int) -> float:
    seed(url, n_items)
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    start_at = time.time() + 3.0  # let every process import before the clock starts
    procs = [ctx.Process(target=claimant, args=(url, start_at, out)) for _ in range(n_claimants)]
    for p in procs:
        p.start()
    total = sum(out.get() for _ in procs)
    elapsed = time.time() - start_at
    for p in procs:
        p.join()
    assert total == n_items, (total, n_items)
    return total / elapsed


def claim_latency(url: str, n_items: int, repeats: int = 5) -> float:
    seed(url, n_items)
    engine = make_engine(url)
    if engine.dialect.name == "postgresql":
        with engine.connect() as conn:
            conn.execute(text("ANALYZE"))
            conn.commit()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        claimed = queue.claim(STAGE, 100, engine=engine)
        times.append(time.perf_counter() - t0)
        assert len(claimed) == 100
    engine.dispose()
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--postgres", default=os.environ.get("HOPFLOW_TEST_POSTGRES_URL"))
    parser.add_argument("--items", type=int, default=10_000)
    parser.add_argument("--latency-items", type=int, default=100_000)
    parser.add_argument("--backends", nargs="+", default=["sqlite", "postgres"])
    parser.add_argument("--claimants", type=int, nargs="+", default=[1, 8])
    args = parser.parse_args()
    backends = [b for b in args.backends if b == "sqlite" or args.postgres]
    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        for backend in backends:
            for n_claimants in args.claimants:
                url, name = fresh_database(backend, args.postgres, workdir)
                rate = throughput(url, args.items, n_claimants)
                rows.append((backend, f"{n_claimants} claimant(s)", f"{rate:,.0f} items/s"))
                print("  ", *rows[-1], flush=True)
                if name:
                    drop_database(args.postgres, name)
            url, name = fresh_database(backend, args.postgres, workdir)
            latency = claim_latency(url, args.latency_items)
            rows.append((backend, f"claim(100) at {args.latency_items:,} eligible", f"{latency * 1000:.1f} ms"))
            print("  ", *rows[-1], flush=True)
            if name:
                drop_database(args.postgres, name)
    print(f"queue benchmark: {args.items:,} items, claim(10) + complete per item; machine: {os.cpu_count()} cores")
    for backend, what, figure in rows:
        print(f"  {backend:9s} {what:32s} {figure}")
    by = {(b, w): f for b, w, f in rows}
    for backend in backends if args.claimants == [1, 8] else []:
        one = float(by[(backend, "1 claimant(s)")].split()[0].replace(",", ""))
        eight = float(by[(backend, "8 claimant(s)")].split()[0].replace(",", ""))
        print(f"  {backend:9s} 8 vs 1 claimants: {eight / one:.2f}x")


if __name__ == "__main__":
    main()
