"""Markdown artifacts for the Prefect UI: each stage flow run's summary with the report's path, and the controller's
overview (progress per stage, the best materials and pathways, the leaderboard plot and the best energy profiles as
inline PNGs, which the UI's markdown renderer shows). Every data string is escaped for markdown and HTML."""

from __future__ import annotations

import hashlib
import html
import json
import re
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prefect.client.orchestration import SyncPrefectClient
from prefect.client.schemas.actions import ArtifactCreate
from prefect.context import FlowRunContext
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from hopflow import queue
from hopflow.db import session_scope
from hopflow.leaderboard import MaterialEntry, PathwayEntry, material_leaderboard, pathway_leaderboard
from hopflow.models import Estimate, NebResult, RunState
from hopflow.registry import STAGES
from hopflow.report import data_uri
from hopflow.settings import get_settings
from hopflow.stages import BARRIER_COLUMNS

if TYPE_CHECKING:
    from hopflow.flows.controller import TickReport

PROGRESS_KEY = "hopflow-progress"
LEADERBOARD_KEY = "hopflow-leaderboard"
"""Artifact of the per-pathway leaderboard (hopflow.leaderboard.pathway_leaderboard)."""
MATERIALS_KEY = "hopflow-materials"
"""Artifact of the per-structure leaderboard (hopflow.leaderboard.material_leaderboard)."""
LEADERBOARD_SIZE = 20
OVERVIEW_KEY = "hopflow-overview"
REPORT_HTML = "report.html"
OVERVIEW_ROWS = 10
OVERVIEW_PROFILES = 3
"""Energy profiles in the overview (its PNGs are re-published only when the leaderboards or the progress change)."""
PROGRESS_STATES = ("queued", "claimed", "running", "done", "failed", "cached")
_MARKDOWN_SPECIAL = re.compile(r"([\\`*_{}\[\]()#+\-.!|~>])")


def md(value: Any) -> str:
    """A data value as literal markdown text: HTML escaped, markdown punctuation backslashed, one line."""
    text = html.escape(str(value), quote=True).replace("\n", " ")
    return _MARKDOWN_SPECIAL.sub(r"\\\1", text)


def code(value: Any) -> str:
    """A data value as an inline code span (shown literally: no markup inside, backticks replaced)."""
    return "`" + str(value).replace("`", "'").replace("\n", " ") + "`"


def md_table(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-flavoured markdown table; cells escaped with `md`."""
    lines = ["| " + " | ".join(md(c) for c in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join("" if v is None else md(_fmt(v)) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def report_path() -> Path:
    """Where `hopflow screen` and `hopflow report` write the HTML report."""
    return get_settings().home / REPORT_HTML


def report_line() -> str:
    path = report_path()
    state = "written" if path.is_file() else "not written yet"
    return f"HTML report ({state}; {code('hopflow report')} writes it afresh): {code(path.resolve().as_uri())}"


def stage_markdown(stage: str, summary: str, failed: Mapping[int, str], flow_run_id: str | None) -> str:
    """A stage flow run's artifact: its summary, its failures (run id, error), the report's path."""
    parts = [f"# {md(stage)} flow run", "", md(summary), ""]
    if failed:
        parts += ["## Failed runs", "", md_table(["run", "error", "trace"],
                                                [(run_id, error[:300], f"hopflow trace {run_id}")
                                                 for run_id, error in sorted(failed.items())]), ""]
    if flow_run_id:
        parts += [f"Flow run {code(flow_run_id)}; queue state: {code('hopflow status')}", ""]
    parts.append(report_line())
    return "\n".join(parts)


def publish_stage_summary(stage: str, summary: str, failed: Mapping[int, str], flow_run_id: str | None) -> None:
    """Attach the summary artifact to the current flow run (key `hopflow-stage-<stage>`, a new version per run)."""
    from prefect.artifacts import create_markdown_artifact

    create_markdown_artifact(markdown=stage_markdown(stage, summary, failed, flow_run_id),
                             key=f"hopflow-stage-{re.sub(r'[^a-z0-9-]', '-', stage.lower())}",
                             description=f"hopflow {stage}: {summary}")


# ---------------------------------------------------------------- the controller's overview


def progress_table(session: Session, targets: Mapping[str, int], live: Mapping[str, int | None]) -> str:
    """Runs per stage and state (cache hits apart) with the target and the live flow runs the tick found."""
    counts = queue.progress_counts(session)
    rows = []
    for stage in sorted(set(counts) | {s for s, t in targets.items() if t}):
        c = counts.get(stage, queue.StageCounts())
        share = f"{100 * c.finished / c.total:.0f} %" if c.total else "–"
        rows.append((stage, *(getattr(c, s) for s in PROGRESS_STATES), share, targets.get(stage, 0), live.get(stage)))
    return md_table(["stage", *PROGRESS_STATES, "finished", "target", "live runs"], rows)


def _image(alt: str, png: bytes) -> str:
    return f"![{md(alt)}]({data_uri(png)})"


def _profile_png(session: Session, entry: PathwayEntry, directory: Path) -> bytes:
    """The energy profile of a pathway's chosen result."""
    from hopflow.tasks.engines.base import BarrierResult
    from hopflow.tasks.plots import plot_energy_profile

    table = NebResult if entry.table == NebResult.__tablename__ else Estimate
    row = session.get(table, entry.result_id)
    assert row is not None
    result = BarrierResult.model_construct(**{name: getattr(row, name) for name in BARRIER_COLUMNS})
    title = f"{entry.formula} pathway {entry.pathway_id}: {entry.engine}" + (f" ({entry.model})" if entry.model else "")
    return plot_energy_profile(result, directory / f"profile-{entry.pathway_id}.png", title=title).read_bytes()


def _materials_png(materials: Sequence[MaterialEntry], directory: Path) -> bytes:
    from hopflow.tasks.plots import LeaderboardRow, plot_leaderboard

    rows = [LeaderboardRow(label=f"{m.formula} #{m.structure_id}", barrier=m.value(3), engine=m.status_3d)
            for m in materials]
    return plot_leaderboard(rows, directory / "materials.png", title="Percolation barriers E*(3D)").read_bytes()


Boards = tuple[Sequence[MaterialEntry], Sequence[PathwayEntry]]
"""The per-material and per-pathway leaderboards, best first."""


def overview_boards(session: Session) -> Boards:
    """The leaderboards the overview shows (the CLI's functions)."""
    return material_leaderboard(session, OVERVIEW_ROWS), pathway_leaderboard(session, OVERVIEW_ROWS)


def overview_markdown(session: Session, targets: Mapping[str, int], live: Mapping[str, int | None],
                      with_images: bool = True, boards: Boards | None = None) -> str:
    """The controller's overview: progress per stage, the best materials and pathways (the CLI's leaderboards),
    the materials plot and the best energy profiles inline, and the report's path."""
    materials, pathways = boards or overview_boards(session)
    materials, pathways = materials[:OVERVIEW_ROWS], pathways[:OVERVIEW_ROWS]
    parts = ["# hopflow", "", "## Progress per stage when the leaderboards last changed", "",
             progress_table(session, targets, live), "",
             f"(live: the {code('hopflow-progress')} artifact, every tick)", "",
             "## Materials: percolation barriers E* (eV)", "",
             md_table(["formula", "structure", "E*(3D)", "E*(2D)", "E*(1D)", "hops known", "cut off"],
                      [(m.formula, m.structure_id, m.e_star_text(3), m.e_star_text(2), m.e_star_text(1),
                        f"{m.hops_known}/{m.hops_total}", m.cut_off or "") for m in materials]), "",
             "## Pathways: best trusted barrier (eV)", "",
             md_table(["formula", "pathway", "hop (Å)", "barrier", "flag", "engine", "model", "model spread",
                       "trace"],
                      [(p.formula, p.pathway_id, p.hop_length, p.barrier, p.flag, p.engine, p.model or "",
                        p.model_spread, f"hopflow trace {p.run_id}") for p in pathways]), ""]
    if with_images:
        with tempfile.TemporaryDirectory() as tmp:
            if materials:
                parts += [_image("percolation barriers E*(3D)", _materials_png(materials, Path(tmp))), ""]
            for entry in [p for p in pathways if p.barrier is not None][:OVERVIEW_PROFILES]:
                parts += [f"### {md(entry.formula)} pathway {entry.pathway_id}", "",
                          _image(f"energy profile of {entry.formula} pathway {entry.pathway_id}",
                                 _profile_png(session, entry, Path(tmp))), ""]
    parts.append(report_line())
    return "\n".join(parts)


def overview_digest(session: Session, boards: Boards) -> str:
    """Changes when a leaderboard changes (the overview, with its PNGs, is re-published only then; the live progress
    is the `hopflow-progress` table artifact, every tick)."""
    materials = [(m.structure_id, m.value(3), m.value(2), m.value(1)) for m in boards[0][:OVERVIEW_ROWS]]
    pathways = [(p.pathway_id, p.table, p.result_id) for p in boards[1][:OVERVIEW_ROWS]]
    bind = session.get_bind()
    where = (str(bind.engine.url), str(report_path()))  # another database is another overview
    return hashlib.sha256(repr((where, materials, pathways)).encode()).hexdigest()[:16]


def latest_description(client: Any, key: str) -> str | None:
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.client.schemas.sorting import ArtifactSort

    found = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])),
                                  sort=ArtifactSort.CREATED_DESC, limit=1)
    return found[0].description if found else None


def publish_overview(client: Any, session: Session, targets: Mapping[str, int], live: Mapping[str, int | None],
                     flow_run_id: Any = None, boards: Boards | None = None) -> bool:
    """Publish the overview when it changed since the last one; returns whether it did. `boards`: the leaderboards
    when the caller has them already (best first, at least OVERVIEW_ROWS long where there are that many)."""
    from prefect.client.schemas.actions import ArtifactCreate

    boards = boards or overview_boards(session)
    digest = overview_digest(session, boards)
    marker = f"(leaderboards {digest})"
    previous = latest_description(client, OVERVIEW_KEY)
    if previous is not None and marker in previous:
        return False
    client.create_artifact(ArtifactCreate(key=OVERVIEW_KEY, type="markdown",
                                          data=overview_markdown(session, targets, live, boards=boards),
                                          description=f"hopflow overview: progress, leaderboards, plots {marker}",
                                          flow_run_id=flow_run_id))
    return True



# ---------------------------------------------------------------- the controller's table artifacts


def progress_rows(session: Session, report: TickReport) -> list[dict[str, Any]]:
    """One row per stage: runs per state (done runs that reused a result also counted as cached), target, live flow
    runs, submitted this tick."""
    counts = queue.progress_counts(session)
    ticks = {s.stage: s for s in report.stages}
    rows = []
    for name in sorted(STAGES):
        stage_tick = ticks.get(name)
        c = counts.get(name, queue.StageCounts())
        rows.append({"stage": name, **{state: getattr(c, state) for state in RunState.ALL}, "cached": c.cached,
                     "target": queue.target(session, STAGES[name]),
                     "live_flow_runs": stage_tick.live if stage_tick else None,
                     "submitted": len(stage_tick.submitted) if stage_tick else 0,
                     "note": (stage_tick.error or "") if stage_tick else ""})
    return rows


def _artifact(client: SyncPrefectClient, key: str, kind: str, data: Any, description: str) -> None:
    ctx = FlowRunContext.get()
    flow_run_id = ctx.flow_run.id if ctx and ctx.flow_run else None
    payload = json.dumps(data, default=str) if kind == "table" else data
    client.create_artifact(ArtifactCreate(key=key, type=kind, data=payload, description=description,
                                          flow_run_id=flow_run_id))


def publish_artifacts(client: SyncPrefectClient, engine: Engine, report: TickReport) -> None:
    """Progress per stage and both leaderboards, as Prefect table artifacts (a new version every tick), and the
    markdown overview with the plots when the leaderboards changed."""
    with session_scope(engine) as session:
        progress = progress_rows(session, report)
        materials = material_leaderboard(session, LEADERBOARD_SIZE)  # once per tick: the tables and the overview
        board = pathway_leaderboard(session, LEADERBOARD_SIZE)
        _artifact(client, PROGRESS_KEY, "table", progress, f"hopflow progress per stage. {report.summary}")
        _artifact(client, MATERIALS_KEY, "table", [asdict(m) for m in materials],
                  "hopflow materials: percolation barriers E*(3D/2D/1D) per structure, lowest first (eV)")
        _artifact(client, LEADERBOARD_KEY, "table", [asdict(p) for p in board],
                  "hopflow leaderboard: lowest trusted barrier per pathway (eV)")
        targets = {row["stage"]: row["target"] for row in progress}
        live = {row["stage"]: row["live_flow_runs"] for row in progress}
        ctx = FlowRunContext.get()
        publish_overview(client, session, targets, live, ctx.flow_run.id if ctx and ctx.flow_run else None,
                         boards=(materials, board))


__all__ = ["LEADERBOARD_KEY", "LEADERBOARD_SIZE", "MATERIALS_KEY", "OVERVIEW_KEY", "PROGRESS_KEY", "code", "md",
           "md_table", "overview_markdown", "progress_rows", "publish_artifacts", "publish_overview",
           "publish_stage_summary", "stage_markdown"]
