"""The HTML report of a screening: what the database holds, gathered into typed views and rendered as one
self-contained page (plots as data URIs, inline CSS, no external request; every data string escaped)."""

from __future__ import annotations

import base64
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from importlib import resources
from pathlib import Path
from typing import Any

from jinja2 import Environment, StrictUndefined, select_autoescape
from sqlalchemy import select
from sqlalchemy.orm import Session

from hopflow import queue
from hopflow.db import utcnow
from hopflow.leaderboard import MaterialEntry, PathwayEntry, material_leaderboard, pathway_leaderboard
from hopflow.models import BarrierModelRow, Estimate, Features, NebResult, Pathway, Run, Source, Structure
from hopflow.models.barriers import BarrierRow
from hopflow.provenance import versions as current_versions

TEMPLATE = "report.html.j2"
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
"""The page may load nothing: images only from data URIs, styles only inline."""
PREDICTORS: tuple[tuple[str, str], ...] = (
    ("length_vs_dmin", "hop length / d_min"),
    ("min_cation_anion_distance", "d_min cation-anion (Å)"),
    ("overlap_cation_max_change", "cation overlap change"),
    ("overlap_anion_max_change", "anion overlap change"),
    ("ewald_energy_change", "Ewald site energy change (eV)"),
)
"""Feature columns shown per pathway (definitions and units in docs/features.md)."""
SHOWN_VERSIONS = ("hopflow", "hopflow_git", "pymatgen", "chgnet", "torch", "prefect")
TABLES: tuple[type[BarrierRow], ...] = (NebResult, Estimate)


@dataclass(frozen=True)
class Provenance:
    """Where one number comes from: the result row, its run and the code that made it."""

    what: str
    """e.g. `estimates #4` or `pathways run 2`."""
    run_id: int
    engine: str | None = None
    model: str | None = None
    engine_version: str | None = None
    versions: Mapping[str, Any] = field(default_factory=dict)
    flow_run_id: str | None = None
    finished_at: datetime | None = None

    @property
    def trace_command(self) -> str:
        return f"hopflow trace {self.run_id}"

    @property
    def line(self) -> str:
        """One line: row, run, engine and model, versions, flow run (the trace command is shown beside it)."""
        parts = [self.what, f"run {self.run_id}"]
        if self.engine:
            parts.append(" ".join(p for p in (self.engine, self.model, f"({self.engine_version})"
                                              if self.engine_version else None) if p))
        shown = [f"{k} {str(v)[:12]}" for k, v in self.versions.items() if k in SHOWN_VERSIONS and v]
        if shown:
            parts.append(", ".join(shown))
        if self.flow_run_id:
            parts.append(f"flow run {self.flow_run_id}")
        if self.finished_at:
            parts.append(f"{self.finished_at:%Y-%m-%d %H:%M} UTC")
        return " · ".join(parts)


@dataclass(frozen=True)
class ResultView:
    """One stored barrier result of a pathway with its profile's image key."""

    table: str
    id: int
    barrier: float | None
    forward_barrier: float | None
    reverse_barrier: float | None
    flag: str
    flag_reason: str | None
    n_images: int
    provenance: Provenance

    @property
    def image_key(self) -> str:
        return profile_key(self.table, self.id)


@dataclass(frozen=True)
class PathwayView:
    """One pathway of a material: its geometry, predictors, best entry and every result."""

    pathway_id: int
    rank: int
    length: float
    dimensionality: int
    start_label: str
    end_label: str
    multiplicity: float
    entry: PathwayEntry | None
    predictors: tuple[tuple[str, float | None], ...]
    results: tuple[ResultView, ...]

    @property
    def best(self) -> ResultView | None:
        """The result the leaderboard chose for this pathway."""
        if self.entry is None:
            return None
        return next((r for r in self.results if (r.table, r.id) == (self.entry.table, self.entry.result_id)), None)


@dataclass(frozen=True)
class SourceView:
    kind: str
    location: str
    key: str


@dataclass(frozen=True)
class MaterialView:
    """One structure: its percolation answer, sources and pathways."""

    entry: MaterialEntry
    spacegroup: str
    nsites: int
    sources: tuple[SourceView, ...]
    pathways: tuple[PathwayView, ...]
    provenance: Provenance

    @property
    def anchor(self) -> str:
        return f"s{self.entry.structure_id}"


@dataclass(frozen=True)
class ModelView:
    """The newest learned barrier model of a stage."""

    stage: str
    model_id: int
    kind: str
    n_train: int
    cv_mae: float
    trained_at: datetime
    target: str
    seed: int
    sklearn_version: str | None

    @property
    def parity_key(self) -> str:
        return f"parity-{self.stage}"

    @property
    def curve_key(self) -> str:
        return f"curve-{self.stage}"


@dataclass(frozen=True)
class Report:
    """Everything the page shows, read in one session."""

    generated_at: datetime
    database: str
    materials: tuple[MaterialView, ...]
    models: tuple[ModelView, ...]
    progress: Mapping[str, queue.StageCounts]
    versions: Mapping[str, Any]

    def profile_results(self) -> list[tuple[MaterialView, PathwayView, ResultView]]:
        """Every result whose energy profile the page shows (each pathway's chosen one)."""
        return [(m, p, p.best) for m in self.materials for p in m.pathways if p.best is not None]


def profile_key(table: str, result_id: int) -> str:
    """Image key of a result's energy profile."""
    return f"profile-{table}-{result_id}"


def _provenance(what: str, run: Run | None, row: BarrierRow | None = None) -> Provenance:
    if run is None:
        return Provenance(what=what, run_id=row.run_id if row is not None else 0)
    return Provenance(what=what, run_id=run.id, engine=row.engine if row is not None else None,
                      model=row.model if row is not None else None,
                      engine_version=row.engine_version if row is not None else None,
                      versions=dict(run.versions or {}), flow_run_id=run.flow_run_id, finished_at=run.finished_at)


def _results(session: Session, runs: Mapping[int, Run]) -> dict[int, list[ResultView]]:
    """Every barrier result per pathway id, newest first."""
    out: dict[int, list[ResultView]] = defaultdict(list)
    for table in TABLES:
        for row in session.scalars(select(table).order_by(table.id.desc())):
            assert isinstance(row, table)  # select() of a union of tables types its rows as their common base
            out[row.pathway_id].append(ResultView(
                table=table.__tablename__, id=row.id, barrier=row.barrier, forward_barrier=row.forward_barrier,
                reverse_barrier=row.reverse_barrier, flag=row.flag, flag_reason=row.flag_reason,
                n_images=row.n_images,
                provenance=_provenance(f"{table.__tablename__} #{row.id}", runs.get(row.run_id), row)))
    return out


def _predictors(session: Session, pathway_ids: Sequence[int]) -> dict[int, tuple[tuple[str, float | None], ...]]:
    """The newest features row's predictors per pathway."""
    out = {}
    for row in session.scalars(select(Features).where(Features.pathway_id.in_(list(pathway_ids)))
                               .order_by(Features.id)):
        out[row.pathway_id] = tuple((label, getattr(row, name)) for name, label in PREDICTORS)
    return out


def _models(session: Session) -> tuple[ModelView, ...]:
    newest: dict[str, BarrierModelRow] = {}
    for row in session.scalars(select(BarrierModelRow).order_by(BarrierModelRow.id)):
        newest[row.stage] = row
    return tuple(ModelView(stage=r.stage, model_id=r.id, kind=r.kind, n_train=r.n_train, cv_mae=r.cv_mae,
                           trained_at=r.trained_at, target=r.target, seed=r.seed,
                           sklearn_version=(r.meta or {}).get("sklearn_version"))
                 for _, r in sorted(newest.items()))


def collect_report(session: Session, database: str = "") -> Report:
    """Read the leaderboards (the same functions as the CLI and the controller), each material's pathways, results,
    predictors and sources, the newest models and the stage progress."""
    materials = material_leaderboard(session)
    entries = {e.pathway_id: e for e in pathway_leaderboard(session)}
    structure_ids = [m.structure_id for m in materials]
    structures = {s.id: s for s in session.scalars(select(Structure).where(Structure.id.in_(structure_ids)))}
    pathways: dict[int, list[Pathway]] = defaultdict(list)
    run_ids = {m.pathways_run_id for m in materials}
    for p in session.scalars(select(Pathway).where(Pathway.run_id.in_(run_ids)).order_by(Pathway.rank, Pathway.id)):
        pathways[p.structure_id].append(p)
    runs = {r.id: r for r in session.scalars(select(Run).where(Run.stage.in_(["pathways", "estimates", "neb"])))}
    results = _results(session, runs)
    predictors = _predictors(session, [p.id for rows in pathways.values() for p in rows])
    sources: dict[int, list[SourceView]] = defaultdict(list)
    for src in session.scalars(select(Source).where(Source.structure_id.in_(structure_ids)).order_by(Source.id)):
        assert src.structure_id is not None  # selected by it
        sources[src.structure_id].append(SourceView(src.kind, src.location, src.key))
    views = []
    for m in materials:
        structure = structures[m.structure_id]
        rows = tuple(PathwayView(pathway_id=p.id, rank=p.rank, length=p.length, dimensionality=p.dimensionality,
                                 start_label=p.start_label, end_label=p.end_label, multiplicity=p.multiplicity,
                                 entry=entries.get(p.id), predictors=predictors.get(p.id, ()),
                                 results=tuple(results.get(p.id, ()))) for p in pathways[m.structure_id])
        views.append(MaterialView(entry=m, spacegroup=structure.spacegroup, nsites=structure.nsites,
                                  sources=tuple(sources[m.structure_id]), pathways=rows,
                                  provenance=_provenance(f"pathways of structure {m.structure_id}",
                                                         runs.get(m.pathways_run_id))))
    return Report(generated_at=utcnow(), database=database, materials=tuple(views), models=_models(session),
                  progress=queue.progress_counts(session), versions=current_versions())


def model_images(session: Session, models: Sequence[ModelView], directory: Path) -> dict[str, bytes]:
    """Parity and learning-curve PNGs of each model: the files `hopflow retrain` wrote, else drawn now (the parity
    plot from the model's stored out-of-fold predictions, the curve from the current training set; none when too few
    barriers remain for it)."""
    from hopflow.errors import InsufficientDataError
    from hopflow.retraining import training_set
    from hopflow.surrogate import learning_curve, learning_curve_plot, parity_plot

    out: dict[str, bytes] = {}
    for model in models:
        row = session.get(BarrierModelRow, model.model_id)
        assert row is not None
        parity = directory / f"parity-{model.stage}-{model.model_id}.png"
        if not parity.is_file():
            meta = row.meta
            parity_plot(meta["targets"], meta["cv_mean"], meta["cv_std"], parity,
                        title=f"{model.stage} model {model.model_id}: cross-validated")
        out[model.parity_key] = parity.read_bytes()
        curve = directory / f"learning-curve-{model.stage}-{model.model_id}.png"
        if not curve.is_file():
            try:
                data = training_set(session, model.stage)
                points = learning_curve(data.X, data.y, seed=model.seed)
                learning_curve_plot(points.sizes, points.mae, curve,
                                    title=f"{model.stage} model {model.model_id}: learning curve")
            except (InsufficientDataError, ValueError):
                continue
        out[model.curve_key] = curve.read_bytes()
    return out


# ---------------------------------------------------------------- rendering


def data_uri(png: bytes) -> str:
    """A PNG as a data URI (the page loads no file)."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _number(value: float | None, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _environment() -> Environment:
    env = Environment(autoescape=select_autoescape(default=True, default_for_string=True),
                      undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters["num"] = _number
    env.globals["e_star"] = MaterialEntry.e_star_text
    return env


def render_report(report: Report, images: Mapping[str, bytes]) -> str:
    """The page: `images` maps image keys (profile_key, ModelView keys, `materials`) to PNG bytes."""
    template = _environment().from_string(
        resources.files("hopflow").joinpath("data", TEMPLATE).read_text(encoding="utf-8"))
    uris = {key: data_uri(png) for key, png in images.items()}
    model_spread = any(p.entry is not None and p.entry.model_spread is not None
                       for m in report.materials for p in m.pathways)
    return template.render(report=report, images=uris, csp=CSP, model_spread=model_spread,
                           states=("queued", "claimed", "running", "done", "failed", "cached"))


__all__ = ["CSP", "MaterialView", "ModelView", "PathwayView", "Provenance", "Report", "ResultView", "collect_report",
           "data_uri", "model_images", "profile_key", "render_report"]
