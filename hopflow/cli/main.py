"""The `hopflow` application: set-up, status and the main job (`screen`); the nouns live in sibling modules."""

from __future__ import annotations

import logging
from typing import Annotated

import typer
from rich.markup import escape
from sqlalchemy import func, inspect, select, table

from hopflow import queue
from hopflow.cli import archive, barriers, learning, orchestration, pathways, stages, structures
from hopflow.cli import report as report_cli
from hopflow.cli.render import console, emit_json
from hopflow.cli.render import table as render_table
from hopflow.db import get_engine, init_db, session_scope
from hopflow.registry import STAGES, get_stage
from hopflow.settings import get_settings

logging.getLogger("distributed").setLevel(logging.WARNING)  # Dask's lifecycle chatter hides the results

app = typer.Typer(help="hopflow: high-throughput screening of crystals for fast ion migration.", no_args_is_help=True)


@app.command()
def init() -> None:
    """Create or upgrade the database (idempotent)."""
    engine = init_db()
    console.print(f"database ready: {engine.url.render_as_string(hide_password=True)}")


@app.command()
def status(as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
           watch: Annotated[bool, typer.Option(
               "--watch", help="Show a progress bar per stage from the queue until Ctrl-C (a controller campaign).")]
           = False,
           interval: Annotated[float, typer.Option(min=0.1, help="Seconds between two looks (--watch).")] = 2.0,
           until_idle: Annotated[bool, typer.Option(
               "--until-idle", help="With --watch: stop once no run is queued, claimed or running.")] = False,
           ) -> None:
    """Rows per table and runs per stage and state."""
    engine = init_db()
    if watch:
        from hopflow.cli.progress import watch_campaign

        watch_campaign(console, interval=interval, until_idle=until_idle)
        return
    names = sorted(n for n in inspect(engine).get_table_names() if n != "alembic_version")
    with session_scope() as session:
        rows = {n: session.scalar(select(func.count()).select_from(table(n))) for n in names}
        runs = queue.counts_by_state(session)
        targets = {name: queue.target(session, get_stage(name)) for name in STAGES}
    data = {"database": engine.url.render_as_string(hide_password=True), "tables": rows, "runs": runs,
            "targets": targets}
    if as_json:
        emit_json(data)
        return
    console.print(f"database: {data['database']}")
    render_table("rows per table", [{"table": k, "rows": v} for k, v in rows.items()])
    render_table("runs per stage", [{"stage": s, "target": targets.get(s), **c} for s, c in runs.items()],
                 ["stage", "target", "queued", "claimed", "running", "done", "failed"])


@app.command()
def screen(
    ion: Annotated[str | None, typer.Option("--ion", help="Migrating ion (default: HOPFLOW_MIGRATING_ION).")] = None,
    structure: Annotated[list[str] | None, typer.Option(
        "--structure", help="Screen only these bundled entries (e.g. CaF2; repeat the option); default: all.")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", help="Show Prefect's logs on the terminal too.")] = False,
) -> None:
    """The main job on the embedded default: init, import the bundled set, run every stage in batch mode, report."""
    from hopflow.cli.progress import prefect_logs_to_file

    with prefect_logs_to_file("screen", verbose) as log:
        console.print(f"Prefect logs: {escape(str(log))}", soft_wrap=True)
        _screen(ion, structure)


def _screen(ion: str | None, structure: list[str] | None) -> None:
    from tasks.structures import bundled_inputs

    from hopflow.cli.progress import batch_progress
    from hopflow.importing import import_raw_inputs

    inputs = bundled_inputs()
    if structure:
        unknown = sorted(set(structure) - {r.location for r in inputs})
        if unknown:
            raise typer.BadParameter(f"no bundled entry {', '.join(unknown)} (known: "
                                     f"{', '.join(r.location for r in inputs)})")
        inputs = [r for r in inputs if r.location in structure]
    init_db()
    outcomes = import_raw_inputs(inputs, ion=ion)
    failed = [o for o in outcomes if o["state"] == "failed"]
    console.print(f"import: {len(outcomes)} bundled inputs, {len(failed)} failed")
    settings = get_settings()
    with batch_progress(console):
        for name in settings.screen_stages:
            if name in STAGES and name != "import":
                # the barrier estimates are the expensive step: only the top-ranked pathways
                limit = settings.screen_top if name == "estimates" else None
                report = stages.run_batch(name, limit=limit)
                console.print(report.summary)
    status()
    profiles = barriers.screen_report()
    console.print(f"report: {escape(str(report_cli.write_report(profiles=profiles)))}", soft_wrap=True)


structures.register(app)
stages.register(app)
orchestration.register(app)
pathways.register(app)
barriers.register(app)
learning.register(app)
archive.register(app)
report_cli.register(app)

__all__ = ["app", "get_engine"]
