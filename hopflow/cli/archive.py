"""Commands that move results between databases: export a provenance closure, import an archive."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from hopflow.cli.render import console, emit_json
from hopflow.db import init_db
from hopflow.errors import ArchiveError
from hopflow.validation import row_id

FileArg = Annotated[Path, typer.Argument(help="The archive file (a zip of Parquet tables and a manifest).")]


def export(
    file: FileArg,
    structure: Annotated[
        list[int] | None,
        typer.Option(
            "--structure", callback=row_id(), help="Structure id to export with its closure (repeat the option)."
        ),
    ] = None,
    formula: Annotated[
        list[str] | None,
        typer.Option("--formula", help="Reduced formula whose structures to export (repeat the option)."),
    ] = None,
    stage: Annotated[
        str, typer.Option(help="Last stage level to export: import, pathways, features, vacancies, estimates or neb.")
    ] = "neb",
    all_: Annotated[
        bool, typer.Option("--all", help="Every structure, and the barrier models and calibrations.")
    ] = False,
) -> None:
    """Write the provenance closure of the selected structures (results, the runs that made them, sources)."""
    from hopflow.archive import Selection, export_closure

    try:
        selection = Selection(
            structure_ids=tuple(structure or ()), formulas=tuple(formula or ()), all=all_, stage=stage
        )
        init_db()
        report = export_closure(selection, file)
    except ArchiveError as exc:
        console.print(f"[red]export refused[/red]: {escape(str(exc))}")
        raise typer.Exit(1) from None
    console.print(report.summary, markup=False)


def import_archive(file: FileArg, as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False) -> None:
    """Import an archive in one transaction: verified first, rows matched by content, only new rows added."""
    from hopflow.archive import import_archive as run_import

    init_db()
    try:
        report = run_import(file)
    except ArchiveError as exc:
        console.print(f"[red]import refused[/red]: {escape(str(exc))}")
        raise typer.Exit(1) from None
    if as_json:
        emit_json(
            {
                "archive": report.name,
                "sha256": report.sha256,
                "schema_revision": report.schema_revision,
                "archive_id": report.archive_id,
                "tables": {t: vars(c) for t, c in report.tables.items()},
            }
        )
        return
    console.print(report.summary, markup=False)


def register(app: typer.Typer) -> None:
    app.command()(export)
    app.command(name="import-archive")(import_archive)
