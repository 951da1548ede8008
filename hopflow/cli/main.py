"""The `hopflow` application: set-up, status and the main job (`screen`); the nouns live in sibling modules."""

from __future__ import annotations

import logging
import os
import re
import sys
from typing import Annotated, Any, NoReturn

import typer
from rich.markup import escape
from sqlalchemy import func, inspect, select, table
from typer.core import TyperGroup

from hopflow import queue
from hopflow.cli import archive, barriers, cluster, learning, orchestration, pathways, stages, structures
from hopflow.cli import report as report_cli
from hopflow.cli.render import console, emit_json, err_console
from hopflow.cli.render import table as render_table
from hopflow.db import get_engine, init_db, session_scope
from hopflow.registry import STAGES, get_stage
from hopflow.settings import get_settings
from hopflow.validation import finite_float

logging.getLogger("distributed").setLevel(logging.WARNING)  # Dask's lifecycle chatter hides the results

USAGE_EXIT = 2
"""Exit code of a refused input or configuration (typer's own for usage errors)."""
INTERRUPTED = 130
"""Exit code of a command stopped by Ctrl-C or SIGINT (128 + the signal's number, as a shell reports it)."""
FAILURE_EXIT = 1


def failure_message(exc: BaseException) -> tuple[str, int] | None:
    """A known error as one line for the terminal and its exit code; None for anything else (a bug: traceback)."""
    from pydantic import ValidationError
    from sqlalchemy.exc import ArgumentError, DBAPIError

    from hopflow.errors import HopflowError, InvalidValueError

    if isinstance(exc, InvalidValueError):
        return str(exc), USAGE_EXIT
    if isinstance(exc, HopflowError):
        return str(exc), FAILURE_EXIT
    if isinstance(exc, ArgumentError):
        return f"bad database URL (HOPFLOW_DATABASE_URL): {exc}", USAGE_EXIT
    if isinstance(exc, DBAPIError):
        reason = str(exc.orig).strip().splitlines()[0] if exc.orig is not None else type(exc).__name__
        return f"database error: {reason}", FAILURE_EXIT
    if isinstance(exc, ValidationError):
        errors = "; ".join(f"{'.'.join(map(str, e['loc'])) or exc.title}: {e['msg']}" for e in exc.errors())
        return f"invalid setting ({exc.title}): {errors}", USAGE_EXIT
    if isinstance(exc, OSError) and exc.filename is not None:
        return f"cannot use {exc.filename}: {exc.strerror or exc}", FAILURE_EXIT
    return None


def without_secrets(text: str) -> str:
    """`text` with the database password and the MP API key masked (they must never reach the terminal)."""
    from sqlalchemy.engine import make_url

    secrets: list[str] = []
    try:
        settings = get_settings()
    except Exception:  # noqa: BLE001  (invalid settings are what is being reported)
        return text
    if settings.mp_api_key is not None and settings.mp_api_key.get_secret_value():
        secrets.append(settings.mp_api_key.get_secret_value())
    try:
        password = make_url(settings.url).password
    except Exception:  # noqa: BLE001  (an unparsable URL: mask what looks like user:password@)
        password = None
        text = re.sub(r"(://[^:/@\s]*:)[^@\s]*@", r"\1***@", text)
    if password:
        secrets.append(str(password))
    for secret in secrets:
        text = text.replace(secret, "***")
    return text


def exit_at_once(code: int) -> NoReturn:
    """End the process now, after stopping the temporary Prefect server and flushing logs and output: items still
    running in worker threads (which Python cannot stop) must not hold an interrupted command open."""
    from hopflow.flows.common import stop_temporary_server

    stop_temporary_server()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


class HopflowGroup(TyperGroup):
    """The command group: known errors end a command with one line on stderr and an exit code, not a traceback."""

    def invoke(self, ctx: Any) -> Any:  # click's Context, which typer vendors privately
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            err_console.print("[red]interrupted[/red]: unfinished claims went back to the queue", soft_wrap=True)
            exit_at_once(INTERRUPTED)
        except Exception as exc:
            known = failure_message(exc)
            if known is None:
                raise
            message, code = known
            err_console.print(f"[red]error[/red] {escape(without_secrets(message))}", soft_wrap=True)
            raise typer.Exit(code) from None


app = typer.Typer(help="hopflow: high-throughput screening of crystals for fast ion migration.", no_args_is_help=True,
                  cls=HopflowGroup)


@app.command()
def init() -> None:
    """Create or upgrade the database (idempotent)."""
    engine = init_db()
    console.print(f"database ready: {engine.url.render_as_string(hide_password=True)}")


@app.command()
def status(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    watch: Annotated[
        bool,
        typer.Option(
            "--watch", help="Show a progress bar per stage from the queue until Ctrl-C (a controller campaign)."
        ),
    ] = False,
    interval: Annotated[
        float, typer.Option(callback=finite_float(ge=0.1), help="Seconds between two looks (--watch).")
    ] = 2.0,
    until_idle: Annotated[
        bool, typer.Option("--until-idle", help="With --watch: stop once no run is queued, claimed or running.")
    ] = False,
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
    data = {
        "database": engine.url.render_as_string(hide_password=True),
        "tables": rows,
        "runs": runs,
        "targets": targets,
    }
    if as_json:
        emit_json(data)
        return
    console.print(f"database: {data['database']}")
    render_table("rows per table", [{"table": k, "rows": v} for k, v in rows.items()])
    render_table(
        "runs per stage",
        [{"stage": s, "target": targets.get(s), **c} for s, c in runs.items()],
        ["stage", "target", "queued", "claimed", "running", "done", "failed"],
    )


@app.command()
def screen(
    ion: Annotated[str | None, typer.Option("--ion", help="Migrating ion (default: HOPFLOW_MIGRATING_ION).")] = None,
    structure: Annotated[
        list[str] | None,
        typer.Option(
            "--structure", help="Screen only these bundled entries (e.g. CaF2; repeat the option); default: all."
        ),
    ] = None,
    verbose: Annotated[bool, typer.Option("--verbose", help="Show Prefect's logs on the terminal too.")] = False,
) -> None:
    """The main job on the embedded default: init, import the bundled set, run every stage in batch mode, report."""
    from hopflow.cli.progress import prefect_logs_to_file

    with prefect_logs_to_file("screen", verbose) as log:
        console.print(f"Prefect logs: {escape(str(log))}", soft_wrap=True)
        _screen(ion, structure)


def _screen(ion: str | None, structure: list[str] | None) -> None:
    from hopflow.cli.progress import batch_progress
    from hopflow.flows.batch import import_raw_inputs, run_batch
    from hopflow.tasks.structures import bundled_inputs

    inputs = bundled_inputs()
    if structure:
        unknown = sorted(set(structure) - {r.location for r in inputs})
        if unknown:
            raise typer.BadParameter(
                f"no bundled entry {', '.join(unknown)} (known: {', '.join(r.location for r in inputs)})"
            )
        inputs = [r for r in inputs if r.location in structure]
    init_db()
    outcomes = import_raw_inputs(inputs, ion=ion)
    failed = [o for o in outcomes if o["state"] == "failed"]
    console.print(f"import: {len(outcomes)} bundled inputs, {len(failed)} failed")
    from hopflow.flows.common import batch_clusters

    settings = get_settings()
    names = [name for name in settings.screen_stages if name in STAGES and name != "import"]
    with batch_progress(console), batch_clusters(names):
        for name in names:
            # the barrier estimates are the expensive step: only the top-ranked pathways
            limit = settings.screen_top if name == "estimates" else None
            report = run_batch(name, limit=limit)
            console.print(report.summary)
    status()
    profiles = barriers.screen_report()
    console.print(f"report: {escape(str(report_cli.write_report(profiles=profiles)))}", soft_wrap=True)


structures.register(app)
stages.register(app)
orchestration.register(app)
cluster.register(app)
pathways.register(app)
barriers.register(app)
learning.register(app)
archive.register(app)
report_cli.register(app)

__all__ = ["app", "get_engine"]
