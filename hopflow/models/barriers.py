"""Result tables of the barrier stages: `estimates` (cheap ML-potential tiers) and `neb` (VASP), one schema."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Boolean, Float, ForeignKey, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from hopflow.db import Base, Immutable


class BarrierColumns:
    """The columns of a barrier result (tasks.engines.BarrierResult's fields), shared by both tables."""

    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id"), index=True)
    pathway_id: Mapped[int] = mapped_column(ForeignKey("pathways.id"), index=True)
    engine: Mapped[str] = mapped_column(String(32))
    engine_version: Mapped[str] = mapped_column(String(128))
    barrier: Mapped[float | None] = mapped_column(Float, index=True)
    converged: Mapped[bool] = mapped_column(Boolean)
    energies: Mapped[list[Any]]
    relative_energies: Mapped[list[Any]]
    reaction_coordinate: Mapped[list[Any]]
    max_forces: Mapped[list[Any]]
    n_images: Mapped[int] = mapped_column(Integer)
    moving_index: Mapped[int] = mapped_column(Integer)
    steps: Mapped[int | None] = mapped_column(Integer)
    vacancy_mode: Mapped[str] = mapped_column(String(16))
    charge: Mapped[int] = mapped_column(Integer)
    timings: Mapped[dict[str, Any]]
    settings: Mapped[dict[str, Any]]
    corrections: Mapped[list[Any]]
    continued: Mapped[bool] = mapped_column(Boolean)
    versions: Mapped[dict[str, Any]]
    workdir: Mapped[str | None] = mapped_column(Text)


class Estimate(BarrierColumns, Immutable, Base):
    """A cheap barrier estimate of one pathway (mlip-idpp, mlip-neb); barrier NULL when it did not converge."""

    __tablename__ = "estimates"


class NebResult(BarrierColumns, Immutable, Base):
    """A VASP CI-NEB barrier of one pathway, with custodian's corrections; barrier NULL when it did not converge."""

    __tablename__ = "neb"
