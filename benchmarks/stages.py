"""Pathways + features for the bundled set: hopflow's batch mode (Prefect flow on the local Dask profile) against a
2-process pool over the same pymatgen/matminer calls, in one run on the same cores. Start-up is reported apart:
for hopflow it is the wall time of the same flow on an empty batch (flow-run creation, Dask cluster up and down);
for the pool, starting its two processes. Run: `python benchmarks/stages.py`."""

from __future__ import annotations

import sys
from pathlib import Path

# benchmarks/queue.py would shadow the standard library's `queue` for a script run from this folder.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import os  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from concurrent.futures import ProcessPoolExecutor  # noqa: E402
from typing import Any  # noqa: E402

from sqlalchemy import select  # noqa: E402


def _setup_home(home: str) -> None:
    os.environ["HOPFLOW_HOME"] = home
    os.environ.pop("HOPFLOW_DATABASE_URL", None)
    from hopflow.db import get_engine
    from hopflow.settings import get_settings

    get_settings.cache_clear()
    get_engine.cache_clear()


def _payloads(stage_name: str) -> tuple[list[Any], Any]:
    """Every input item of a stage as its flow's task receives it, and the stage's parameters."""
    from hopflow import queue
    from hopflow.db import session_scope
    from hopflow.registry import get_stage

    stage = get_stage(stage_name)
    with session_scope() as session:
        ids = list(session.scalars(select(stage.inputs().subquery().c.item_id)))
        payloads = stage.load(session, ids)
    return [payloads[i] for i in sorted(payloads)], stage.params.from_mapping(queue.stage_parameters(stage))


def _noop(_: int) -> int:
    return 0


def run_pool(home: str) -> tuple[float, float, float, int]:
    """(start-up, pathways, features) seconds and pathway count with a 2-process pool over the tasks' functions."""
    _setup_home(home)
    structures, p_params = _payloads("pathways")
    t0 = time.perf_counter()
    with ProcessPoolExecutor(max_workers=2) as pool:
        list(pool.map(_noop, range(2)))
        startup = time.perf_counter() - t0
        t1 = time.perf_counter()
        found = list(
            pool.map(
                _safe,
                [("hopflow.flows.pathways", "find_structure_pathways")] * len(structures),
                structures,
                [p_params] * len(structures),
            )
        )
        pathways_s = time.perf_counter() - t1
        # the features inputs: the hopflow run stored the same pathways, read them as the features flow does
        items, f_params = _payloads("features")
        t2 = time.perf_counter()
        list(
            pool.map(
                _safe, [("hopflow.flows.features", "featurize_pathway")] * len(items), items, [f_params] * len(items)
            )
        )
        features_s = time.perf_counter() - t2
    return startup, pathways_s, features_s, sum(len(r) for r in found if isinstance(r, list))


def _safe(task_path: tuple[str, str], item: Any, params: Any) -> Any:
    """Call a flow task's plain function (named by module and attribute: stdlib pickle cannot ship Prefect tasks)."""
    import importlib

    try:
        return getattr(importlib.import_module(task_path[0]), task_path[1]).fn(item, params)
    except Exception as exc:  # noqa: BLE001  (the stage records item errors and goes on; so does the baseline)
        return exc


def run_hopflow(home: str) -> tuple[float, float, float, int]:
    """(start-up, pathways, features) seconds and pathway count through hopflow's batch mode."""
    from hopflow.db import session_scope
    from hopflow.flows.features import features
    from hopflow.flows.pathways import pathways
    from hopflow.models import Pathway

    _setup_home(home)
    t0 = time.perf_counter()
    pathways(run_ids=[])
    startup = time.perf_counter() - t0
    t1 = time.perf_counter()
    pathways(run_ids=None)
    pathways_s = time.perf_counter() - t1 - startup
    t2 = time.perf_counter()
    features(run_ids=None)
    features_s = time.perf_counter() - t2 - startup
    with session_scope() as session:
        count = len(list(session.scalars(select(Pathway.id))))
    return startup, pathways_s, features_s, count


def main() -> None:
    import logging

    logging.getLogger("distributed").setLevel(logging.WARNING)
    from hopflow.db import init_db
    from hopflow.flows.batch import import_raw_inputs
    from hopflow.tasks.structures import bundled_inputs

    with tempfile.TemporaryDirectory() as home:
        _setup_home(home)
        init_db()
        import_raw_inputs(bundled_inputs())
        h_start, h_paths, h_feats, n_h = run_hopflow(home)
        p_start, p_paths, p_feats, n_p = run_pool(home)
    h_total, p_total = h_paths + h_feats, p_paths + p_feats
    print(f"stages benchmark: bundled set, {n_h} pathways (pool found {n_p}); machine: {os.cpu_count()} cores")
    print(f"  hopflow batch mode : start-up {h_start:6.1f} s, pathways {h_paths:6.1f} s, features {h_feats:6.1f} s")
    print(f"  2-process pool     : start-up {p_start:6.1f} s, pathways {p_paths:6.1f} s, features {p_feats:6.1f} s")
    print(f"  hopflow / pool, start-up excluded: {h_total / p_total:.2f}x (goal <= 1.2x)")


if __name__ == "__main__":
    main()
