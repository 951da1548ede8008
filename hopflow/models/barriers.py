"""Result tables of the barrier stages: `estimates` (cheap ML-potential tiers) and `neb` (VASP), one schema."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Boolean, ColumnElement, Float, ForeignKey, Integer, String, Text, and_
from sqlalchemy.orm import Mapped, mapped_column

from hopflow.db import Base, Immutable

TRUSTED_FLAG = "ok"
"""The one flag of a barrier that may be ranked as a result (docs/estimates.md lists the others)."""
UNCHECKED_FLAG = "unchecked"
"""Flag of rows stored before the path checks existed (migration 0005): never ranked."""


class BarrierColumns:
    """The columns of a barrier result (tasks.engines.BarrierResult's fields), shared by both tables."""

    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id"), index=True)
    pathway_id: Mapped[int] = mapped_column(ForeignKey("pathways.id"), index=True)
    engine: Mapped[str] = mapped_column(String(32))
    engine_version: Mapped[str] = mapped_column(String(128))
    barrier: Mapped[float | None] = mapped_column(Float, index=True)
    """E_max - min(E_start, E_end) (eV), only for a result flagged `ok`."""
    forward_barrier: Mapped[float | None] = mapped_column(Float)
    """E_max - E_start (eV), only for a result flagged `ok`."""
    reverse_barrier: Mapped[float | None] = mapped_column(Float)
    """E_max - E_end (eV), only for a result flagged `ok`."""
    flag: Mapped[str] = mapped_column(String(32), index=True, default=UNCHECKED_FLAG,
                                      server_default=UNCHECKED_FLAG)
    """ok | intermediate-minimum | vacancy-moved | unconverged | unchecked."""
    flag_reason: Mapped[str | None] = mapped_column(Text)
    model: Mapped[str | None] = mapped_column(String(64))
    """The potential of an ML engine (e.g. chgnet-0.3.0, 7net-0); None for DFT."""
    start_vacancy_id: Mapped[int | None] = mapped_column(ForeignKey("vacancies.id"))
    """The relaxed vacancy the start image was mapped from (vacancy at the hop's end site)."""
    end_vacancy_id: Mapped[int | None] = mapped_column(ForeignKey("vacancies.id"))
    """The relaxed vacancy the end image was mapped from (vacancy at the hop's start site)."""
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


def trusted(table: type[BarrierColumns]) -> ColumnElement[bool]:
    """The condition every consumer of barriers applies: flagged `ok` and carrying a barrier."""
    return and_(table.flag == TRUSTED_FLAG, table.barrier.is_not(None))


class Estimate(BarrierColumns, Immutable, Base):
    """A cheap barrier estimate of one pathway (mlip-idpp, mlip-neb); barrier NULL when it did not converge."""

    __tablename__ = "estimates"


class NebResult(BarrierColumns, Immutable, Base):
    """A VASP CI-NEB barrier of one pathway, with custodian's corrections; barrier NULL when it did not converge."""

    __tablename__ = "neb"
