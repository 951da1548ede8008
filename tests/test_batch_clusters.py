"""Batch mode's shared Dask cluster: one local cluster for all the stage flows of a command, its workers with the
stage modules preloaded, one thread per math library and glibc's own memory trimming (not Dask's fixed threshold)."""

from __future__ import annotations

import os
import sys

from distributed import Client
from sqlalchemy import func, select

from hopflow.db import init_db, session_scope
from hopflow.flows.batch import import_raw_inputs, run_batch
from hopflow.flows.common import batch_clusters, batch_flow
from hopflow.flows.features import features
from hopflow.models import Features, Pathway
from hopflow.settings import get_settings
from hopflow.tasks.structures import bundled_inputs


def _worker_facts() -> tuple[int, dict[str, str | None], bool, bool]:
    return (os.getpid(), {k: os.environ.get(k) for k in ("MALLOC_TRIM_THRESHOLD_", "OMP_NUM_THREADS")},
            "hopflow.flows.features" in sys.modules, "torch" in sys.modules)


def test_stage_flows_of_one_command_share_one_preloaded_cluster(monkeypatch) -> None:
    monkeypatch.setenv("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    monkeypatch.delenv("HOPFLOW_DASK_PROFILE", raising=False)
    get_settings.cache_clear()
    init_db()
    import_raw_inputs([r for r in bundled_inputs() if r.location == "CaF2"])
    assert batch_flow("features", features) is features  # no shared cluster: the flow's own task runner
    with batch_clusters(["pathways", "features"]) as clusters:
        [address] = clusters.values()  # both stages use the `local` profile: one cluster
        shared = batch_flow("features", features)
        assert shared is not features and shared.task_runner.address == address
        with Client(address) as client:
            facts = client.run(_worker_facts)
        assert len(facts) == 2
        for pid, environ, preloaded, torch_loaded in facts.values():
            assert pid != os.getpid()  # worker processes, not threads of this one
            assert environ == {"MALLOC_TRIM_THRESHOLD_": None, "OMP_NUM_THREADS": "1"}
            assert preloaded and not torch_loaded  # the stage modules, and nothing heavier than they need
        assert len(run_batch("pathways").done) == 1
        assert len(run_batch("features").done) == 1
        with Client(address) as client:
            assert {pid for pid, *_ in client.run(_worker_facts).values()} == {pid for pid, *_ in facts.values()}
    assert batch_flow("features", features) is features  # the cluster is gone with the block
    with session_scope() as session:
        assert session.scalar(select(func.count()).select_from(Pathway)) == 1
        assert session.scalar(select(func.count()).select_from(Features)) == 1


def _item_process_facts() -> tuple[int | None, bool, bool]:
    from hopflow.isolation import borrowed_item_process

    with borrowed_item_process() as process:
        warm_pid = process.pid
        in_child = process.run(eval, ("'torch' in __import__('sys').modules",), 120)
        return (warm_pid if warm_pid == process.pid else None), in_child, "torch" in sys.modules


def test_item_processes_of_a_potential_stage_import_the_potential_while_the_command_starts(monkeypatch) -> None:
    monkeypatch.setenv("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    monkeypatch.delenv("HOPFLOW_DASK_PROFILE", raising=False)
    get_settings.cache_clear()
    with batch_clusters(["vacancies"]) as clusters:
        [address] = clusters.values()
        with Client(address) as client:
            facts = client.run(_item_process_facts)
    assert len(facts) == 2
    for warm_pid, torch_in_item_process, torch_in_worker in facts.values():
        assert warm_pid is not None  # the item process started at warm-up ran the call: no fresh one
        assert torch_in_item_process and not torch_in_worker  # the worker itself runs no item: it needs no torch
