"""Tables of the learning loop: stored barrier models (with provenance) and ML-potential-to-VASP calibrations."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy.orm import Mapped, mapped_column

from hopflow.db import Base, Immutable, Str32, Str128


class BarrierModelRow(Immutable, Base):
    """One trained barrier model: the fitted estimator (joblib bytes) and TrainedModel.metadata() as provenance.

    `stage` is the stage whose queue the model ranks (its feature list suits that stage's inputs).
    """

    __tablename__ = "barrier_models"

    stage: Mapped[Str32] = mapped_column(index=True)
    kind: Mapped[Str32]
    target: Mapped[Str128]
    n_train: Mapped[int]
    cv_mae: Mapped[float]
    seed: Mapped[int]
    feature_names: Mapped[list[Any]]
    training_ids: Mapped[list[Any]]
    params: Mapped[dict[str, Any]]
    meta: Mapped[dict[str, Any]]
    """TrainedModel.metadata(): ids, targets, out-of-fold predictions, versions, creation time."""
    trained_at: Mapped[datetime]
    blob: Mapped[bytes]


class CalibrationRow(Immutable, Base):
    """A least-squares line from ML-potential barriers (source) to VASP ones (reference): y = slope * x + intercept."""

    __tablename__ = "calibrations"

    source: Mapped[Str32]
    reference: Mapped[Str32]
    slope: Mapped[float]
    intercept: Mapped[float]
    n: Mapped[int]
    rmse: Mapped[float]
    rmse_before: Mapped[float]
    ids: Mapped[list[Any]]
    """Pathway ids of the (estimate, VASP) pairs the line was fitted to."""
    fitted_at: Mapped[datetime]
