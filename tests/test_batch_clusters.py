"""Batch mode's shared Dask cluster: one local cluster for all the stage flows of a command, its workers with the
stage modules preloaded, one thread per math library and glibc's own memory trimming (not Dask's fixed threshold)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from distributed import Client
from sqlalchemy import func, insert, select

from hopflow import queue
from hopflow.db import init_db, session_scope
from hopflow.flows.batch import import_raw_inputs, run_batch
from hopflow.flows.common import batch_clusters, batch_flow, stage_task_runner
from hopflow.flows.features import features
from hopflow.models import Features, Pathway, SyntheticItem
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


def _served(dask_worker) -> tuple[int, int | None, int]:
    from hopflow.isolation import borrowed_item_process

    with borrowed_item_process() as process:
        return dask_worker.state.executed_count, process.pid, process.started


def test_flow_runs_on_a_profile_with_a_standing_cluster_share_its_workers_and_item_processes(monkeypatch) -> None:
    """Controller-style flow runs (claimed items, the stage's own task runner) connect to the standing cluster named
    in HOPFLOW_DASK_ADDRESSES: their chunks run on its workers, whose warm item processes serve both runs unrestarted
    (nothing imported or loaded twice), instead of a cluster started per flow run."""
    from hopflow.flows.synthetic import synthetic

    monkeypatch.setenv("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    monkeypatch.delenv("HOPFLOW_DASK_PROFILE", raising=False)
    monkeypatch.setenv("HOPFLOW_TIME_LIMITS", '{"synthetic": 60}')
    get_settings.cache_clear()
    init_db()
    with batch_clusters(["synthetic"]) as clusters:  # what `hopflow cluster synthetic` serves
        [(profile, address)] = clusters.items()
        monkeypatch.setenv("HOPFLOW_DASK_ADDRESSES", json.dumps({profile: address}))
        get_settings.cache_clear()
        with Client(address) as client:
            before = client.run(_served)
            for _ in range(2):
                with session_scope(write=True) as session:
                    session.execute(insert(SyntheticItem), [{"cpu_ms": 1.0, "sleep_ms": 0.0, "failure": "none",
                                                            "fail_attempts": 1, "priority": 0.0}] * 4)
                claimed = queue.claim("synthetic", 10, refresh=True)
                runner = stage_task_runner("synthetic")
                assert runner.address == address
                report = synthetic.with_options(task_runner=runner)(run_ids=[c.id for c in claimed])
                assert len(report.done) == 4
            after = client.run(_served)
    assert after.keys() == before.keys()
    assert sum(after[w][0] - before[w][0] for w in after) >= 2  # the chunks of both flow runs ran on its workers
    for worker, (_, pid, started) in after.items():
        assert pid is not None and pid == before[worker][1] and started == 1


def test_hopflow_cluster_serves_until_interrupted(tmp_path) -> None:
    env = {**os.environ, "HOPFLOW_HOME": str(tmp_path), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("HOPFLOW_DASK_ADDRESSES", None)
    command = [str(Path(sys.executable).with_name("hopflow")), "cluster", "pathways", "features"]
    # as from a terminal: SIGINT at its default (a shell starts background jobs, CI's too, with it ignored)
    with subprocess.Popen(command, env=env, stdout=subprocess.PIPE, text=True,
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)) as proc:
        try:
            line = proc.stdout.readline() if proc.stdout else ""
            assert line.startswith("export HOPFLOW_DASK_ADDRESSES="), line
            addresses = json.loads(line.split("=", 1)[1].strip().strip("'"))
            assert list(addresses) == ["local"]  # both stages run on the local profile: one cluster
            with Client(addresses["local"]) as client:
                assert len(client.scheduler_info()["workers"]) == 2
            proc.send_signal(signal.SIGINT)
            assert proc.wait(timeout=60) == 0
        finally:
            if proc.poll() is None:
                proc.kill()



def test_a_flow_runs_own_cluster_reaps_its_item_processes_as_it_closes(monkeypatch) -> None:
    """A flow run's own Dask cluster closes its workers, and each worker stops and waits for its idle item processes
    as it exits (its at-exit hooks): they end with it instead of as orphans, and their CPU time counts to the process
    tree that started the flow (without it, the two items' 12 core-s were missing from it)."""
    import psutil

    from hopflow.flows.common import share_temporary_server
    from hopflow.flows.synthetic import synthetic

    monkeypatch.setenv("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    monkeypatch.delenv("HOPFLOW_DASK_PROFILE", raising=False)
    monkeypatch.delenv("HOPFLOW_DASK_ADDRESSES", raising=False)
    monkeypatch.setenv("HOPFLOW_TIME_LIMITS", '{"synthetic": 120}')
    get_settings.cache_clear()
    init_db()
    share_temporary_server()
    with session_scope(write=True) as session:
        session.execute(insert(SyntheticItem), [{"cpu_ms": 6000.0, "sleep_ms": 0.0, "failure": "none",
                                                "fail_attempts": 1, "priority": 0.0}] * 2)
    claimed = [c.id for c in queue.claim("synthetic", 10, refresh=True)]

    def reaped() -> float:
        times = psutil.Process().cpu_times()
        return times.children_user + times.children_system

    before = reaped()
    report = synthetic.with_options(task_runner=stage_task_runner("synthetic"))(run_ids=claimed)
    assert len(report.done) == 2
    assert reaped() - before >= 12.0  # the two items' CPU, in item processes reaped by workers reaped by their nannies
