"""The standing Dask cluster: `hopflow cluster` starts the local clusters of the stages' profiles and keeps them for
the flow runs the controller starts, which connect through `HOPFLOW_DASK_ADDRESSES` instead of starting their own."""

from __future__ import annotations

import json
import time
from typing import Annotated

import typer

from hopflow.cli.orchestration import _stage_or_exit
from hopflow.cli.render import err_console
from hopflow.registry import STAGES

IDLE_WAKE_S = 3600.0
"""How long the command sleeps between looks while it serves (Ctrl-C ends it at once)."""


def cluster(
    stages: Annotated[list[str] | None, typer.Argument(help="Stages whose profiles to serve (default: every stage).")]
    = None,
) -> None:
    """Start the local Dask cluster of the stages' profiles and keep it until Ctrl-C: its workers import the stage
    modules, and their item processes the ML potential's libraries (and the model at their first item), once for
    every flow run that connects.

    Start the Prefect process worker with the printed HOPFLOW_DASK_ADDRESSES: its flow runs connect. The workers
    read hopflow's settings from this command's environment: start it in the one the flow runs get. SLURM and
    adaptive profiles are left out; they keep a cluster per flow run.
    """
    from hopflow.flows.common import batch_clusters

    names = stages or list(STAGES)
    for name in names:
        _stage_or_exit(name)
    with batch_clusters(names) as addresses:
        if not addresses:
            err_console.print("[red]error[/red] no fixed-size local profile without a standing cluster among these "
                              "stages' profiles", soft_wrap=True)
            raise typer.Exit(1)
        try:  # the address last: whoever reads it may interrupt at once
            err_console.print(f"serving {', '.join(sorted(addresses))} until Ctrl-C", soft_wrap=True)
            typer.echo(f"export HOPFLOW_DASK_ADDRESSES='{json.dumps(addresses)}'")
            while True:
                time.sleep(IDLE_WAKE_S)
        except KeyboardInterrupt:
            pass  # the block closes the clusters


def register(app: typer.Typer) -> None:
    app.command()(cluster)
