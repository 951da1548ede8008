"""The barrier surrogate, Prefect- and database-free: barrier models with an uncertainty, rankers built on them
(lower score = claimed first), the ML-potential-to-VASP calibration, and their plots (the retraining loop that feeds
them from the database is hopflow.retraining)."""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import joblib
import numpy as np
import sklearn
from matplotlib.figure import Figure
from sklearn.ensemble import ExtraTreesRegressor, RandomForestRegressor
from sklearn.model_selection import KFold

from hopflow.errors import InsufficientDataError

MIN_TRAINING_SIZE = 10
"""Fewest barriers a model is trained on: below this a cross-validated error means nothing."""
CV_FOLDS = 5
"""Folds of the cross-validation that every trained model records (fewer when there are fewer samples)."""
MIN_CALIBRATION_SIZE = 5
"""Fewest (ML-potential, VASP) pairs a calibration line is fitted to."""
MIXED_WEIGHT = 1.0
"""Default weight of the uncertainty in the `mixed` ranker (mean - weight * std, a lower confidence bound)."""
DIVERSE_PICKS = 2000
"""Farthest-point picks `diverse` makes by default (cost ~ items x picks); the rest follow by distance."""
FEATURE_FLOOR = 1e-12
"""A feature whose spread is below this is constant: it is not scaled (division by ~0) in the diverse ranker."""

ArrayLike = np.ndarray | Sequence[float] | Sequence[Sequence[float]]


# ---------------------------------------------------------------- the model


@dataclass(frozen=True)
class ModelParams:
    """Hyperparameters of a barrier model: a bagged tree ensemble whose spread over trees is the uncertainty."""

    kind: str = "extra-trees"
    """'extra-trees' (extremely randomized trees on bootstrap samples) or 'random-forest'."""
    n_estimators: int = 200
    """Trees in the ensemble."""
    min_samples_leaf: int = 1
    """Fewest samples in a leaf. Keep 1 for extra trees: a random split that leaves fewer on one side is dropped,
    which ends branches early when there are few features."""
    max_features: float = 1.0
    """Fraction of the features each split may look at."""

    def estimator(self, seed: int) -> RandomForestRegressor | ExtraTreesRegressor:
        """A fresh scikit-learn estimator with these hyperparameters (single-threaded: the cores are shared)."""
        kinds = {"extra-trees": ExtraTreesRegressor, "random-forest": RandomForestRegressor}
        if self.kind not in kinds:
            raise ValueError(f"unknown model kind {self.kind!r}; choose one of {sorted(kinds)}")
        return kinds[self.kind](
            n_estimators=self.n_estimators,
            min_samples_leaf=self.min_samples_leaf,
            max_features=self.max_features,
            bootstrap=True,
            random_state=seed,
            n_jobs=1,
        )


@dataclass(frozen=True)
class Prediction:
    """Predicted barriers (eV) and their uncertainty, one per row of the feature matrix."""

    mean: np.ndarray
    std: np.ndarray


class BarrierModel:
    """A fitted tree ensemble: `predict` gives the mean over trees and their standard deviation.

    The spread over bootstrapped trees grows in gaps between training points and where the data disagree;
    beyond the range of the training features trees predict constants, so it does not grow without bound there.
    """

    def __init__(self, params: ModelParams | None = None, seed: int = 0) -> None:
        self.params = params or ModelParams()
        self.seed = seed
        self.estimator = self.params.estimator(seed)
        self.n_features: int | None = None

    def fit(self, X: ArrayLike, y: ArrayLike) -> BarrierModel:
        """Fit to features X (n x d) and barriers y (n, eV); checks the data first."""
        X, y = _check_training_data(X, y)
        self.estimator.fit(X, y)
        self.n_features = X.shape[1]
        return self

    def predict(self, X: ArrayLike) -> Prediction:
        """Mean and standard deviation over the ensemble's trees for each row of X."""
        if self.n_features is None:
            raise RuntimeError("the model is not fitted")
        X = _as_matrix(X)
        if X.shape[1] != self.n_features:
            raise ValueError(f"the model was fitted on {self.n_features} features, got {X.shape[1]}")
        per_tree = np.stack([tree.predict(X) for tree in self.estimator.estimators_])
        return Prediction(mean=per_tree.mean(axis=0), std=per_tree.std(axis=0))


def _as_matrix(X: ArrayLike) -> np.ndarray:
    X = np.asarray(X, dtype=float)
    if X.ndim != 2:
        raise ValueError(f"features must be a 2-D matrix (items x features), got shape {X.shape}")
    return X


def _check_training_data(X: ArrayLike, y: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    X, y = _as_matrix(X), np.asarray(y, dtype=float).ravel()
    if len(X) != len(y):
        raise ValueError(f"{len(X)} feature rows but {len(y)} barriers")
    if len(y) < MIN_TRAINING_SIZE:
        raise InsufficientDataError(
            f"{len(y)} barriers are too few to train a model (need at least {MIN_TRAINING_SIZE})"
        )
    if not np.isfinite(y).all():
        raise InsufficientDataError(f"{int((~np.isfinite(y)).sum())} of {len(y)} barriers are not finite numbers")
    if np.ptp(y) == 0:
        raise InsufficientDataError(f"all {len(y)} barriers are equal ({y[0]:.4g} eV): nothing to learn")
    if np.isinf(X).any():
        raise InsufficientDataError("features contain infinite values")
    return X, y


# ---------------------------------------------------------------- cross-validation


@dataclass(frozen=True)
class CrossValidation:
    """Out-of-fold predictions of a k-fold cross-validation and their mean absolute error (eV)."""

    mean: np.ndarray
    std: np.ndarray
    mae: float
    folds: int


def cross_validate(
    X: ArrayLike, y: ArrayLike, params: ModelParams | None = None, *, folds: int = CV_FOLDS, seed: int = 0
) -> CrossValidation:
    """k-fold (shuffled) cross-validation: every sample predicted by a model that never saw it."""
    X, y = _check_training_data(X, y)
    folds = max(2, min(folds, len(y) // 2))
    mean, std = np.empty_like(y), np.empty_like(y)
    for train_idx, test_idx in KFold(n_splits=folds, shuffle=True, random_state=seed).split(X):
        fold_model = BarrierModel(params, seed).fit(X[train_idx], y[train_idx])
        pred = fold_model.predict(X[test_idx])
        mean[test_idx], std[test_idx] = pred.mean, pred.std
    return CrossValidation(mean=mean, std=std, mae=float(np.mean(np.abs(mean - y))), folds=folds)


def cross_validated_error(
    X: ArrayLike, y: ArrayLike, params: ModelParams | None = None, *, folds: int = CV_FOLDS, seed: int = 0
) -> float:
    """Mean absolute error (eV) of k-fold cross-validated predictions."""
    return cross_validate(X, y, params, folds=folds, seed=seed).mae


@dataclass(frozen=True)
class LearningCurve:
    """Cross-validated error (eV) against the number of training barriers."""

    sizes: tuple[int, ...]
    mae: tuple[float, ...]


def learning_curve(
    X: ArrayLike,
    y: ArrayLike,
    params: ModelParams | None = None,
    *,
    points: int = 5,
    folds: int = CV_FOLDS,
    seed: int = 0,
) -> LearningCurve:
    """Error of models trained on growing random subsets, each tested on the held-out folds of the full set."""
    X, y = _check_training_data(X, y)
    folds = max(2, min(folds, len(y) // 2))
    splits = list(KFold(n_splits=folds, shuffle=True, random_state=seed).split(X))
    largest = min(len(train_idx) for train_idx, _ in splits)
    sizes = sorted({int(round(s)) for s in np.geomspace(MIN_TRAINING_SIZE, largest, points)})
    rng = np.random.default_rng(seed)
    errors = []
    for size in sizes:
        fold_errors = []
        for train_idx, test_idx in splits:
            subset = rng.choice(train_idx, size=size, replace=False)
            if np.ptp(y[subset]) == 0:
                continue
            pred = BarrierModel(params, seed).fit(X[subset], y[subset]).predict(X[test_idx])
            fold_errors.append(float(np.mean(np.abs(pred.mean - y[test_idx]))))
        errors.append(float(np.mean(fold_errors)) if fold_errors else math.nan)
    return LearningCurve(sizes=tuple(sizes), mae=tuple(errors))


# ---------------------------------------------------------------- trained model with provenance


@dataclass(frozen=True)
class TrainedModel:
    """A fitted barrier model and its provenance: what it was trained on, how, how good, when.

    `metadata()` is JSON-able and `to_bytes()` holds the fitted estimator (joblib): the two together are a DB row.
    """

    model: BarrierModel = field(repr=False, compare=False)
    ids: tuple[int, ...]
    """Ids of the training items (e.g. pathway ids), in the order of the training rows."""
    feature_names: tuple[str, ...]
    params: ModelParams
    targets: tuple[float, ...]
    """The training barriers (eV), in the order of `ids`."""
    cv_mean: tuple[float, ...]
    """Out-of-fold predicted barriers (eV) of the cross-validation, in the order of `ids` (for the parity plot)."""
    cv_std: tuple[float, ...]
    cv_mae: float
    """Mean absolute error (eV) of the k-fold cross-validation."""
    cv_folds: int
    seed: int
    created: datetime
    target: str = "barrier"
    """What y is (e.g. 'vasp-neb barrier' or 'best available barrier'); free text for the record."""
    sklearn_version: str = sklearn.__version__

    @property
    def n_train(self) -> int:
        """Number of training barriers."""
        return len(self.ids)

    @property
    def kind(self) -> str:
        """The model kind (e.g. 'extra-trees')."""
        return self.params.kind

    def predict(self, X: ArrayLike) -> Prediction:
        """Predicted barriers and uncertainties; X's columns must be in `feature_names` order."""
        return self.model.predict(X)

    def metadata(self) -> dict[str, Any]:
        """Everything but the estimator, as JSON-able values."""
        return {
            "ids": list(self.ids),
            "feature_names": list(self.feature_names),
            "params": asdict(self.params),
            "targets": list(self.targets),
            "cv_mean": list(self.cv_mean),
            "cv_std": list(self.cv_std),
            "cv_mae": self.cv_mae,
            "cv_folds": self.cv_folds,
            "seed": self.seed,
            "created": self.created.isoformat(),
            "target": self.target,
            "sklearn_version": self.sklearn_version,
            "n_train": self.n_train,
            "kind": self.kind,
        }

    def to_bytes(self) -> bytes:
        """The fitted estimator serialized with joblib (load only bytes you wrote yourself: it is a pickle)."""
        buffer = io.BytesIO()
        joblib.dump(self.model, buffer)
        return buffer.getvalue()

    @classmethod
    def from_stored(cls, metadata: Mapping[str, Any], blob: bytes) -> TrainedModel:
        """Rebuild from `metadata()` and `to_bytes()` (a pickle: only from the project's own database)."""
        model = joblib.load(io.BytesIO(blob))
        if not isinstance(model, BarrierModel):
            raise ValueError(f"stored blob holds a {type(model).__name__}, not a BarrierModel")
        return cls(
            model=model,
            ids=tuple(int(i) for i in metadata["ids"]),
            feature_names=tuple(metadata["feature_names"]),
            params=ModelParams(**metadata["params"]),
            targets=tuple(float(v) for v in metadata["targets"]),
            cv_mean=tuple(float(v) for v in metadata["cv_mean"]),
            cv_std=tuple(float(v) for v in metadata["cv_std"]),
            cv_mae=float(metadata["cv_mae"]),
            cv_folds=int(metadata["cv_folds"]),
            seed=int(metadata["seed"]),
            created=datetime.fromisoformat(metadata["created"]),
            target=str(metadata["target"]),
            sklearn_version=str(metadata["sklearn_version"]),
        )


def train(
    ids: Sequence[int],
    X: ArrayLike,
    y: ArrayLike,
    feature_names: Sequence[str],
    *,
    seed: int = 0,
    params: ModelParams | None = None,
    folds: int = CV_FOLDS,
    target: str = "barrier",
) -> TrainedModel:
    """Cross-validate, then fit on all the data; raises InsufficientDataError when there is too little to learn from.

    A failure raises before anything is returned, so the caller's previous model stays in force.
    """
    params = params or ModelParams()
    X, y = _check_training_data(X, y)
    ids = tuple(int(i) for i in ids)
    if len(ids) != len(y) or len(set(ids)) != len(ids):
        raise ValueError(f"need {len(y)} distinct ids, got {len(ids)} ({len(set(ids))} distinct)")
    if len(feature_names) != X.shape[1]:
        raise ValueError(f"{len(feature_names)} feature names for {X.shape[1]} feature columns")
    cv = cross_validate(X, y, params, folds=folds, seed=seed)
    model = BarrierModel(params, seed).fit(X, y)
    return TrainedModel(
        model=model,
        ids=ids,
        feature_names=tuple(feature_names),
        params=params,
        targets=tuple(float(v) for v in y),
        cv_mean=tuple(float(v) for v in cv.mean),
        cv_std=tuple(float(v) for v in cv.std),
        cv_mae=cv.mae,
        cv_folds=cv.folds,
        seed=seed,
        created=datetime.now(UTC),
        target=target,
    )


def feature_matrix(rows: Sequence[Mapping[str, float | None]], feature_names: Sequence[str]) -> np.ndarray:
    """Rows of named features (e.g. from the features table) as a matrix in `feature_names` order; None -> NaN."""
    matrix = np.full((len(rows), len(feature_names)), np.nan)
    for i, row in enumerate(rows):
        for j, name in enumerate(feature_names):
            value = row.get(name)
            if value is not None:
                matrix[i, j] = float(value)
    return matrix


# ---------------------------------------------------------------- rankers (lower score = claimed first)


def predicted_scores(model: TrainedModel | BarrierModel, X: ArrayLike) -> np.ndarray:
    """`predicted`: the predicted barrier itself, so the lowest predicted barrier is claimed first (exploitation)."""
    return model.predict(X).mean


def uncertain_scores(model: TrainedModel | BarrierModel, X: ArrayLike) -> np.ndarray:
    """`uncertain`: minus the model's uncertainty, so the item it knows least about is claimed first (exploration)."""
    return -model.predict(X).std


def mixed_scores(model: TrainedModel | BarrierModel, X: ArrayLike, weight: float = MIXED_WEIGHT) -> np.ndarray:
    """`mixed`: the lower confidence bound mean - weight * std (eV): optimistic about barriers the model is unsure of.

    weight 0 is `predicted`; a large weight approaches `uncertain`.
    """
    if weight < 0:
        raise ValueError(f"the uncertainty weight must not be negative, got {weight}")
    pred = model.predict(X)
    return pred.mean - weight * pred.std


MODEL_RANKERS = ("predicted", "uncertain", "mixed")
"""Rankers that need a trained model."""
RANKERS = (*MODEL_RANKERS, "diverse")
"""Every learning ranker, by the name a stage's ranker setting uses."""


def ranker_scores(
    name: str,
    X: ArrayLike,
    model: TrainedModel | BarrierModel | None = None,
    *,
    chosen: ArrayLike | None = None,
    weight: float = MIXED_WEIGHT,
    seed: int = 0,
) -> np.ndarray:
    """Scores of the named ranker for the rows of X (lower = claimed first).

    `diverse` needs no model and uses `chosen` (features of items already computed); the others need `model`.
    """
    if name not in RANKERS:
        raise ValueError(f"unknown learning ranker {name!r}; choose one of {list(RANKERS)}")
    if name == "diverse":
        return diverse_order(X, chosen=chosen, seed=seed)
    if model is None:
        raise InsufficientDataError(
            f"ranker {name!r} needs a trained model and none is available: use 'diverse' until one is"
        )
    if name == "predicted":
        return predicted_scores(model, X)
    if name == "uncertain":
        return uncertain_scores(model, X)
    return mixed_scores(model, X, weight)


def standardize(X: ArrayLike, reference: ArrayLike | None = None) -> np.ndarray:
    """Scale each column to zero mean and unit spread over `reference` (default X); NaN -> 0 (the mean)."""
    X = _as_matrix(X)
    ref = X if reference is None else _as_matrix(reference)
    with np.errstate(all="ignore"):
        centre = np.nan_to_num(np.nanmean(ref, axis=0))
        spread = np.nan_to_num(np.nanstd(ref, axis=0))
    spread[spread < FEATURE_FLOOR] = 1.0
    return np.nan_to_num((X - centre) / spread)


def diverse_order(
    X: ArrayLike, k: int | None = None, chosen: ArrayLike | None = None, *, seed: int = 0
) -> np.ndarray:
    """`diverse`: farthest-point sampling in standardized feature space; returns each item's score = claim order.

    The first k items picked each lie farthest from everything picked before them (and from `chosen`, the
    features of items already computed); this greedily minimizes the k-centre cost, the largest distance from any
    item to its nearest picked one, within a factor of 2 of the optimum. Without `chosen` the first pick is random
    (by `seed`). Items after the first k (default DIVERSE_PICKS) follow in order of their distance to the picked
    set, farthest first. Scores are 0, 1, 2 ... (ties are impossible).
    """
    X = _as_matrix(X)
    n = len(X)
    k = min(n, DIVERSE_PICKS if k is None else max(0, int(k)))
    known = None if chosen is None or len(chosen) == 0 else _as_matrix(chosen)
    Z = standardize(X, X if known is None else np.vstack([X, known]))
    nearest = np.full(n, np.inf) if known is None else _min_dist(Z, standardize(known, np.vstack([X, known])))
    scores = np.empty(n)
    picked = np.zeros(n, dtype=bool)
    rng = np.random.default_rng(seed)
    for step in range(k):
        if step == 0 and known is None:
            i = int(rng.integers(n))
        else:
            i = int(np.argmax(np.where(picked, -np.inf, nearest)))
        picked[i] = True
        scores[i] = step
        nearest = np.minimum(nearest, np.linalg.norm(Z - Z[i], axis=1))
    rest = np.flatnonzero(~picked)
    # farthest from the picked set first; stable sort keeps index order among equal distances
    scores[rest[np.argsort(-nearest[rest], kind="stable")]] = np.arange(k, n)
    return scores


def _min_dist(Z: np.ndarray, K: np.ndarray) -> np.ndarray:
    nearest = np.full(len(Z), np.inf)
    for row in K:
        nearest = np.minimum(nearest, np.linalg.norm(Z - row, axis=1))
    return nearest


def k_centre_cost(X: ArrayLike, picked: Sequence[int] | np.ndarray) -> float:
    """Largest distance (standardized feature space of X) from any item to its nearest picked item."""
    Z = standardize(X)
    return float(_min_dist(Z, Z[np.asarray(picked, dtype=int)]).max())


# ---------------------------------------------------------------- calibration


@dataclass(frozen=True)
class Calibration:
    """A least-squares line from cheap barriers (ML potential) to accurate ones (VASP): y = slope * x + intercept."""

    slope: float
    intercept: float
    n: int
    rmse: float
    """Root-mean-square residual (eV) of the fitted pairs after calibration."""
    rmse_before: float
    """Root-mean-square difference (eV) of the pairs before calibration."""
    ids: tuple[int, ...]
    source: str
    """The engine whose barriers are corrected, e.g. 'mlip-neb'."""
    reference: str
    """The engine the correction maps to, e.g. 'vasp-neb'."""
    created: datetime

    def apply(self, estimate: ArrayLike | float) -> np.ndarray:
        """Calibrated barriers (eV) of cheap estimates."""
        return self.slope * np.asarray(estimate, dtype=float) + self.intercept

    def metadata(self) -> dict[str, Any]:
        """JSON-able record."""
        record = asdict(self)
        record["ids"] = list(self.ids)
        record["created"] = self.created.isoformat()
        return record

    @classmethod
    def from_metadata(cls, record: Mapping[str, Any]) -> Calibration:
        """Rebuild from `metadata()`."""
        values = dict(record)
        return cls(**{**values, "ids": tuple(values["ids"]), "created": datetime.fromisoformat(values["created"])})


def fit_calibration(
    ids: Sequence[int],
    estimates: ArrayLike,
    references: ArrayLike,
    *,
    source: str = "mlip",
    reference: str = "vasp-neb",
    min_count: int = MIN_CALIBRATION_SIZE,
) -> Calibration:
    """Least-squares line reference ≈ slope * estimate + intercept over pairs computed for the same items."""
    x, y = np.asarray(estimates, dtype=float).ravel(), np.asarray(references, dtype=float).ravel()
    if len(x) != len(y) or len(ids) != len(x):
        raise ValueError(f"{len(ids)} ids, {len(x)} estimates and {len(y)} references must match")
    keep = np.isfinite(x) & np.isfinite(y)
    x, y, kept_ids = x[keep], y[keep], tuple(int(i) for i, k in zip(ids, keep, strict=True) if k)
    if len(x) < max(min_count, 2):
        raise InsufficientDataError(
            f"{len(x)} pairs of {source} and {reference} barriers are too few to calibrate (need {min_count})"
        )
    if np.ptp(x) == 0:
        raise InsufficientDataError(f"all {len(x)} {source} barriers are equal: the calibration slope is undefined")
    slope, intercept = np.polyfit(x, y, 1)
    residual = y - (slope * x + intercept)
    return Calibration(
        slope=float(slope),
        intercept=float(intercept),
        n=len(x),
        rmse=float(np.sqrt(np.mean(residual**2))),
        rmse_before=float(np.sqrt(np.mean((y - x) ** 2))),
        ids=kept_ids,
        source=source,
        reference=reference,
        created=datetime.now(UTC),
    )


# ---------------------------------------------------------------- plots


def parity_plot(
    y_true: ArrayLike, y_pred: ArrayLike, y_std: ArrayLike | None, path: str | Path, *, title: str = "barrier model"
) -> Path:
    """Predicted against computed barriers (eV) with error bars, the y = x line and the MAE; writes a PNG."""
    y_true, y_pred = np.asarray(y_true, dtype=float), np.asarray(y_pred, dtype=float)
    if y_true.shape != y_pred.shape:
        raise ValueError(f"{y_true.shape} computed and {y_pred.shape} predicted barriers do not match")
    fig = Figure(figsize=(4.5, 4.5), dpi=120)
    ax = fig.add_subplot()
    yerr = None if y_std is None else np.asarray(y_std, dtype=float)
    ax.errorbar(y_true, y_pred, yerr=yerr, fmt="o", ms=3, alpha=0.6, elinewidth=0.6, capsize=0)
    finite = np.concatenate([y_true, y_pred])
    finite = finite[np.isfinite(finite)]
    lo, hi = (finite.min(), finite.max()) if len(finite) else (0.0, 1.0)
    pad = 0.05 * (hi - lo or 1.0)
    ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], "k--", lw=0.8)
    mae = float(np.nanmean(np.abs(y_pred - y_true))) if len(y_true) else math.nan
    ax.set(
        xlabel="computed barrier (eV)",
        ylabel="predicted barrier (eV)",
        title=f"{title}: MAE {mae:.3f} eV, n={len(y_true)}",
    )
    ax.set_aspect("equal", adjustable="datalim")
    return _save(fig, path)


def learning_curve_plot(
    sizes: Sequence[int], errors: Sequence[float], path: str | Path, *, title: str = "learning curve"
) -> Path:
    """Cross-validated MAE (eV) against the number of training barriers (log x axis); writes a PNG."""
    if len(sizes) != len(errors):
        raise ValueError(f"{len(sizes)} sizes but {len(errors)} errors")
    fig = Figure(figsize=(5, 3.5), dpi=120)
    ax = fig.add_subplot()
    ax.plot(list(sizes), list(errors), "o-")
    if len(sizes) and min(sizes) > 0:
        ax.set_xscale("log")
    ax.set(xlabel="training barriers", ylabel="cross-validated MAE (eV)", title=title)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def _save(fig: Figure, path: str | Path) -> Path:
    # a bare Figure renders with the Agg canvas: no pyplot state, no display, safe in worker threads
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, format="png")
    return path


__all__ = [
    "MODEL_RANKERS",
    "RANKERS",
    "BarrierModel",
    "Calibration",
    "CrossValidation",
    "InsufficientDataError",
    "LearningCurve",
    "ModelParams",
    "Prediction",
    "TrainedModel",
    "cross_validate",
    "cross_validated_error",
    "diverse_order",
    "feature_matrix",
    "fit_calibration",
    "k_centre_cost",
    "learning_curve",
    "learning_curve_plot",
    "mixed_scores",
    "parity_plot",
    "predicted_scores",
    "ranker_scores",
    "standardize",
    "train",
    "uncertain_scores",
]
