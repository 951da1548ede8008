"""What every stage flow shares: its Dask task runner from the stage's resource profile, and its run name."""

from __future__ import annotations

import os

from prefect.runtime import flow_run
from prefect_dask import DaskTaskRunner

from hopflow.registry import get_stage
from hopflow.settings import get_settings

TEMPORARY_SERVER_TIMEOUT_S = 120
"""Prefect waits 20 s by default; a fresh temporary server migrates its database first, which took longer than that
on 2 busy cores."""


def profile_for(stage_name: str) -> str:
    """The Dask profile of a stage: `HOPFLOW_PROFILE_<STAGE>`, else `HOPFLOW_DASK_PROFILE`, else the stage's own."""
    override = os.environ.get(f"HOPFLOW_PROFILE_{stage_name.upper().replace('-', '_')}")
    if override:
        return override
    if "HOPFLOW_DASK_PROFILE" in os.environ:
        return get_settings().dask_profile
    return get_stage(stage_name).resources


def stage_task_runner(stage_name: str) -> DaskTaskRunner:
    """A DaskTaskRunner built from the stage's cluster profile (deployments/clusters.yaml)."""
    from deployments.clusters import task_runner

    return task_runner(profile_for(stage_name))


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
    from prefect.server.api.server import SubprocessASGIServer

    # offline, the server's analytics service logs an ERROR per attempt to phone home
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    server = SubprocessASGIServer()  # one per process; it stops itself at exit
    server.start(timeout=TEMPORARY_SERVER_TIMEOUT_S)
    os.environ["PREFECT_API_URL"] = server.api_url
    return server.api_url
