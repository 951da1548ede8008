"""Commands about structures: import (bundled, files, Materials Project) and listing."""

from __future__ import annotations

from typing import Annotated

import typer
from sqlalchemy import select

from hopflow.cli.render import console, emit_json, print_line, table
from hopflow.db import init_db, session_scope
from hopflow.models import Source, Structure
from hopflow.settings import get_settings

IonOption = Annotated[str | None, typer.Option("--ion", help="Migrating ion (default: HOPFLOW_MIGRATING_ION).")]


def import_(
    what: Annotated[list[str], typer.Argument(help="'bundled', 'mp', or files / directories / glob patterns.")],
    ion: IonOption = None,
    elements: Annotated[list[str] | None, typer.Option("--element", help="mp: elements that must be present.")] = None,
    e_hull: Annotated[float | None, typer.Option("--e-hull", help="mp: max energy above hull, eV/atom.")] = None,
    limit: Annotated[int | None, typer.Option(help="mp: most documents to fetch.")] = None,
) -> None:
    """Import structures; bad inputs are reported one by one and the exit code says whether any failed."""
    from hopflow.flows.batch import import_raw_inputs
    from hopflow.tasks.structures import MPApiClient, MPCriteria, bundled_inputs, file_inputs

    if what == ["bundled"]:
        raws = bundled_inputs()
    elif what and what[0] == "mp":
        criteria = MPCriteria(elements=tuple(elements or [get_settings().migrating_ion]), energy_above_hull_max=e_hull,
                              limit=limit)
        raws = MPApiClient().search(criteria)
    else:
        raws = file_inputs(what)
    from hopflow.cli.progress import prefect_logs_to_file

    init_db()
    with prefect_logs_to_file("import"), console.status(f"importing {len(raws)} inputs"):
        outcomes = import_raw_inputs(raws, ion=ion)
    failed = [o for o in outcomes if o["state"] == "failed"]
    for o in failed:
        print_line(o["error"] or f"{o['location']}: failed", label="error", stderr=True)
    new = sum(1 for o in outcomes if o["new"])
    print_line(f"{len(outcomes)} inputs: {new} new structures, {len(outcomes) - new - len(failed)} already known "
               f"or duplicates, {len(failed)} failed")
    if failed:
        raise typer.Exit(code=1)


def structures(as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False) -> None:
    """List stored structures with formula, space group, sites, oxidation states and sources."""
    init_db()
    with session_scope() as session:
        sources: dict[int, list[str]] = {}
        for sid, kind, location in session.execute(select(Source.structure_id, Source.kind, Source.location)):
            if sid is not None:
                sources.setdefault(sid, []).append(f"{kind}:{location}")
        rows = [{"id": s.id, "formula": s.formula, "spacegroup": s.spacegroup, "spacegroup_number": s.spacegroup_number,
                 "nsites": s.nsites, "oxidation_states": s.oxidation_states, "oxidation_method": s.oxidation_method,
                 "sources": sources.get(s.id, [])} for s in session.scalars(select(Structure).order_by(Structure.id))]
    if as_json:
        emit_json(rows)
    else:
        table(f"{len(rows)} structures", rows, ["id", "formula", "spacegroup", "nsites", "oxidation_states", "sources"])


def register(app: typer.Typer) -> None:
    app.command(name="import")(import_)
    app.command()(structures)
