"""The learning loop on the command line: `hopflow retrain` (models, calibration, re-ranking, plots)."""

from __future__ import annotations

from dataclasses import asdict
from typing import Annotated

import typer

from hopflow.cli.render import console, emit_json, table
from hopflow.db import init_db
from hopflow.retraining import retrain_cycle
from hopflow.validation import SEED_MAX, bounded_int


def retrain(
    seed: Annotated[
        int,
        typer.Option(
            "--seed", callback=bounded_int(ge=0, le=SEED_MAX), help="Seed of the model and its cross-validation."
        ),
    ] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Retrain the barrier models on finished barriers, calibrate estimates against VASP, re-score the rankers."""
    init_db()
    report = retrain_cycle(seed=seed)
    if as_json:
        emit_json(
            {
                "stages": [asdict(s) for s in report.stages],
                "calibrations": list(report.calibrations),
                "calibration_skipped": dict(report.calibration_skipped),
            }
        )
        return
    table(
        "barrier models",
        [asdict(s) for s in report.stages],
        ["stage", "model_id", "n_train", "cv_mae", "rescored", "parity_png", "curve_png", "error"],
    )
    for line in report.calibrations:
        console.print(f"calibration {line}")
    for engine, why in report.calibration_skipped.items():
        console.print(f"calibration {engine}: skipped ({why})")


def register(app: typer.Typer) -> None:
    app.command()(retrain)
