"""Barrier results on the command line: the leaderboards (per pathway, per structure) and their plots."""

from __future__ import annotations

from dataclasses import asdict
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from sqlalchemy import select
from sqlalchemy.orm import Session

from hopflow.cli.render import console, emit_json, table
from hopflow.db import init_db, session_scope
from hopflow.leaderboard import MaterialEntry, PathwayEntry, material_leaderboard, pathway_leaderboard
from hopflow.models import Estimate, NebResult, Pathway, Structure
from hopflow.models.barriers import trusted
from hopflow.settings import get_settings
from hopflow.stages import BARRIER_COLUMNS

PLOTS_DIR = "plots"
LEADERBOARD_PNG = "leaderboard.png"
PATHWAY_COLUMNS = ["formula", "structure_id", "pathway_id", "hop_length", "barrier", "engine", "model",
                   "model_spread", "flag", "flag_reason"]
MATERIAL_COLUMNS = ["formula", "structure_id", "E*(3D)", "E*(2D)", "E*(1D)", "hops", "cut_off", "mode"]


class Board(StrEnum):
    """Which leaderboard: one row per pathway or per structure."""

    pathway = "pathway"
    structure = "structure"


def barrier_result(row: Estimate | NebResult) -> Any:
    """A stored estimate or NEB row as the engines' BarrierResult."""
    from hopflow.tasks.engines.base import (
        BarrierResult,  # plots and results are tasks' types; the CLI imports them on use
    )

    return BarrierResult.model_validate({name: getattr(row, name) for name in BARRIER_COLUMNS})


def plotted_result(row: Estimate | NebResult, is_trusted: bool) -> Any:
    """A row's profile for plotting: validated when trusted; else its energies without barriers, built unvalidated
    (legacy `unchecked` rows, or flagged rows that kept a barrier, are no result an engine makes today)."""
    from hopflow.tasks.engines.base import BarrierResult

    if is_trusted:
        return barrier_result(row)
    fields = {name: getattr(row, name) for name in BARRIER_COLUMNS}
    return BarrierResult.model_construct(**fields | {"barrier": None, "forward_barrier": None, "reverse_barrier": None})


def write_leaderboard_plot(entries: list[PathwayEntry], path: Path) -> Path:
    """The per-pathway leaderboard as a bar plot PNG."""
    from hopflow.tasks.plots import LeaderboardRow, plot_leaderboard

    rows = [LeaderboardRow(label=f"{e.formula} #{e.structure_id} p{e.pathway_id}", barrier=e.barrier,
                           engine=e.engine, hop_length=e.hop_length) for e in entries]
    return plot_leaderboard(rows, path)


def write_material_plot(entries: list[MaterialEntry], path: Path) -> Path:
    """The per-structure leaderboard as a bar plot PNG of the 3D value (E*, or the upper bound when incomplete)."""
    from hopflow.tasks.plots import LeaderboardRow, plot_leaderboard

    rows = [LeaderboardRow(label=f"{e.formula} #{e.structure_id}", barrier=e.value(3), engine=e.status_3d)
            for e in entries]
    return plot_leaderboard(rows, path, title="Percolation barriers E*(3D)")


def profile_name(formula: str, structure_id: int, row: Estimate | NebResult) -> str:
    """File name of a result's energy profile (tasks.plots.profile_file_name), e.g. CaF2-s1-p3-mlip-idpp-chgnet.png."""
    from hopflow.tasks.plots import profile_file_name

    return profile_file_name(formula, structure_id, row.pathway_id, row.engine, row.model)


def write_profiles(session: Session, directory: Path) -> dict[tuple[str, int], Path]:
    """One energy-profile PNG per stored estimate and NEB result, named by `profile_name` (the table and row id
    appended when two results would share a name); keyed by (table, row id)."""
    from hopflow.tasks.plots import plot_energy_profile

    written: dict[tuple[str, int], Path] = {}
    for model in (Estimate, NebResult):
        rows = session.execute(select(model, Structure.formula, Pathway.structure_id, trusted(model))
                               .join(Pathway, Pathway.id == model.pathway_id)
                               .join(Structure, Structure.id == Pathway.structure_id).order_by(model.id))
        for row, formula, structure_id, is_trusted in rows:
            title = f"{formula}, pathway {row.pathway_id}: {row.engine}" + (f" ({row.model})" if row.model else "")
            title += "" if is_trusted else f", {row.flag}"
            path = directory / profile_name(formula, structure_id, row)
            if path in written.values():
                path = path.with_name(f"{path.stem}-{model.__tablename__}{row.id}.png")
            written[(model.__tablename__, row.id)] = plot_energy_profile(plotted_result(row, bool(is_trusted)), path,
                                                                         title=title)
    return written


def write_profile_plots(session: Session, directory: Path) -> list[Path]:
    """`write_profiles` as a list of the files written."""
    return list(write_profiles(session, directory).values())


def _escaped(row: dict[str, Any]) -> dict[str, Any]:
    """Data strings made safe for rich markup."""
    return {k: escape(v) if isinstance(v, str) else v for k, v in row.items()}


def print_leaderboard(entries: list[PathwayEntry]) -> None:
    """The per-pathway leaderboard as a table."""
    columns = PATHWAY_COLUMNS + (["calibrated_barrier", "calibration"] if any(e.calibration for e in entries) else [])
    table(f"leaderboard: best barrier of {len(entries)} pathways", [_escaped(asdict(e)) for e in entries], columns)


def print_materials(entries: list[MaterialEntry]) -> None:
    """The per-structure leaderboard as a table: E*(d) in eV, or its bounds."""
    rows = [_escaped({"formula": e.formula, "structure_id": e.structure_id,
                      **{f"E*({d}D)": e.e_star_text(d, " .. ") for d in (3, 2, 1)},
                      "hops": f"{e.hops_known}/{e.hops_total}", "cut_off": e.cut_off, "mode": e.mode})
            for e in entries]
    table(f"materials: percolation barriers of {len(entries)} structures (eV)", rows, MATERIAL_COLUMNS)


ByOption = Annotated[Board, typer.Option("--by", help="One row per pathway or per structure.")]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON.")]
PlotOption = Annotated[Path | None, typer.Option("--plot", help="Also write the leaderboard PNG here.")]


def leaderboard(by: ByOption = Board.pathway, as_json: JsonOption = False, plot: PlotOption = None) -> None:
    """Best trusted barrier per pathway (VASP NEB over estimates), or per structure the percolation barriers
    E*(1D/2D/3D); lowest first."""
    if plot is not None and not plot.parent.is_dir():
        raise typer.BadParameter(f"folder {plot.parent} does not exist", param_hint="'--plot'")
    init_db()
    with session_scope() as session:
        entries: list[Any] = pathway_leaderboard(session) if by is Board.pathway else material_leaderboard(session)
    if plot is not None:
        (write_leaderboard_plot if by is Board.pathway else write_material_plot)(entries, plot)
    if as_json:
        emit_json([asdict(e) for e in entries])
        return
    (print_leaderboard if by is Board.pathway else print_materials)(entries)
    if plot is not None:
        console.print(f"leaderboard plot written to {escape(str(plot))}")


def screen_report() -> dict[tuple[str, int], Path]:
    """The end of `hopflow screen`: print both leaderboards (the per-material one last), write the pathway plot and
    every energy profile under HOPFLOW_HOME/plots; returns the profiles by (table, row id)."""
    directory = get_settings().home / PLOTS_DIR
    with session_scope() as session:
        entries = pathway_leaderboard(session)
        materials = material_leaderboard(session)
        profiles = write_profiles(session, directory)
    print_leaderboard(entries)
    write_leaderboard_plot(entries, directory / LEADERBOARD_PNG)
    console.print(f"plots: {escape(str(directory / LEADERBOARD_PNG))} and {len(profiles)} energy profiles in "
                  f"{escape(str(directory))}")
    print_materials(materials)
    return profiles


def register(app: typer.Typer) -> None:
    app.command()(leaderboard)
