"""What every stage flow shares: its Dask task runner from the stage's resource profile, and its run name."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from prefect.runtime import flow_run
from prefect.task_runners import TaskRunner
from prefect_dask import DaskTaskRunner

from hopflow.registry import get_stage
from hopflow.settings import get_settings

TEMPORARY_SERVER_TIMEOUT_S = 120
"""Prefect waits 20 s by default; a fresh temporary server migrates its database first, which took longer than that
on 2 busy cores."""


def profile_for(stage_name: str) -> str:
    """The Dask profile of a stage: its `stage_profiles` entry (`HOPFLOW_PROFILE_<STAGE>`), else `dask_profile` when
    set explicitly (`HOPFLOW_DASK_PROFILE`), else the stage's own `resources`."""
    settings = get_settings()
    override = settings.stage_profiles.get(stage_name)
    if override:
        return override
    if "dask_profile" in settings.model_fields_set:
        return settings.dask_profile
    return get_stage(stage_name).resources


def stage_task_runner(stage_name: str) -> TaskRunner[Any]:
    """A DaskTaskRunner built from the stage's cluster profile (deployments/clusters.yaml), or connected to the
    profile's standing cluster (`dask_addresses`). The workers of a local cluster import the stage's flow module as
    they start, before the flow run starts its runs."""
    from hopflow.deployments.clusters import get_profile, task_runner_kwargs

    profile = profile_for(stage_name)
    address = get_settings().dask_addresses.get(profile)
    if address:
        return DaskTaskRunner(address=address)
    kwargs = task_runner_kwargs(profile)
    if get_profile(profile).cluster == "local":
        kwargs["cluster_kwargs"] = preloading(kwargs["cluster_kwargs"], [stage_module(stage_name)])
    return DaskTaskRunner(**kwargs)


def preloading(cluster_kwargs: dict[str, Any], modules: Sequence[str]) -> dict[str, Any]:
    """LocalCluster arguments whose workers import `modules` when they start. A worker imports a flow's module for its
    first task anyway, even one whose items run in item processes (Prefect's task context carries the flow): it is
    cluster start-up, not the first items' work."""
    return {**cluster_kwargs, "preload": [*(cluster_kwargs.get("preload") or []), *modules]}


_TEMPORARY_SERVERS: list[Any] = []
"""The temporary Prefect server this process started (share_temporary_server), to stop last."""
_BATCH_CLUSTERS: dict[str, str] = {}
"""Profile name -> scheduler address of the Dask cluster a batch-mode command shares among its stage flows."""


def stage_module(stage_name: str) -> str:
    """The module that holds a stage's flow (and imports its tasks)."""
    return get_stage(stage_name).flow_module


@contextmanager
def batch_clusters(stage_names: Sequence[str]) -> Iterator[dict[str, str]]:
    """Batch mode: one Dask cluster per local profile for the whole command instead of one per stage flow run.

    Its workers import the stages' modules when they start (`preload`), and so does one item process per worker
    thread for stages whose items run in item processes (a time limit), with the libraries the stages' items import
    lazily (`Stage.warm_modules`): the libraries, and once the first task asked for it the ML potential, are loaded
    once per worker for the command, not once per stage. Flows started with `batch_flow` inside the block connect
    to it. SLURM profiles keep a cluster per flow run (their adaptive jobs follow each flow's work), and so do local
    profiles with `adapt`; profiles with a standing cluster (`dask_addresses`) use it. Yields profile -> scheduler
    address of the clusters it started.
    """
    from distributed import Client

    from hopflow.deployments.clusters import NannyLocalCluster, get_profile, task_runner_kwargs

    share_temporary_server()  # first: the workers inherit its address
    by_profile: dict[str, tuple[set[str], set[str]]] = {}  # profile -> (stage modules, of stages with item processes)
    for name in stage_names:
        stage = get_stage(name)
        modules, isolated = by_profile.setdefault(profile_for(name), (set(), set()))
        modules.add(stage.flow_module)
        (isolated if stage.time_limit is not None else modules).update((stage.flow_module, *stage.warm_modules))
    started: list[tuple[str, Any]] = []
    try:
        for profile, (modules, in_item_processes) in by_profile.items():
            runner = task_runner_kwargs(profile)
            if (profile in _BATCH_CLUSTERS or profile in get_settings().dask_addresses
                    or get_profile(profile).cluster != "local" or runner["adapt_kwargs"]):
                continue  # adaptive local profiles scale with each flow's work: they keep a cluster per flow run
            cluster = NannyLocalCluster(**preloading(runner["cluster_kwargs"], sorted(modules)))
            started.append((profile, cluster))
            with Client(cluster) as client:
                client.wait_for_workers(len(cluster.workers))
                if in_item_processes:  # items of stages with a time limit run in item processes: they import
                    client.run(_warm_item_processes, sorted(in_item_processes))
            _BATCH_CLUSTERS[profile] = cluster.scheduler_address
        yield {profile: _BATCH_CLUSTERS[profile] for profile, _ in started}
    except KeyboardInterrupt:
        started.clear()  # Ctrl-C: the command ends at once; a graceful close would wait for items still running
        raise
    finally:
        for profile, cluster in reversed(started):
            _BATCH_CLUSTERS.pop(profile, None)
            close_workers_first(cluster)


WORKERS_CLOSE_TIMEOUT_S = 30.0
"""How long a closing batch cluster waits for its workers to go before it closes its scheduler regardless."""


def close_workers_first(cluster: Any) -> None:
    """Close a local cluster's workers, then its scheduler. Closed together, a worker whose heartbeat was on its way
    to the closing scheduler logs an ERROR ("Failed to communicate with scheduler during heartbeat") at the end of a
    command that went well."""
    import time

    cluster.scale(0)
    deadline = time.monotonic() + WORKERS_CLOSE_TIMEOUT_S
    while cluster.workers and time.monotonic() < deadline:
        time.sleep(0.1)
    cluster.close()


async def _warm_item_processes(modules: list[str], dask_worker: Any) -> int:
    """On a Dask worker: one idle item process per thread, having imported `modules` (waited for in a thread, so
    the worker's event loop goes on)."""
    import asyncio

    from hopflow.isolation import warm_item_processes

    return await asyncio.to_thread(warm_item_processes, modules, dask_worker.state.nthreads)


def batch_flow(stage_name: str, flow_fn: Any) -> Any:
    """The stage's flow on the batch command's shared cluster (`batch_clusters`) or the profile's standing one
    (`dask_addresses`), or as it is when neither runs."""
    profile = profile_for(stage_name)
    address = _BATCH_CLUSTERS.get(profile) or get_settings().dask_addresses.get(profile)
    return flow_fn.with_options(task_runner=DaskTaskRunner(address=address)) if address else flow_fn


def stage_run_name(stage_name: str) -> str:
    """Flow-run name that says what runs, e.g. `features-12-items` or `pathways-all-eligible`."""
    run_ids = flow_run.parameters.get("run_ids")
    return f"{stage_name}-{len(run_ids)}-items" if run_ids is not None else f"{stage_name}-all-eligible"


def share_temporary_server() -> str | None:
    """Without a Prefect API (batch mode on a laptop) every process that reports to Prefect, the flow and each Dask
    worker, would start a temporary server of its own. Start one here and put its URL in the environment, which the
    Dask workers inherit; returns that URL, or None when an API is configured already."""
    from prefect.settings import get_current_settings

    if os.environ.get("PREFECT_API_URL") or get_current_settings().api.url:
        return None
    # offline, the server's analytics service logs an ERROR per attempt to phone home
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    server = _temporary_server_class()()  # one per process; it stops itself at exit
    server.start(timeout=TEMPORARY_SERVER_TIMEOUT_S)
    _TEMPORARY_SERVERS.append(server)
    os.environ["PREFECT_API_URL"] = server.api_url
    return server.api_url


def _temporary_server_class() -> type[Any]:
    """Prefect's temporary server, started in a session of its own: a Ctrl-C to the command's process group stops the
    command's flows (which give their claims back and report to the server) but not the server, which the command
    stops last, at exit. Prefect's `_run_uvicorn_command` (prefect==3.8.8, pinned) with `start_new_session`."""
    import subprocess
    import sys

    import prefect
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import get_current_settings

    class TemporaryServer(SubprocessASGIServer):
        def _run_uvicorn_command(self) -> subprocess.Popen[Any]:
            server_env = {"PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}
            return subprocess.Popen(
                [sys.executable, "-m", "uvicorn", "--app-dir", str(prefect.__module_path__.parent), "--factory",
                 "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", str(self.port),
                 "--log-level", "error", "--lifespan", "on"],
                env={**os.environ, **server_env, **get_current_settings().to_environment_variables(exclude_unset=True)},
                start_new_session=True)

    return TemporaryServer


def stop_temporary_server() -> None:
    """Stop the temporary Prefect server this process started, if any (at the very end of an interrupted command: the
    flows report their end to it first)."""
    while _TEMPORARY_SERVERS:
        _TEMPORARY_SERVERS.pop().stop()
