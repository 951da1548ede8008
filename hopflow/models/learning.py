"""Tables of the learning loop: stored barrier models (with provenance) and ML-potential-to-VASP calibrations."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import DateTime, Float, Integer, LargeBinary, String
from sqlalchemy.orm import Mapped, mapped_column

from hopflow.db import Base, Immutable


class BarrierModelRow(Immutable, Base):
    """One trained barrier model: the fitted estimator (joblib bytes) and TrainedModel.metadata() as provenance.

    `stage` is the stage whose queue the model ranks (its feature list suits that stage's inputs).
    """

    __tablename__ = "barrier_models"

    stage: Mapped[str] = mapped_column(String(32), index=True)
    kind: Mapped[str] = mapped_column(String(32))
    target: Mapped[str] = mapped_column(String(128))
    n_train: Mapped[int] = mapped_column(Integer)
    cv_mae: Mapped[float] = mapped_column(Float)
    seed: Mapped[int] = mapped_column(Integer)
    feature_names: Mapped[list[Any]]
    training_ids: Mapped[list[Any]]
    params: Mapped[dict[str, Any]]
    meta: Mapped[dict[str, Any]]
    """TrainedModel.metadata(): ids, targets, out-of-fold predictions, versions, creation time."""
    trained_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    blob: Mapped[bytes] = mapped_column(LargeBinary)


class CalibrationRow(Immutable, Base):
    """A least-squares line from ML-potential barriers (source) to VASP ones (reference): y = slope * x + intercept."""

    __tablename__ = "calibrations"

    source: Mapped[str] = mapped_column(String(32))
    reference: Mapped[str] = mapped_column(String(32))
    slope: Mapped[float] = mapped_column(Float)
    intercept: Mapped[float] = mapped_column(Float)
    n: Mapped[int] = mapped_column(Integer)
    rmse: Mapped[float] = mapped_column(Float)
    rmse_before: Mapped[float] = mapped_column(Float)
    ids: Mapped[list[Any]]
    """Pathway ids of the (estimate, VASP) pairs the line was fitted to."""
    fitted_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
