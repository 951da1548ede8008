"""Campaign run: many sleep-bound synthetic items through controller ticks (driven here every few seconds), a real
Prefect server, a process worker and PostgreSQL; reports throughput, tick times and how closely live runs track the
target.

    HOPFLOW_PREFECT_DATABASE=postgres bash scripts/services.sh start   # Prefect's own database on PostgreSQL
    eval "$(bash scripts/services.sh env)"
    .venv/bin/python benchmarks/campaign.py [--items 15000] [--batch-size 50] [--target 20] [--tick-interval 5]

The flow runs use the `local-threads` Dask profile (one process, two threads: sleep-bound items need no processes,
and 20 live flow runs with a process cluster each would swamp a small machine); --profile picks another. On one
machine they stand in for compute nodes: the worker and its flow runs go into a CPU cgroup of 5 % weight
(--compute-share; needs root), as otherwise they take the CPU from the controller and the Prefect server, which a real
campaign runs on a host of their own.
"""

from __future__ import annotations

import os
import sys

# benchmarks/ on sys.path would shadow the standard library's `queue` (benchmarks/queue.py): take it off.
_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_HERE)
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]
for _path in (os.path.join(_ROOT, "tests"), _ROOT):
    if _path not in sys.path:
        sys.path.insert(0, _path)

import argparse  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

from sqlalchemy import Engine, insert, text  # noqa: E402

STAGE = "synthetic"
DEFAULT_PROFILE = "local-threads"
SAMPLE_S = 1.0  # live runs are sampled this often between ticks
DRAIN_TIMEOUT_S = 4 * 3600.0
PROGRESS_EVERY_S = 60.0


@dataclass(frozen=True)
class CampaignConfig:
    """One campaign's size and pace."""

    items: int = 15_000
    sleep_ms: float = 100.0  # each item sleeps uniformly 0..sleep_ms
    batch_size: int = 50
    target: int = 20
    tick_interval_s: float = 5.0
    profile: str = DEFAULT_PROFILE
    max_chunks: int = 2
    compute_share: float = 0.05  # CPU weight of the worker and its flow runs relative to everything else (0: none)


@dataclass
class CampaignTrace:
    """What the driver saw: tick times, live runs found by each tick and after it, and sampled between ticks."""

    tick_seconds: list[float] = field(default_factory=list)
    tick_phases: list[dict[str, float]] = field(default_factory=list)  # per tick: seconds per part (TickReport.phases)
    tick_at: list[float] = field(default_factory=list)  # seconds since the start, per tick
    live_at_tick: list[int] = field(default_factory=list)
    live_after_tick: list[int] = field(default_factory=list)
    samples: list[tuple[float, int, int]] = field(default_factory=list)  # (time, live, queued items)
    steady_from: float | None = None
    steady_until: float | None = None
    flow_runs: int = 0
    tick_errors: list[str] = field(default_factory=list)
    compute_cgroup: str | None = None


@dataclass(frozen=True)
class CampaignReport:
    """The campaign's figures."""

    config: CampaignConfig
    seconds: float
    done: int
    trace: CampaignTrace
    database_bytes: int

    @property
    def per_second(self) -> float:
        return self.done / self.seconds

    def deviation_pct(self, values: list[int]) -> float | None:
        """Median absolute deviation of live runs from the target, as % of the target."""
        if not values:
            return None
        return 100.0 * statistics.median(abs(v - self.config.target) for v in values) / self.config.target

    def steady(self) -> list[int]:
        t = self.trace
        if t.steady_from is None:
            return []
        until = t.steady_until if t.steady_until is not None else float("inf")
        return [live for at, live, _ in t.samples if t.steady_from <= at <= until]

    def lines(self) -> list[str]:
        c, t = self.config, self.trace
        ticks = sorted(t.tick_seconds)
        p95 = _p95(ticks)
        names = sorted({name for phases in t.tick_phases for name in phases})
        parts = ", ".join(f"{name} {statistics.median(v):.3f}/{_p95(v):.3f}"
                          for name in names for v in [sorted(ph.get(name, 0.0) for ph in t.tick_phases)])
        steady = self.steady()
        sampled = self.deviation_pct(steady)
        at_tick = self.deviation_pct([v for v, at in zip(t.live_at_tick, t.tick_at, strict=True) if _in(t, at)])
        after = self.deviation_pct([v for v, at in zip(t.live_after_tick, t.tick_at, strict=True) if _in(t, at)])
        fmt = lambda v: "n/a" if v is None else f"{v:.1f} %"  # noqa: E731
        return [
            f"campaign: {c.items:,} synthetic items (sleep 0-{c.sleep_ms:g} ms, no CPU), batch {c.batch_size}, "
            f"target {c.target} live runs, a tick every {c.tick_interval_s:g} s, profile {c.profile}; worker and flow "
            + (f"runs in CPU cgroup {t.compute_cgroup} (weight {c.compute_share:g} of the rest)" if t.compute_cgroup
               else "runs share the CPU with the controller and the Prefect server"),
            f"wall time {self.seconds:.0f} s; {self.done:,} items done = {self.per_second:.1f} items/s",
            f"ticks: {len(ticks)}, p50 {statistics.median(ticks):.3f} s, p95 {p95:.3f} s, max {max(ticks):.3f} s "
            f"(goal p95 < 1 s); failed ticks {len(t.tick_errors)}" if ticks else "ticks: none",
            f"tick parts, p50/p95 s: {parts}",
            f"live runs vs target over the steady phase ({len(steady)} samples every {SAMPLE_S:g} s): median absolute "
            f"deviation {fmt(sampled)} of target (goal <= 5 %); "
            f"median live {statistics.median(steady) if steady else 'n/a'}"
            f"; as found by each tick {fmt(at_tick)}, right after each tick {fmt(after)}",
            f"flow runs created: {t.flow_runs}; database size {self.database_bytes / 1e6:.1f} MB",
        ]


def _p95(ordered: list[float]) -> float:
    return ordered[min(len(ordered) - 1, int(round(0.95 * (len(ordered) - 1))))] if ordered else float("nan")


def _in(trace: CampaignTrace, at: float) -> bool:
    if trace.steady_from is None:
        return False
    return trace.steady_from <= at <= (trace.steady_until if trace.steady_until is not None else float("inf"))


CGROUP_V1_CPU = Path("/sys/fs/cgroup/cpu")
CGROUP_V2 = Path("/sys/fs/cgroup")
CGROUP_NAME = "hopflow-campaign-compute"


def compute_cgroup(share: float) -> Path | None:
    """A CPU cgroup whose weight is `share` of the default, for the worker and its flow runs; None when `share` is 0 or
    no cgroup can be made here (then everything shares the CPU, as the report says).

    Why a cgroup and not `nice`: Prefect's runner starts each flow run in a session of its own, and with the kernel's
    autogroup scheduling every session competes at full weight, whatever its nice value."""
    if share <= 0:
        return None
    try:
        if (CGROUP_V1_CPU / "cpu.shares").is_file():
            group = CGROUP_V1_CPU / CGROUP_NAME
            group.mkdir(exist_ok=True)
            (group / "cpu.shares").write_text(str(max(2, round(1024 * share))))
            return group
        if "cpu" in (CGROUP_V2 / "cgroup.controllers").read_text().split():
            group = CGROUP_V2 / CGROUP_NAME
            group.mkdir(exist_ok=True)
            (group / "cpu.weight").write_text(str(max(1, round(100 * share))))
            return group
    except OSError as exc:
        print(f"[campaign] no CPU cgroup ({exc}); flow runs share the CPU with the controller", flush=True)
    return None


def remove_cgroup(group: Path) -> None:
    """SIGKILL what is left in the cgroup, then remove it."""
    import signal

    for _ in range(20):
        pids = [int(p) for p in (group / "cgroup.procs").read_text().split()]
        if not pids:
            break
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.5)
    try:
        group.rmdir()
    except OSError as exc:
        print(f"[campaign] could not remove {group}: {exc}", flush=True)


def add_items(engine: Engine, n: int, sleep_ms: float) -> None:
    from hopflow.db import session_scope
    from hopflow.models import SyntheticItem

    rows = [{"cpu_ms": 0.0, "sleep_ms": sleep_ms, "failure": "none", "fail_attempts": 0, "priority": float(i)}
            for i in range(n)]
    with session_scope(engine, write=True) as session:
        for start in range(0, n, 5000):
            session.execute(insert(SyntheticItem), rows[start:start + 5000])


def counts(engine: Engine) -> dict[str, int]:
    from hopflow import queue
    from hopflow.db import session_scope

    with session_scope(engine) as session:
        return queue.counts_by_state(session).get(STAGE, {})


def run_campaign(engine: Engine, client: Any, config: CampaignConfig, workdir: Path) -> CampaignReport:
    """Drive the campaign to the last item; sample live runs every second."""
    from benchmarks.chaos import DEPLOYMENT
    from hopflow import queue
    from hopflow.db import session_scope
    from hopflow.deployments.bootstrap import POOL_NAME
    from hopflow.flows.controller import tick
    from hopflow.flows.submission import count_live
    from hopflow.models import RunState
    from hopflow.registry import get_stage

    from prefect_helpers import delete_waiting_runs, deploy_stage, start_worker, stop_process_group, wait_for_worker

    url = engine.url.render_as_string(hide_password=False)
    add_items(engine, config.items, config.sleep_ms)
    with session_scope(engine, write=True) as session:
        queue.set_target(session, get_stage(STAGE), config.target, "campaign benchmark")
    deployment = deploy_stage(client, DEPLOYMENT)
    env = {"HOPFLOW_DATABASE_URL": url, "HOPFLOW_HOME": str(workdir / "home"), "HOPFLOW_PROFILE_SYNTHETIC":
           config.profile, "HOPFLOW_MAX_CHUNKS": str(config.max_chunks), "PREFECT_WORKER_QUERY_SECONDS": "1",
           "PREFECT_WORKER_PREFETCH_SECONDS": "1"}
    since = time.time()
    cgroup = compute_cgroup(config.compute_share)
    worker = start_worker(POOL_NAME, env, workdir / "worker.log", cgroup=cgroup)
    trace = CampaignTrace(compute_cgroup=str(cgroup) if cgroup else None)
    try:
        wait_for_worker(client, POOL_NAME, since)
        started = time.monotonic()
        next_tick = started
        last_progress = started
        while True:
            now = time.monotonic()
            if now - started > DRAIN_TIMEOUT_S:
                raise RuntimeError(f"campaign not drained after {DRAIN_TIMEOUT_S:.0f} s; see {workdir}")
            by_state = counts(engine)
            if by_state.get(RunState.DONE, 0) + by_state.get(RunState.FAILED, 0) >= config.items:
                break
            if now >= next_tick:
                next_tick += config.tick_interval_s
                try:
                    report = tick(client, engine=engine, stages=[STAGE], batch_sizes={STAGE: config.batch_size},
                                  mirror=False, publish=False)
                except Exception as exc:  # noqa: BLE001
                    trace.tick_errors.append(f"{type(exc).__name__}: {exc}")
                    continue
                (stage_tick,) = report.stages
                trace.tick_seconds.append(report.seconds)
                trace.tick_phases.append(dict(report.phases))
                trace.flow_runs += report.submitted
                at = time.monotonic() - started
                live_after = count_live(client, deployment.id)
                trace.tick_at.append(at)
                trace.live_at_tick.append(stage_tick.live)
                trace.live_after_tick.append(live_after)
                trace.samples.append((at, live_after, counts(engine).get(RunState.QUEUED, 0)))
                if trace.steady_from is None and live_after >= config.target:
                    trace.steady_from = at
            else:
                at = time.monotonic() - started
                trace.samples.append((at, count_live(client, deployment.id), by_state.get(RunState.QUEUED, 0)))
            if trace.steady_from is not None and trace.steady_until is None \
                    and trace.samples[-1][2] < config.target * config.batch_size:
                trace.steady_until = trace.samples[-1][0]
            if now - last_progress >= PROGRESS_EVERY_S:
                last_progress = now
                print(f"[campaign] {now - started:5.0f} s: {by_state}; live {trace.samples[-1][1]}", flush=True)
            time.sleep(max(0.0, min(SAMPLE_S - (time.monotonic() - now), next_tick - time.monotonic())))
        seconds = time.monotonic() - started
    finally:
        stop_process_group(worker)
        if cgroup is not None:
            remove_cgroup(cgroup)  # also ends flow-run processes left in it (each runs in a session of its own)
        delete_waiting_runs(client, deployment.id)
    with engine.connect() as conn:
        size = int(conn.execute(text("SELECT pg_database_size(current_database())")).scalar() or 0) \
            if engine.dialect.name == "postgresql" else 0
    done = counts(engine).get(RunState.DONE, 0)
    return CampaignReport(config, seconds, done, trace, size)


def main(argv: list[str] | None = None) -> int:
    defaults = CampaignConfig()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=defaults.items)
    parser.add_argument("--sleep-ms", type=float, default=defaults.sleep_ms)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--target", type=int, default=defaults.target)
    parser.add_argument("--tick-interval", type=float, default=defaults.tick_interval_s)
    parser.add_argument("--profile", default=defaults.profile, help="Dask cluster profile of the synthetic flow runs")
    parser.add_argument("--compute-share", type=float, default=defaults.compute_share,
                        help="CPU weight of the worker and its flow runs against the rest (a cpu cgroup; 0: no "
                        "cgroup). They stand in for compute nodes; unweighted they starve the controller and the "
                        "Prefect server, "
                        "which a real campaign runs on a host of their own")
    parser.add_argument("--database-url", default=None, help="an empty PostgreSQL database (default: a fresh one on "
                        "the HOPFLOW_TEST_POSTGRES_URL server, dropped at the end)")
    args = parser.parse_args(argv)
    config = CampaignConfig(items=args.items, sleep_ms=args.sleep_ms, batch_size=args.batch_size, target=args.target,
                            tick_interval_s=args.tick_interval, profile=args.profile,
                            compute_share=args.compute_share)
    from prefect.client.orchestration import get_client

    from benchmarks.chaos import benchmark_database

    with benchmark_database(parser, args.database_url, "hopflow-campaign-") as (engine, workdir):
        with get_client(sync_client=True) as client:
            report = run_campaign(engine, client, config, workdir)
        for line in report.lines():
            print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
