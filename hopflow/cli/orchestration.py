"""Orchestration commands: targets, manual submission, sweep, one controller tick, Prefect bootstrap, maintenance.

Registered on the main app by `register(app)`. Commands that talk to Prefect use PREFECT_API_URL.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from hopflow import queue
from hopflow.db import session_scope
from hopflow.registry import get_stage
from hopflow.validation import bounded_int, finite_float, row_id

if TYPE_CHECKING:
    from collections.abc import Iterator

    from prefect.client.orchestration import SyncPrefectClient

StageArg = Annotated[str, typer.Argument(help="Stage name, e.g. pathways or synthetic.")]
Reason = Annotated[str, typer.Option("--reason", help="Why: recorded with the change.")]


@contextmanager
def _prefect() -> Iterator[SyncPrefectClient]:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        yield client


def _stage_or_exit(name: str) -> None:
    try:
        get_stage(name)
    except KeyError as exc:
        raise typer.BadParameter(str(exc.args[0])) from None


def target(
    stage: StageArg,
    n: Annotated[int, typer.Argument(callback=bounded_int(ge=0), help="Live flow runs wanted (0 stops it).")],
    reason: Reason = "set with hopflow target",
) -> None:
    """Set how many flow runs of a stage the controller keeps live (takes effect at its next tick)."""
    _stage_or_exit(stage)
    with session_scope(write=True) as session:
        changed = queue.set_target(session, get_stage(stage), n, reason)
    typer.echo(f"{stage}: target {n}" + ("" if changed else " (unchanged)"))


def submit(
    stage: StageArg,
    ids: Annotated[list[int], typer.Argument(callback=row_id(), help="Input item ids of the stage.")],
    batch_size: Annotated[
        int | None, typer.Option(callback=bounded_int(ge=1), help="Items per flow run (default: the stage's).")
    ] = None,
    deployment: Annotated[str | None, typer.Option(help="`flow/deployment` (default: the stage's).")] = None,
) -> None:
    """Run a stage on chosen input items now, through the queue (items already claimed or done are skipped)."""
    from hopflow.flows.submission import submit_items

    _stage_or_exit(stage)
    with _prefect() as client:
        report = submit_items(client, stage, ids, batch_size=batch_size, deployment=deployment)
    typer.echo(f"{stage}: {len(report.run_ids)} runs claimed, flow runs: {', '.join(report.flow_runs) or 'none'}")
    if report.skipped:
        typer.echo(
            f"not queued (already claimed, running, done or failed, or not an input): "
            f"{' '.join(map(str, report.skipped))}"
        )
    if report.error:
        typer.echo(report.error, err=True)
        raise typer.Exit(1)


def sweep(
    stage: Annotated[str | None, typer.Option(help="Only this stage.")] = None,
    prefect: Annotated[bool, typer.Option(help="Also requeue work of flow runs Prefect reports as over.")] = True,
) -> None:
    """Requeue lost work now (expired leases, crashed or failed flow runs, retryable failures)."""
    from hopflow.flows.submission import sweep_lost

    if stage:
        _stage_or_exit(stage)
    if prefect:
        with _prefect() as client:
            report, lost = sweep_lost(client, stage=stage)
    else:
        report, lost = sweep_lost(None, stage=stage)
    typer.echo(f"requeued {len(report.requeued)}, failed for good {len(report.failed)}, flow runs over: {len(lost)}")
    for run_id, reason in sorted(report.reasons.items()):
        typer.echo(f"  run {run_id}: {reason}")


def tick(
    publish: Annotated[bool, typer.Option(help="Publish the progress and leaderboard artifacts.")] = True,
) -> None:
    """Run one controller tick here (what the `controller/controller` deployment does every minute)."""
    from hopflow.flows.controller import tick as controller_tick

    with _prefect() as client:
        report = controller_tick(client, publish=publish)
    typer.echo(report.summary)
    for line in (*report.mirror.read_back, *report.mirror.rejected):
        typer.echo(f"  settings: {line}")


def bootstrap(
    pool_limit: Annotated[
        int | None, typer.Option(callback=bounded_int(ge=1), help="Concurrency limit of the work pool.")
    ] = None,
    deploy: Annotated[bool, typer.Option(help="Then run `prefect deploy --all`.")] = False,
) -> None:
    """Create the `hopflow-pool` process work pool and the settings Variables; optionally deploy prefect.yaml."""
    from hopflow.deployments.bootstrap import bootstrap as run_bootstrap
    from hopflow.deployments.bootstrap import deploy_all

    with _prefect() as client:
        report = run_bootstrap(client, pool_limit=pool_limit)
    typer.echo(
        f"work pool {report.pool}: {'created' if report.pool_created else 'exists'}; "
        f"variables written: {', '.join(report.variables) or 'none'}"
    )
    if deploy:
        done = deploy_all()
        typer.echo(done.stdout[-2000:])
        if done.returncode != 0:
            typer.echo(done.stderr[-2000:], err=True)
            raise typer.Exit(done.returncode)


def cleanup(
    older_than_days: Annotated[
        float, typer.Option(callback=finite_float(ge=0), help="Age of the oldest runs kept.")
    ] = 7.0,
) -> None:
    """Delete finished flow runs older than N days from Prefect's database (hopflow's tables are untouched)."""
    from hopflow.flows.maintenance import delete_old_flow_runs

    with _prefect() as client:
        report = delete_old_flow_runs(client, older_than_days)
    typer.echo(f"deleted {report.deleted} flow runs that ended before {report.older_than:%Y-%m-%d %H:%M} UTC")


def checkpoint(
    dest: Annotated[Path | None, typer.Option(help="Parent folder (default: <home>/checkpoints).")] = None,
) -> None:
    """Snapshot the database and write every table to CSV and Parquet in a dated folder."""
    from hopflow.flows.maintenance import checkpoint_database

    report = checkpoint_database(dest=dest)
    typer.echo(
        f"{report.folder}: snapshot {report.snapshot.name}, {len(report.tables)} tables, "
        f"{sum(report.rows().values())} rows"
    )


COMMANDS = (target, submit, sweep, tick, bootstrap, cleanup, checkpoint)


def register(app: typer.Typer) -> None:
    """Add the orchestration commands to the main `hopflow` app."""
    for command in COMMANDS:
        app.command(name=command.__name__)(command)
