"""Barrier results on the command line: the leaderboard (best barrier per pathway) and its plots."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Annotated, Any

import typer
from sqlalchemy import select
from sqlalchemy.orm import Session

from hopflow.cli.render import console, emit_json, table
from hopflow.db import init_db, session_scope
from hopflow.loop import latest_calibrations
from hopflow.models import CalibrationRow, Estimate, NebResult, Pathway, Structure
from hopflow.settings import get_settings
from hopflow.stages import BARRIER_COLUMNS

ENGINE_TIERS = ("vasp-neb", "mlip-neb", "mlip-idpp")
"""Most trusted first: a pathway's leaderboard barrier comes from the first tier that has a converged one."""
PLOTS_DIR = "plots"
LEADERBOARD_PNG = "leaderboard.png"


@dataclass(frozen=True)
class BoardEntry:
    """One pathway's best barrier."""

    formula: str
    structure_id: int
    pathway_id: int
    hop_length: float
    barrier: float | None
    engine: str
    table: str
    run_id: int
    calibrated_barrier: float | None = None
    """An estimate corrected by the newest calibration of its engine against VASP (None for VASP barriers)."""
    calibration: str | None = None
    """Marks a calibrated value: 'calibrated <engine> -> vasp-neb (n pairs)'."""


def _tier(engine: str) -> int:
    return ENGINE_TIERS.index(engine) if engine in ENGINE_TIERS else len(ENGINE_TIERS)


def leaderboard_entries(session: Session) -> list[BoardEntry]:
    """Best barrier per pathway (VASP NEB over ML-potential NEB over IDPP estimates, newest within a tier), lowest
    first; pathways with only unconverged results come last, without a barrier."""
    best: dict[int, tuple[tuple[int, int, int], BoardEntry]] = {}
    calibrations = latest_calibrations(session)
    for model in (NebResult, Estimate):
        rows = session.execute(
            select(model, Pathway.length, Pathway.structure_id, Structure.formula)
            .join(Pathway, Pathway.id == model.pathway_id).join(Structure, Structure.id == Pathway.structure_id))
        for row, length, structure_id, formula in rows:
            key = (row.barrier is None, _tier(row.engine), -row.id)
            entry = BoardEntry(formula=formula, structure_id=structure_id, pathway_id=row.pathway_id,
                               hop_length=length, barrier=row.barrier, engine=row.engine,
                               table=model.__tablename__, run_id=row.run_id)
            if row.pathway_id not in best or key < best[row.pathway_id][0]:
                best[row.pathway_id] = (key, entry)
    entries = [_calibrated(entry, calibrations) for _, entry in best.values()]
    return sorted(entries, key=lambda e: (e.barrier is None, e.barrier or 0.0, e.pathway_id))


def _calibrated(entry: BoardEntry, calibrations: dict[str, CalibrationRow]) -> BoardEntry:
    cal = calibrations.get(entry.engine) if entry.table == "estimates" else None
    if cal is None or entry.barrier is None:
        return entry
    return replace(entry, calibrated_barrier=cal.slope * entry.barrier + cal.intercept,
                   calibration=f"calibrated {cal.source} -> {cal.reference} ({cal.n} pairs)")


def barrier_result(row: Estimate | NebResult) -> Any:
    """A stored estimate or NEB row as the engines' BarrierResult."""
    from tasks.engines.base import BarrierResult  # plots and results are tasks' types; the CLI imports them on use

    return BarrierResult.model_validate({name: getattr(row, name) for name in BARRIER_COLUMNS})


def write_leaderboard_plot(entries: list[BoardEntry], path: Path) -> Path:
    """The leaderboard as a bar plot PNG."""
    from tasks.plots import LeaderboardRow, plot_leaderboard

    rows = [LeaderboardRow(label=f"{e.formula} #{e.structure_id} p{e.pathway_id}", barrier=e.barrier,
                           engine=e.engine, hop_length=e.hop_length) for e in entries]
    return plot_leaderboard(rows, path)


def write_profile_plots(session: Session, directory: Path) -> list[Path]:
    """One energy-profile PNG per stored estimate and NEB result, named <table>-<id>.png."""
    from tasks.plots import plot_energy_profile

    written = []
    for model in (Estimate, NebResult):
        rows = session.execute(select(model, Structure.formula).join(Pathway, Pathway.id == model.pathway_id)
                               .join(Structure, Structure.id == Pathway.structure_id).order_by(model.id))
        for row, formula in rows:
            title = f"{formula}, pathway {row.pathway_id}: {row.engine}"
            path = directory / f"{model.__tablename__}-{row.id}.png"
            written.append(plot_energy_profile(barrier_result(row), path, title=title))
    return written


def print_leaderboard(entries: list[BoardEntry]) -> None:
    """The leaderboard as a table."""
    table(f"leaderboard: best barrier of {len(entries)} pathways", [asdict(e) for e in entries],
          ["formula", "structure_id", "pathway_id", "hop_length", "barrier", "engine", *_calibrated_columns(entries)])


def _calibrated_columns(entries: list[BoardEntry]) -> list[str]:
    """The calibrated-estimate columns, shown only when a calibration exists."""
    return ["calibrated_barrier", "calibration"] if any(e.calibration for e in entries) else []


def leaderboard(as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
                plot: Annotated[Path | None, typer.Option("--plot", help="Also write the leaderboard PNG here.")] = None,
                ) -> None:
    """Best barrier per pathway (VASP NEB over estimates where present), lowest first."""
    init_db()
    with session_scope() as session:
        entries = leaderboard_entries(session)
    if plot is not None:
        write_leaderboard_plot(entries, plot)
    if as_json:
        emit_json([asdict(e) for e in entries])
    else:
        print_leaderboard(entries)
        if plot is not None:
            console.print(f"leaderboard plot written to {plot}")


def screen_report() -> Path:
    """The end of `hopflow screen`: print the leaderboard, write its plot and every energy profile under
    HOPFLOW_HOME/plots; returns the plot directory."""
    directory = get_settings().home / PLOTS_DIR
    with session_scope() as session:
        entries = leaderboard_entries(session)
        profiles = write_profile_plots(session, directory)
    print_leaderboard(entries)
    write_leaderboard_plot(entries, directory / LEADERBOARD_PNG)
    console.print(f"plots: {directory / LEADERBOARD_PNG} and {len(profiles)} energy profiles in {directory}")
    return directory


def register(app: typer.Typer) -> None:
    app.command()(leaderboard)
