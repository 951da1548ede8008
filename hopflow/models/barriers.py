"""Result tables of the barrier stages: `estimates` (cheap ML-potential tiers) and `neb` (VASP), one schema."""

from __future__ import annotations

from typing import Any

from sqlalchemy import ColumnElement, ForeignKey, Text, and_
from sqlalchemy.orm import Mapped, mapped_column

from hopflow.db import Base, Str16, Str32, Str64, Str128
from hopflow.models.core import RunOutput

TRUSTED_FLAG = "ok"
"""The one flag of a barrier that may be ranked as a result (docs/estimates.md lists the others)."""
UNCHECKED_FLAG = "unchecked"
"""Flag of rows stored before the path checks existed (migration 0005): never ranked."""


class BarrierColumns(RunOutput):
    """The columns of a barrier result (tasks.engines.BarrierResult's fields), shared by both tables."""

    pathway_id: Mapped[int] = mapped_column(ForeignKey("pathways.id"), index=True)
    engine: Mapped[Str32]
    engine_version: Mapped[Str128]
    barrier: Mapped[float | None] = mapped_column(index=True)
    """E_max - min(E_start, E_end) (eV), only for a result flagged `ok`."""
    forward_barrier: Mapped[float | None]
    """E_max - E_start (eV), only for a result flagged `ok`."""
    reverse_barrier: Mapped[float | None]
    """E_max - E_end (eV), only for a result flagged `ok`."""
    flag: Mapped[Str32] = mapped_column(index=True, default=UNCHECKED_FLAG, server_default=UNCHECKED_FLAG)
    """ok | intermediate-minimum | vacancy-moved | unconverged | unchecked."""
    flag_reason: Mapped[str | None] = mapped_column(Text)
    model: Mapped[Str64 | None]
    """The potential of an ML engine (e.g. chgnet-0.3.0, 7net-0); None for DFT."""
    start_vacancy_id: Mapped[int | None] = mapped_column(ForeignKey("vacancies.id"))
    """The relaxed vacancy the start image was mapped from (vacancy at the hop's end site)."""
    end_vacancy_id: Mapped[int | None] = mapped_column(ForeignKey("vacancies.id"))
    """The relaxed vacancy the end image was mapped from (vacancy at the hop's start site)."""
    converged: Mapped[bool]
    energies: Mapped[list[Any]]
    relative_energies: Mapped[list[Any]]
    reaction_coordinate: Mapped[list[Any]]
    max_forces: Mapped[list[Any]]
    n_images: Mapped[int]
    moving_index: Mapped[int]
    steps: Mapped[int | None]
    vacancy_mode: Mapped[Str16]
    charge: Mapped[int]
    timings: Mapped[dict[str, Any]]
    settings: Mapped[dict[str, Any]]
    corrections: Mapped[list[Any]]
    continued: Mapped[bool]
    versions: Mapped[dict[str, Any]]
    workdir: Mapped[str | None] = mapped_column(Text)


def trusted(table: type[BarrierColumns]) -> ColumnElement[bool]:
    """The condition every consumer of barriers applies: flagged `ok` and carrying a barrier."""
    return and_(table.flag == TRUSTED_FLAG, table.barrier.is_not(None))


class Estimate(BarrierColumns, Base):
    """A cheap barrier estimate of one pathway (mlip-idpp, mlip-neb); barrier NULL when it did not converge."""

    __tablename__ = "estimates"


class NebResult(BarrierColumns, Base):
    """A VASP CI-NEB barrier of one pathway, with custodian's corrections; barrier NULL when it did not converge."""

    __tablename__ = "neb"


BarrierRow = Estimate | NebResult
"""A stored barrier of either table."""
