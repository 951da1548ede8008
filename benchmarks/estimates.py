"""mlip-idpp seconds per pathway over the bundled set's top pathways: hopflow's batch mode against a plain loop.

Run from the repository root: `python -m benchmarks.estimates [--top 10]` (as a script, benchmarks/queue.py would
shadow the standard library queue) (uses a fresh HOPFLOW_HOME under /tmp unless one is set).
Batch mode = `hopflow run estimates --top N` (queue claim, Prefect flow, local Dask cluster, one CHGNet per worker);
the baseline = the same hop_images + compute_barrier calls in a loop in this process. Start-up (model load, cluster)
is reported on its own.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--top", type=int, default=10, help="Pathways to estimate (the stage's default ranker).")
    args = parser.parse_args()
    os.environ.setdefault("HOPFLOW_HOME", tempfile.mkdtemp(prefix="hopflow-bench-estimates-"))
    os.environ.pop("HOPFLOW_DATABASE_URL", None)

    from sqlalchemy import select

    from hopflow.db import init_db, session_scope
    from hopflow.flows.batch import import_raw_inputs, run_batch
    from hopflow.flows.estimates import relaxed_pathway_barrier
    from hopflow.models import Estimate, Run
    from hopflow.queue import stage_parameters
    from hopflow.registry import get_stage
    from hopflow.settings import get_settings
    from hopflow.tasks.engines.potentials import calculator, pick_device
    from hopflow.tasks.structures import bundled_inputs

    init_db()
    t = time.perf_counter()
    import_raw_inputs(bundled_inputs())
    for stage in ("pathways", "features"):
        print(run_batch(stage).summary)
    print(f"set-up (import, pathways, features): {time.perf_counter() - t:.1f} s")

    t0 = time.perf_counter()
    report = run_batch("estimates", limit=args.top)
    batch_wall = time.perf_counter() - t0
    print(report.summary)
    with session_scope() as session:
        rows = session.execute(select(Estimate, Run.parameters).join(Run, Run.id == Estimate.run_id)
                               .order_by(Estimate.id)).all()
        ids = [e.pathway_id for e, _ in rows]
        compute = [sum(v for v in e.timings.values() if v is not None) for e, _ in rows]
        items = get_stage("estimates").load(session, ids)  # with the vacancies the batch relaxed
    n = len(rows)
    if not n:
        raise SystemExit("no estimates were stored")
    params = stage_parameters(get_stage("estimates"))

    t = time.perf_counter()
    calculator(get_settings().barrier_model, pick_device(None))
    model_s = time.perf_counter() - t
    t = time.perf_counter()
    for pid in ids:
        relaxed_pathway_barrier("estimates-baseline", items[pid], params)
    loop_s = time.perf_counter() - t

    print(f"\nmlip-idpp over the top {n} bundled pathways (ranker {get_stage('estimates').default_ranker}), "
          f"{os.cpu_count()} CPU cores, device {pick_device(None)}")
    print(f"  batch mode:  {batch_wall / n:.2f} s/pathway wall ({batch_wall:.1f} s, incl. cluster start and one "
          f"model load per worker); engine time in workers {sum(compute) / n:.2f} s/pathway")
    print(f"  baseline:    {loop_s / n:.2f} s/pathway ({loop_s:.1f} s in one process); model load {model_s:.1f} s "
          "reported apart")
    print(
        f"  ratio batch/baseline (wall per pathway): {batch_wall / loop_s:.2f}; "
        f"start-up of batch mode ~ {max(0.0, batch_wall - sum(compute) / 2):.1f} s (wall minus engine time / 2 workers)"
    )
    print(f"  home: {Path(os.environ['HOPFLOW_HOME'])}")


if __name__ == "__main__":
    main()
