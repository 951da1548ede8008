"""Retraining on the database, Prefect-free: training sets from finished barriers, stored models, the model rankers'
score functions, the ML-potential-to-VASP calibration, and one retrain cycle (the machine learning itself is
hopflow.surrogate)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
from sqlalchemy import Engine, Float, Integer, func, select
from sqlalchemy.orm import Session

from hopflow.db import session_scope
from hopflow.errors import HopflowError, InsufficientDataError
from hopflow.models import BarrierModelRow, CalibrationRow, Estimate, Features, NebResult
from hopflow.models.barriers import trusted
from hopflow.registry import ScoreFunction

if TYPE_CHECKING:
    from hopflow.surrogate import TrainedModel

LOOP_STAGES = ("estimates", "neb")
"""Stages whose queues the learning rankers order (both take pathways as inputs)."""
LEARNING_RANKERS = ("predicted", "uncertain", "mixed", "diverse")
"""Ranker names the loop provides (hopflow.surrogate.RANKERS, repeated so that the stage registry imports no
sklearn)."""
ESTIMATE_FEATURE = "estimate"
"""Extra feature of the neb model: the pathway's best trusted estimate (eV). The estimates queue's items have
none yet, so the estimates model is trained without it."""
FEATURE_NAMES = tuple(
    c.name for c in Features.__table__.columns
    if isinstance(c.type, (Float, Integer)) and c.name not in ("id", "run_id", "pathway_id")
)
"""Numeric columns of `features` a model may use (text and JSON columns are left out)."""
REFERENCE_ENGINE = "vasp-neb"
"""The accurate engine calibrations map to."""
PLOTS_DIR = "plots"
DIVERSE_SEED = 0
"""First pick of `diverse` before any barrier is known (a fixed seed keeps re-ranking reproducible)."""


class TrainingSet(NamedTuple):
    """Pathways with an accurate barrier: ids, feature matrix (NaN = missing), barriers (eV), feature names."""

    ids: list[int]
    X: np.ndarray
    y: np.ndarray
    feature_names: tuple[str, ...]


@dataclass(frozen=True)
class StoredModel:
    """The newest stored model of a stage: its row id and the rebuilt TrainedModel."""

    id: int
    stage: str
    model: TrainedModel


# ---------------------------------------------------------------- reading barriers and features


def neb_barriers(session: Session) -> dict[int, float]:
    """Newest trusted (flag `ok`, converged) VASP NEB barrier per pathway."""
    out: dict[int, float] = {}
    rows = session.execute(select(NebResult.pathway_id, NebResult.barrier)
                           .where(trusted(NebResult), NebResult.converged.is_(True)).order_by(NebResult.id))
    for pathway_id, barrier in rows:
        out[pathway_id] = float(barrier)
    return out


def best_estimates(session: Session, ids: Sequence[int] | None = None) -> dict[int, float]:
    """Lowest trusted (flag `ok`, converged) estimate per pathway (the neb stage's `estimate` ranker key)."""
    query = (select(Estimate.pathway_id, func.min(Estimate.barrier))
             .where(trusted(Estimate), Estimate.converged.is_(True)).group_by(Estimate.pathway_id))
    if ids is not None:
        query = query.where(Estimate.pathway_id.in_(list(ids)))
    return {pathway_id: float(barrier) for pathway_id, barrier in session.execute(query)}


def estimates_by_engine(session: Session) -> dict[str, dict[int, float]]:
    """Newest trusted (flag `ok`, converged) estimate per engine and pathway."""
    out: dict[str, dict[int, float]] = {}
    rows = session.execute(select(Estimate.engine, Estimate.pathway_id, Estimate.barrier)
                           .where(trusted(Estimate), Estimate.converged.is_(True)).order_by(Estimate.id))
    for engine, pathway_id, barrier in rows:
        out.setdefault(engine, {})[pathway_id] = float(barrier)
    return out


def feature_rows(session: Session, ids: Sequence[int] | None = None) -> dict[int, dict[str, float | None]]:
    """Newest features row per pathway, numeric columns only."""
    cols = [getattr(Features, name) for name in FEATURE_NAMES]
    query = select(Features.pathway_id, *cols).order_by(Features.id)
    if ids is not None:
        query = query.where(Features.pathway_id.in_(list(ids)))
    return {row[0]: dict(zip(FEATURE_NAMES, row[1:], strict=True)) for row in session.execute(query)}


def stage_feature_names(stage: str) -> tuple[str, ...]:
    """Features a stage's model uses: the estimate only where the stage's inputs have one (neb)."""
    if stage not in LOOP_STAGES:
        raise ValueError(f"the learning loop ranks {', '.join(LOOP_STAGES)}, not {stage!r}")
    return (*FEATURE_NAMES, ESTIMATE_FEATURE) if stage == "neb" else FEATURE_NAMES


def _matrix(session: Session, ids: Sequence[int], names: Sequence[str]) -> np.ndarray:
    from hopflow.surrogate import feature_matrix

    features = feature_rows(session, ids)
    estimates = best_estimates(session, ids) if ESTIMATE_FEATURE in names else {}
    rows = [{**features.get(i, {}), ESTIMATE_FEATURE: estimates.get(i)} for i in ids]
    return feature_matrix(rows, names)


def training_set(session: Session, stage: str = "neb") -> TrainingSet:
    """Featurized pathways with an accurate barrier: VASP NEB where present, else the best trusted estimate.

    Feature columns that are missing for every training pathway are dropped (nothing to learn from them).
    """
    targets = {**best_estimates(session), **neb_barriers(session)}  # NEB overrides the estimate
    featurized = set(feature_rows(session, list(targets)))
    ids = sorted(i for i in targets if i in featurized)
    names = stage_feature_names(stage)
    X = _matrix(session, ids, names) if ids else np.empty((0, len(names)))
    keep = ~np.all(np.isnan(X), axis=0) if ids else np.ones(len(names), dtype=bool)
    return TrainingSet(ids, X[:, keep], np.array([targets[i] for i in ids], dtype=float),
                       tuple(n for n, k in zip(names, keep, strict=True) if k))


# ---------------------------------------------------------------- models


def retrain(session: Session, seed: int = 0, stage: str = "neb") -> BarrierModelRow:
    """Train a model for a stage's queue on the current training set and store it with its provenance.

    Raises hopflow.errors.InsufficientDataError (nothing stored) when there is too little to learn from; result
    rows are only read.
    """
    from hopflow.surrogate import train

    data = training_set(session, stage)
    trained = train(data.ids, data.X, data.y, data.feature_names, seed=seed,
                    target=f"{REFERENCE_ENGINE} barrier, else best trusted estimate (eV)")
    row = BarrierModelRow(stage=stage, kind=trained.kind, target=trained.target, n_train=trained.n_train,
                          cv_mae=trained.cv_mae, seed=seed, feature_names=list(trained.feature_names),
                          training_ids=list(trained.ids), params=trained.metadata()["params"],
                          meta=trained.metadata(), trained_at=trained.created, blob=trained.to_bytes())
    session.add(row)
    session.flush()
    _CACHE[row.id] = trained
    return row


_CACHE: dict[int, TrainedModel] = {}
"""Unpickled models by row id (rows never change, so a cached model is never stale)."""


def latest_model(session: Session, stage: str = "neb") -> StoredModel | None:
    """The newest stored model of a stage, or None before the first successful retrain."""
    row_id = session.scalar(select(func.max(BarrierModelRow.id)).where(BarrierModelRow.stage == stage))
    if row_id is None:
        return None
    if row_id not in _CACHE:
        from hopflow.surrogate import TrainedModel

        row = session.get(BarrierModelRow, row_id)
        assert row is not None
        _CACHE[row_id] = TrainedModel.from_stored(row.meta, row.blob)
    return StoredModel(id=row_id, stage=stage, model=_CACHE[row_id])


def model_ranker_scores(ranker_name: str, stage: str) -> ScoreFunction:
    """The score function of a learning ranker on a stage's queue (pathway ids -> score, lower claimed first).

    `predicted`, `uncertain` and `mixed` use the stage's newest stored model. Before any model exists they fall back
    to `diverse` scores rather than raising: the queue scores every ranker of a stage whenever items are enqueued,
    and a missing model must not stop that (nor the claims of a stage set to a model ranker). The next retrain
    replaces the fallback scores. `diverse` picks far from the pathways that already have an accurate barrier.
    """
    if ranker_name not in LEARNING_RANKERS:
        raise ValueError(f"unknown learning ranker {ranker_name!r}; choose one of {list(LEARNING_RANKERS)}")
    stage_feature_names(stage)

    def score(session: Session, ids: Sequence[int]) -> Mapping[int, float]:
        from hopflow.surrogate import ranker_scores

        ids = list(ids)
        if not ids:
            return {}
        stored = None if ranker_name == "diverse" else latest_model(session, stage)
        if stored is None:
            names = stage_feature_names(stage)
            chosen = training_set(session, stage)
            known = _matrix(session, chosen.ids, names) if chosen.ids else None
            X = _matrix(session, ids, names)
            seen = ~np.all(np.isnan(X if known is None else np.vstack([X, known])), axis=0)  # skip empty columns
            values = ranker_scores("diverse", X[:, seen], chosen=None if known is None else known[:, seen],
                                   seed=DIVERSE_SEED)
        else:
            values = ranker_scores(ranker_name, _matrix(session, ids, stored.model.feature_names), stored.model)
        return {i: float(v) for i, v in zip(ids, values, strict=True)}

    return score


# ---------------------------------------------------------------- calibration


def calibration_pairs(session: Session) -> dict[str, tuple[list[int], list[float], list[float]]]:
    """Per estimate engine: pathway ids, its estimates and the VASP barriers, for pathways that have both."""
    reference = neb_barriers(session)
    out = {}
    for engine, estimates in estimates_by_engine(session).items():
        ids = sorted(set(estimates) & set(reference))
        out[engine] = (ids, [estimates[i] for i in ids], [reference[i] for i in ids])
    return out


def fit_calibrations(session: Session) -> tuple[list[CalibrationRow], dict[str, str]]:
    """Fit and store a calibration per estimate engine with enough pairs; returns (rows, {engine: why skipped})."""
    from hopflow.surrogate import fit_calibration

    rows, skipped = [], {}
    for engine, (ids, x, y) in sorted(calibration_pairs(session).items()):
        try:
            cal = fit_calibration(ids, x, y, source=engine, reference=REFERENCE_ENGINE)
        except InsufficientDataError as exc:
            skipped[engine] = str(exc)
            continue
        row = CalibrationRow(source=cal.source, reference=cal.reference, slope=cal.slope, intercept=cal.intercept,
                             n=cal.n, rmse=cal.rmse, rmse_before=cal.rmse_before, ids=list(cal.ids),
                             fitted_at=cal.created)
        session.add(row)
        rows.append(row)
    session.flush()
    return rows, skipped


def latest_calibrations(session: Session) -> dict[str, CalibrationRow]:
    """The newest calibration per estimate engine."""
    out: dict[str, CalibrationRow] = {}
    for row in session.scalars(select(CalibrationRow).order_by(CalibrationRow.id)):
        out[row.source] = row
    return out


# ---------------------------------------------------------------- one retrain cycle


@dataclass(frozen=True)
class StageOutcome:
    """One stage's model in a retrain cycle: the stored model and its plots, or why training failed."""

    stage: str
    model_id: int | None = None
    n_train: int = 0
    cv_mae: float | None = None
    features: tuple[str, ...] = ()
    rescored: int = 0
    parity_png: Path | None = None
    curve_png: Path | None = None
    curve: tuple[tuple[int, float], ...] = ()
    error: str | None = None
    """Why training failed (then nothing was stored or re-scored)."""
    plot_error: str | None = None


@dataclass(frozen=True)
class CycleReport:
    """What one retrain cycle did."""

    stages: tuple[StageOutcome, ...]
    calibrations: tuple[str, ...] = ()
    calibration_skipped: Mapping[str, str] = field(default_factory=dict)

    @property
    def summary(self) -> str:
        parts = []
        for s in self.stages:
            if s.error:
                parts.append(f"{s.stage}: not retrained ({s.error}); previous model and scores kept")
            else:
                parts.append(f"{s.stage}: model {s.model_id} on {s.n_train} barriers, CV MAE {s.cv_mae:.3f} eV, "
                             f"{s.rescored} scores")
        parts.extend(f"calibration {c}" for c in self.calibrations)
        return "; ".join(parts)


def _plots(stage: str, row: BarrierModelRow, data: TrainingSet, directory: Path,
           seed: int) -> tuple[Path, Path, tuple[tuple[int, float], ...]]:
    from hopflow.surrogate import learning_curve, learning_curve_plot, parity_plot

    meta = row.meta
    parity = parity_plot(meta["targets"], meta["cv_mean"], meta["cv_std"],
                         directory / f"parity-{stage}-{row.id}.png",
                         title=f"{stage} model {row.id}: cross-validated")
    curve = learning_curve(data.X, data.y, seed=seed)
    path = learning_curve_plot(curve.sizes, curve.mae, directory / f"learning-curve-{stage}-{row.id}.png",
                               title=f"{stage} model {row.id}: learning curve")
    return parity, path, tuple(zip(curve.sizes, curve.mae, strict=True))


MODEL_RANKER = "predicted"
"""The learned ranker a barrier stage switches to once it has a model, unless a user chose a ranker."""


def adopt_model_ranker(session: Session, stage: Any) -> bool:
    """Switch a stage's claims to `predicted` now that a model exists, if its ranker was never chosen by hand (the
    default physics ranker is a stand-in until barriers can be learned)."""
    from hopflow import queue

    if queue.RANKER_KEY in queue.stage_settings(session, stage.name) or MODEL_RANKER not in {r.name for r in
                                                                                          stage.rankers}:
        return False
    return queue.set_active_ranker(session, stage, MODEL_RANKER, reason="a barrier model exists (retrain)")


def retrain_cycle(engine: Engine | None = None, *, seed: int = 0, plot_dir: Path | None = None,
                  stages: Sequence[str] = LOOP_STAGES) -> CycleReport:
    """Retrain each stage's model, fit calibrations, re-score the learning rankers, write plots.

    A stage whose training fails (InsufficientDataError or any other HopflowError/ValueError) keeps its previous
    model and scores: its transaction is rolled back and the failure is reported in the outcome.
    """
    from hopflow import queue
    from hopflow.registry import get_stage
    from hopflow.settings import get_settings

    directory = plot_dir or get_settings().home / PLOTS_DIR
    outcomes = []
    for name in stages:
        stage = get_stage(name)
        try:
            with session_scope(engine, write=True) as session:
                data = training_set(session, name)
                row = retrain(session, seed, name)
                rescored = sum(queue.rank(session, stage, r, refresh=True)
                               for r in LEARNING_RANKERS if r in {x.name for x in stage.rankers})
                adopt_model_ranker(session, stage)
                outcome = StageOutcome(stage=name, model_id=row.id, n_train=row.n_train, cv_mae=row.cv_mae,
                                       features=tuple(row.feature_names), rescored=rescored)
        except (InsufficientDataError, HopflowError, ValueError) as exc:
            outcomes.append(StageOutcome(stage=name, error=f"{type(exc).__name__}: {exc}"))
            continue
        try:
            parity, curve_png, curve = _plots(name, row, data, directory, seed)
            outcome = StageOutcome(**{**outcome.__dict__, "parity_png": parity, "curve_png": curve_png,
                                      "curve": curve})
        except (InsufficientDataError, ValueError) as exc:  # the model is stored; only a plot is missing
            outcome = StageOutcome(**{**outcome.__dict__, "plot_error": str(exc)})
        outcomes.append(outcome)
    with session_scope(engine, write=True) as session:
        rows, skipped = fit_calibrations(session)
        calibrations = tuple(f"{r.source} -> {r.reference}: y = {r.slope:.3f} x + {r.intercept:+.3f} eV "
                             f"(n={r.n}, RMSE {r.rmse_before:.3f} -> {r.rmse:.3f} eV)" for r in rows)
    return CycleReport(stages=tuple(outcomes), calibrations=calibrations, calibration_skipped=skipped)
