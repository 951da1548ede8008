"""`hopflow report`: the screening's results as one self-contained HTML file (hopflow.report builds it)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from hopflow.cli.barriers import PLOTS_DIR, write_material_plot, write_profiles
from hopflow.cli.render import console
from hopflow.db import get_engine, init_db, session_scope
from hopflow.report import collect_report, model_images, profile_key, render_report
from hopflow.settings import get_settings

REPORT_HTML = "report.html"
MATERIALS_PNG = "materials.png"


def default_report_path() -> Path:
    return get_settings().home / REPORT_HTML


def write_report(path: Path | None = None, profiles: dict[tuple[str, int], Path] | None = None) -> Path:
    """Write the report to `path` (default HOPFLOW_HOME/report.html); `profiles` are energy-profile PNGs already
    drawn by (table, row id), else they are drawn now under HOPFLOW_HOME/plots."""
    path = path or default_report_path()
    directory = get_settings().home / PLOTS_DIR
    with session_scope() as session:
        report = collect_report(session, database=get_engine().url.render_as_string(hide_password=True))
        if profiles is None:
            profiles = write_profiles(session, directory)
        images = {profile_key(table, row_id): png.read_bytes() for (table, row_id), png in profiles.items()
                  if any(r.image_key == profile_key(table, row_id) for _, _, r in report.profile_results())}
        images |= model_images(session, report.models, directory)
    if report.materials:
        images["materials"] = write_material_plot([m.entry for m in report.materials],
                                                  directory / MATERIALS_PNG).read_bytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_report(report, images), encoding="utf-8")
    return path


def report(path: Annotated[Path | None, typer.Argument(
               help="Where to write the HTML file (default: HOPFLOW_HOME/report.html).")] = None,
           open_: Annotated[bool, typer.Option("--open", help="Open it in the default browser.")] = False) -> None:
    """One self-contained HTML report: per-material leaderboard, pathways with energy profiles, models, progress."""
    init_db()
    written = write_report(path)
    console.print(f"report: {escape(str(written))}", soft_wrap=True)
    if open_:
        typer.launch(written.resolve().as_uri())


def register(app: typer.Typer) -> None:
    app.command()(report)
