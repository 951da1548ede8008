"""Tables of the vacancies stage: the symmetry-distinct vacancy sites of a structure's supercell (its input rows) and
their relaxations (its results), shared by every pathway whose endpoints they are."""

from __future__ import annotations

from typing import Any

from sqlalchemy import ForeignKey, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from hopflow.db import Base, Str32, Str64, Str128
from hopflow.models.core import RunOutput


class VacancySite(Base):
    """One orbit of migrating-ion sites in a structure's vacancy supercell (docs/estimates.md)."""

    __tablename__ = "vacancy_sites"
    __table_args__ = (UniqueConstraint("structure_id", "supercell", "site_index"),)

    structure_id: Mapped[int] = mapped_column(ForeignKey("structures.id"), index=True)
    supercell: Mapped[Str128]
    """Integer matrix M (JSON, rows) with supercell lattice = M @ stored lattice."""
    site_index: Mapped[int]
    """Index of the removed ion in `Structure.make_supercell(M)` of the stored structure (the orbit's lowest)."""
    site_label: Mapped[Str32]
    """Element and Wyckoff position, as the pathways' start_label/end_label."""
    orbit_size: Mapped[int]
    """Sites of the supercell in this orbit."""
    nsites: Mapped[int]
    """Atoms of the supercell before the vacancy is made."""
    fingerprint: Mapped[Str64] = mapped_column(index=True)
    """Content identity: the structure's fingerprint, the supercell and the site (the cache key's input part)."""


class Vacancy(RunOutput, Base):
    """A relaxed vacancy supercell (positions relaxed in the relaxed bulk's cell) under one model and settings."""

    __tablename__ = "vacancies"

    site_id: Mapped[int] = mapped_column(ForeignKey("vacancy_sites.id"), index=True)
    structure_id: Mapped[int] = mapped_column(ForeignKey("structures.id"), index=True)
    model: Mapped[Str64]
    energy: Mapped[float]
    """Total energy of the relaxed vacancy supercell (eV)."""
    max_force: Mapped[float]
    """Largest atomic force after the relaxation (eV/Å)."""
    converged: Mapped[bool]
    steps: Mapped[int]
    structure: Mapped[dict[str, Any]]
    """The relaxed vacancy supercell (pymatgen dict; atoms in supercell order, the vacant site left out)."""
    bulk_structure: Mapped[dict[str, Any]]
    """The relaxed bulk cell (stored cell's atom order; lattice and positions relaxed, symmetry kept)."""
    bulk_energy: Mapped[float]
    """Energy of the relaxed bulk cell (eV)."""
    bulk_converged: Mapped[bool]
    max_displacement: Mapped[float]
    """Largest displacement of any atom during the vacancy relaxation (Å)."""
    fill_distance: Mapped[float]
    """Distance from the vacant site to the closest atom after the relaxation (Å)."""
    flag: Mapped[Str32]
    """ok | vacancy-moved | unconverged."""
    flag_reason: Mapped[str | None] = mapped_column(Text)
    settings: Mapped[dict[str, Any]]
    versions: Mapped[dict[str, Any]]
    relax_s: Mapped[float]
