"""The retrain flow: fit each barrier stage's model on the finished barriers, calibrate the ML potential against VASP,
re-score the learning rankers, and publish the parity plot, learning curve and CV error as Prefect artifacts."""

from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from hopflow.retraining import CycleReport, retrain_cycle

ARTIFACT_KEY = "hopflow-retrain"


def report_markdown(report: CycleReport) -> str:
    """The cycle as markdown: a table of each stage's model and CV error, the figures' paths, the calibrations."""
    lines = ["# hopflow retrain", "", "| stage | model | training barriers | CV MAE (eV) | note |",
             "|---|---|---|---|---|"]
    for s in report.stages:
        mae = "" if s.cv_mae is None else f"{s.cv_mae:.4f}"
        note = s.error or s.plot_error or ""
        note = f"not retrained: {note}; previous model and scores kept" if s.error else note
        lines.append(f"| {s.stage} | {s.model_id or ''} | {s.n_train} | {mae} | {note.replace('|', '/')} |")
    figures = [(s.stage, p) for s in report.stages for p in (s.parity_png, s.curve_png) if p is not None]
    if figures:
        lines += ["", "## Figures", ""] + [f"- {stage}: `{path}`" for stage, path in figures]
    for s in report.stages:
        if s.curve:
            lines += ["", f"## Learning curve ({s.stage})", "", "| training barriers | CV MAE (eV) |", "|---|---|"]
            lines += [f"| {n} | {mae:.4f} |" for n, mae in s.curve]
    lines += ["", "## Calibration", ""]
    lines += [f"- {c}" for c in report.calibrations] or ["- none fitted"]
    lines += [f"- {engine}: skipped ({why})" for engine, why in report.calibration_skipped.items()]
    return "\n".join(lines)


@flow(name="retrain")
def retrain(seed: int = 0) -> CycleReport:
    """Retrain the barrier models, calibrate, re-rank; a failed training is reported and leaves the previous model."""
    report = retrain_cycle(seed=seed)
    logger = get_run_logger()
    for stage in report.stages:
        if stage.error:
            logger.warning("%s: training failed, previous model and scores kept: %s", stage.stage, stage.error)
    logger.info(report.summary)
    create_markdown_artifact(markdown=report_markdown(report), key=ARTIFACT_KEY,
                             description="hopflow barrier models: CV error, parity plot, learning curve")
    return report
