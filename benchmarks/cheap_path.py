"""The cheap path in core-seconds per pathway: pathways → features → relaxed vacancies → mlip-idpp estimates over
bundled structures, hopflow's batch mode against a plain 2-process pool over the very same functions, interleaved.

    python -m benchmarks.cheap_path [--rounds 3] [--structures CaF2 KMgF3 …] [--all] [--controller]

Each round runs the pool, then hopflow, each in a fresh child process on a fresh HOPFLOW_HOME (nothing cached from a
round before: no database rows, no loaded model, no relaxed bulk). Per stage the child measures the CPU time of its
whole process tree (itself, the pool's or Dask's worker processes, the temporary Prefect server; terminated children
included), start-up excluded: the pool's start is its two processes importing the task modules; hopflow's is what
`hopflow screen` starts once for all its stages (the temporary Prefect server, the shared local Dask cluster whose
two workers and their item processes import the stage modules and the ML potential's libraries).
Both sides claim, read their inputs from and write their results to the database through the same queue functions
(timed on both sides), and both find the vacancy sites of the estimates' pathways in their estimates stage (the flow
does, in its own process), so what the ratio measures is Prefect's flow and task runs and Dask against a plain pool;
the number of items each stage computed is asserted equal in every round and on both sides. Worker processes on both
sides run torch and BLAS with one thread (what Dask's nanny sets for its workers), and the pool's processes start with
the allocator settings of hopflow's item processes (`HOPFLOW_ITEM_GLIBC_TUNABLES`).

`--controller` adds a third side: each stage as the controller's flow runs make it without a standing cluster
(`hopflow cluster`), `batch_size` claimed items per flow run, each on a Dask cluster of its own, whose start-up counts
(it is paid per flow run).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hopflow.engines import POTENTIAL_MODULES

STAGES = ("pathways", "features", "vacancies", "estimates")
SIDES = ("pool", "hopflow", "controller")
DEFAULT_STRUCTURES = ("CaF2", "LiF", "KMgF3", "PbClF")
"""Small cells (vacancy supercells of 64-96 atoms), a binary, a ternary and a mixed-anion layered one: three rounds
on both sides fit in well under an hour on 2 cores. `--all` takes the whole bundled set."""
MOONSHOT_CORE_S = 15.0
"""The DDI-scale goal: about 30,000 pathways through the cheap path in an hour on one 128-core node."""
SINGLE_THREAD_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
TASKS = {
    "pathways": ("hopflow.flows.pathways", "find_structure_pathways"),
    "features": ("hopflow.flows.features", "featurize_pathway"),
    "vacancies": ("hopflow.flows.vacancies", "relax_vacancy_site"),
    "estimates": ("hopflow.flows.estimates", "estimate_barrier"),
}


def tree_cpu_seconds() -> float:
    """User + system CPU seconds of this process and every descendant, live or terminated and waited for."""
    import psutil

    me = psutil.Process()
    total = sum(me.cpu_times()[:4])
    for child in me.children(recursive=True):
        try:
            total += sum(child.cpu_times()[:4])  # a live child's own reaped children are in its children_* fields
        except psutil.Error:
            pass
    return total


def measured(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = tree_cpu_seconds()
    value = fn()
    return tree_cpu_seconds() - start, value


# ---------------------------------------------------------------- the child: one side of one round


def _setup(home: str, structures: Sequence[str] | None) -> None:
    os.environ["HOPFLOW_HOME"] = home
    os.environ.pop("HOPFLOW_DATABASE_URL", None)
    from hopflow.db import init_db
    from hopflow.flows.batch import import_raw_inputs
    from hopflow.tasks.structures import bundled_inputs

    init_db()
    inputs = bundled_inputs()
    if structures:
        wanted = set(structures)
        inputs = [raw for raw in inputs if raw.location in wanted]
        if len(inputs) != len(wanted):
            raise SystemExit(f"bundled entries {sorted(wanted)}: found {[r.location for r in inputs]}")
    import_raw_inputs(inputs)


def store_vacancy_sites() -> int:
    """Store the vacancy sites every eligible estimates pathway needs, as the estimates flow would before it relaxes
    them (the claim it makes for that is given back)."""
    from hopflow import queue
    from hopflow.db import session_scope
    from hopflow.flows.estimates import needed_vacancies
    from hopflow.queue import param_hash
    from hopflow.registry import get_stage
    from hopflow.stages.pathways import lattice_parameters
    from hopflow.vacancies import ensure_sites

    claimed = queue.claim("estimates", 1_000_000, refresh=True)
    stage = get_stage("estimates")
    with session_scope() as session:
        runs = queue.runs(session, [c.id for c in claimed])
        payloads = stage.load(session, [r.input_id for r in runs])
    groups: dict[str, tuple[Any, list[dict[str, Any]]]] = {}
    for run in runs:
        params = stage.params.from_mapping(run.parameters)
        groups.setdefault(param_hash(run.parameters), (params, []))[1].append(payloads[run.input_id])
    stored = 0
    with session_scope(write=True) as session:
        for params, items in groups.values():
            rows = needed_vacancies.fn(items, params)
            lattices = {item["structure_id"]: lattice_parameters(item["structure"]) for item in items}
            stored += len(ensure_sites(session, rows, lattices))
        queue.release(session, [c.id for c in claimed])
    return stored


def _single_thread() -> None:
    import torch

    torch.set_num_threads(1)
    for module in (*(module for module, _ in TASKS.values()), *POTENTIAL_MODULES):  # as hopflow's warm-up does
        __import__(module)


def _pid_after(seconds: float) -> int:
    import time

    time.sleep(seconds)
    return os.getpid()


def _wait_for_both(pool: ProcessPoolExecutor) -> None:
    """Until both processes answered: each has then run its initializer (imports) before any stage is timed."""
    while len(set(pool.map(_pid_after, [0.2, 0.2]))) < 2:
        pass


def _call(stage: str, item: Any, parameters: dict[str, Any]) -> Any:
    import importlib

    from hopflow.registry import get_stage

    module, name = TASKS[stage]
    try:
        params = get_stage(stage).params.from_mapping(parameters)
        return getattr(importlib.import_module(module), name).fn(item, params)
    except Exception as exc:  # noqa: BLE001  (recorded against the item, as the stage runner does)
        return exc


def pool_stage(pool: ProcessPoolExecutor, stage_name: str) -> tuple[float, int]:
    """CPU seconds of the pool over every eligible item of a stage (claim, load, map, store: the claim as batch mode's
    `claim_all` makes it); items done."""
    from hopflow import queue
    from hopflow.db import session_scope
    from hopflow.errors import is_retryable
    from hopflow.registry import get_stage

    stage = get_stage(stage_name)

    def claim_load_map_store() -> int:
        claimed = queue.claim(stage_name, 1_000_000, refresh=True)
        with session_scope(write=True) as session:
            runs = queue.start(session, [c.id for c in claimed])
            payloads = stage.load(session, [r.input_id for r in runs])
        runs = [r for r in runs if r.input_id in payloads]
        results = pool.map(_call, [stage_name] * len(runs), [payloads[r.input_id] for r in runs],
                           [r.parameters for r in runs])
        done = 0
        for run, result in zip(runs, results, strict=True):
            with session_scope(write=True) as session:
                if isinstance(result, BaseException):
                    queue.fail(session, run.id, f"{type(result).__name__}: {result}", retryable=is_retryable(result))
                else:
                    done += queue.complete(session, run.id, result)
        return done

    return measured(claim_load_map_store)


def pool_estimates(pool: ProcessPoolExecutor) -> tuple[float, int]:
    """The pool's estimates stage as the estimates flow does it: the vacancy sites its pathways need found first (in
    this process, as the flow does in its own), then the map."""
    search_cpu, _ = measured(store_vacancy_sites)
    cpu, done = pool_stage(pool, "estimates")
    return search_cpu + cpu, done


def controller_stage(stage_name: str) -> tuple[float, int]:
    """CPU seconds of the stage as controller flow runs do it without a standing cluster: `batch_size` claimed items
    per flow run, each flow run on a Dask cluster of its own (started, its workers importing the flow module and
    their item processes the libraries and the model, then closed); items done."""
    from hopflow import queue
    from hopflow.db import session_scope
    from hopflow.flows.batch import stage_flow
    from hopflow.flows.common import stage_task_runner
    from hopflow.registry import get_stage

    flow_fn = stage_flow(stage_name).with_options(task_runner=stage_task_runner(stage_name))
    size = get_stage(stage_name).batch_size

    def flow_runs() -> int:
        done, seen = 0, set()
        while claimed := [c.id for c in queue.claim(stage_name, size, refresh=True)]:
            if seen.issuperset(claimed):  # retries of failures: the pool side makes one attempt per item
                with session_scope(write=True) as session:
                    queue.release(session, claimed)
                break
            seen.update(claimed)
            done += len(flow_fn(run_ids=claimed).done)
        return done

    return measured(flow_runs)


def hopflow_stage(stage_name: str) -> tuple[float, int]:
    """CPU seconds of `hopflow run STAGE`'s batch mode (one flow run, the stage's local Dask profile); items done."""
    from hopflow.flows.batch import run_batch

    cpu, report = measured(lambda: run_batch(stage_name))
    return cpu, len(report.done)


def child(side: str, home: str, structures: Sequence[str] | None, stages: Sequence[str] = STAGES) -> dict[str, Any]:
    os.environ.update(SINGLE_THREAD_ENV)
    _setup(home, structures)
    out: dict[str, Any] = {"side": side, "stages": {}}
    if side == "pool":
        import multiprocessing

        from hopflow.isolation import allocator_environment

        os.environ.update(allocator_environment())  # the pool's processes start as hopflow's item processes do
        startup, pool = measured(lambda: ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn"),
                                                             initializer=_single_thread))
        startup += measured(lambda: _wait_for_both(pool))[0]
        run: Callable[[str], tuple[float, int]] = (  # noqa: E731
            lambda s: pool_estimates(pool) if s == "estimates" else pool_stage(pool, s))
    else:
        import importlib

        from hopflow.flows.common import batch_clusters, share_temporary_server, stage_module

        clusters = batch_clusters(stages if side == "hopflow" else [])  # hopflow: as `hopflow screen`, one cluster

        def start() -> None:
            clusters.__enter__()
            share_temporary_server()
            for stage in stages:  # the flow modules, as the pool's processes import the task modules
                importlib.import_module(stage_module(stage))

        startup, _ = measured(start)
        run = hopflow_stage if side == "hopflow" else controller_stage
    out["startup_cpu_s"] = startup
    from hopflow.flows.estimates import _vacancy_symmetry

    for stage in stages:
        if stage == "vacancies":
            out["vacancy_sites"] = store_vacancy_sites()
        if stage == "estimates":
            _vacancy_symmetry.cache_clear()  # both sides find the vacancy sites again, as the estimates flow does
        cpu, n = run(stage)
        out["stages"][stage] = {"cpu_s": cpu, "items": n}
    if side != "pool":
        clusters.__exit__(None, None, None)
    from sqlalchemy import func, select

    from hopflow.db import session_scope
    from hopflow.models import Estimate, Pathway

    with session_scope() as session:
        out["pathways"] = session.scalar(select(func.count(Pathway.id)))
        out["estimates_ok"] = session.scalar(select(func.count(Estimate.id)).where(Estimate.flag == "ok"))
    if side == "pool":
        pool.shutdown()
    return out


# ---------------------------------------------------------------- the parent: interleaved rounds


@dataclass
class Figures:
    cpu: dict[str, dict[str, list[float]]]
    items: dict[str, set[tuple[int, ...]]]


def _run_child(side: str, structures: Sequence[str] | None, stages: Sequence[str]) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix=f"hopflow-cheap-{side}-") as home:
        args = [sys.executable, "-m", "benchmarks.cheap_path", "--child", side, "--home", home]
        args += ["--structures", *structures] if structures else ["--all"]
        args += ["--stages", *stages]
        env = os.environ | {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PYTHONWARNINGS": "ignore"}
        proc = subprocess.run(args, capture_output=True, text=True, env=env,
                              cwd=Path(__file__).resolve().parent.parent, check=False)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
        if proc.returncode != 0 or not lines:
            sys.stderr.write(proc.stderr[-4000:])
            raise SystemExit(f"{side} child failed with exit {proc.returncode}")
        return json.loads(lines[-1])


def _spread(values: Sequence[float]) -> str:
    return f"{statistics.median(values):7.2f} [{min(values):.2f}-{max(values):.2f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="Rounds of (pool, hopflow); at least 3 for the figures.")
    parser.add_argument("--structures", nargs="*", default=None, help="Bundled entries by name (default: "
                        + " ".join(DEFAULT_STRUCTURES) + ").")
    parser.add_argument("--all", action="store_true", help="The whole bundled set.")
    parser.add_argument("--stages", nargs="*", choices=STAGES, default=list(STAGES),
                        help="The first stages of the path (default: all four), e.g. --all --stages pathways features.")
    parser.add_argument("--controller", action="store_true", help="A third side: each stage as the controller's flow "
                        "runs, batch_size items each, each on a cluster of its own (no `hopflow cluster`).")
    parser.add_argument("--child", choices=SIDES, help=argparse.SUPPRESS)
    parser.add_argument("--home", help=argparse.SUPPRESS)
    args = parser.parse_args()
    structures = None if args.all else (args.structures or list(DEFAULT_STRUCTURES))
    stages = [s for s in STAGES if s in args.stages]
    if stages != list(STAGES[:len(stages)]):
        parser.error(f"--stages takes the first stages of the path in order, not {args.stages}")
    if args.child:
        print(json.dumps(child(args.child, args.home, structures, stages)))
        return

    sides = SIDES if args.controller else SIDES[:2]
    cpu: dict[str, dict[str, list[float]]] = {side: {s: [] for s in (*stages, "total")} for side in sides}
    counts: set[tuple[int, ...]] = set()
    npaths = 0
    for r in range(args.rounds):
        for side in sides:
            out = _run_child(side, structures, stages)
            npaths = out["pathways"]
            items = tuple(out["stages"][s]["items"] for s in stages) + (out["pathways"], out["estimates_ok"])
            counts.add(items)
            for s in stages:
                cpu[side][s].append(out["stages"][s]["cpu_s"] / npaths)
            cpu[side]["total"].append(sum(out["stages"][s]["cpu_s"] for s in stages) / npaths)
            print(f"round {r + 1} {side:10}: " + ", ".join(f"{s} {out['stages'][s]['cpu_s']:.1f} s "
                  f"({out['stages'][s]['items']} items)" for s in stages)
                  + f"; start-up {out['startup_cpu_s']:.1f} s; {npaths} pathways, {out['estimates_ok']} ok",
                  flush=True)
    assert len(counts) == 1, f"the rounds computed different numbers of items: {sorted(counts)}"

    label = "the whole bundled set" if structures is None else ", ".join(structures)
    print(f"\ncheap path, core-seconds per pathway ({npaths} pathways of {label}; {args.rounds} interleaved rounds; "
          f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}); median [min-max]")
    print(f"  {'stage':10} " + " ".join(f"{side:>22}" for side in sides)
          + "".join(f" {side + '/pool':>16}" for side in sides[1:]))
    for s in (*stages, "total"):
        ratios = [statistics.median(cpu[side][s]) / max(statistics.median(cpu["pool"][s]), 1e-9) for side in sides[1:]]
        print(f"  {s:10} " + " ".join(f"{_spread(cpu[side][s]):>22}" for side in sides)
              + "".join(f" {ratio:15.2f}x" for ratio in ratios))
    total = statistics.median(cpu["hopflow"]["total"])
    if len(stages) < len(STAGES):
        print(f"  (the first {len(stages)} stages only: no moonshot figure)")
        return
    print(f"  moonshot: {MOONSHOT_CORE_S:.0f} core-s per pathway; hopflow's total is {total:.1f} "
          f"({total / MOONSHOT_CORE_S:.2f}x the goal)")


if __name__ == "__main__":
    main()
