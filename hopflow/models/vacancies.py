"""Tables of the vacancies stage: the symmetry-distinct vacancy sites of a structure's supercell (its input rows) and
their relaxations (its results), shared by every pathway whose endpoints they are."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Boolean, Float, ForeignKey, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from hopflow.db import Base, Immutable


class VacancySite(Base):
    """One orbit of migrating-ion sites in a structure's vacancy supercell (docs/estimates.md)."""

    __tablename__ = "vacancy_sites"
    __table_args__ = (UniqueConstraint("structure_id", "supercell", "site_index"),)

    structure_id: Mapped[int] = mapped_column(ForeignKey("structures.id"), index=True)
    supercell: Mapped[str] = mapped_column(String(128))
    """Integer matrix M (JSON, rows) with supercell lattice = M @ stored lattice."""
    site_index: Mapped[int] = mapped_column(Integer)
    """Index of the removed ion in `Structure.make_supercell(M)` of the stored structure (the orbit's lowest)."""
    site_label: Mapped[str] = mapped_column(String(32))
    """Element and Wyckoff position, as the pathways' start_label/end_label."""
    orbit_size: Mapped[int] = mapped_column(Integer)
    """Sites of the supercell in this orbit."""
    nsites: Mapped[int] = mapped_column(Integer)
    """Atoms of the supercell before the vacancy is made."""
    fingerprint: Mapped[str] = mapped_column(String(64), index=True)
    """Content identity: the structure's fingerprint, the supercell and the site (the cache key's input part)."""


class Vacancy(Immutable, Base):
    """A relaxed vacancy supercell (positions relaxed in the relaxed bulk's cell) under one model and settings."""

    __tablename__ = "vacancies"

    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id"), index=True)
    site_id: Mapped[int] = mapped_column(ForeignKey("vacancy_sites.id"), index=True)
    structure_id: Mapped[int] = mapped_column(ForeignKey("structures.id"), index=True)
    model: Mapped[str] = mapped_column(String(64))
    energy: Mapped[float] = mapped_column(Float)
    """Total energy of the relaxed vacancy supercell (eV)."""
    max_force: Mapped[float] = mapped_column(Float)
    """Largest atomic force after the relaxation (eV/Å)."""
    converged: Mapped[bool] = mapped_column(Boolean)
    steps: Mapped[int] = mapped_column(Integer)
    structure: Mapped[dict[str, Any]]
    """The relaxed vacancy supercell (pymatgen dict; atoms in supercell order, the vacant site left out)."""
    bulk_structure: Mapped[dict[str, Any]]
    """The relaxed bulk cell (stored cell's atom order; lattice and positions relaxed, symmetry kept)."""
    bulk_energy: Mapped[float] = mapped_column(Float)
    """Energy of the relaxed bulk cell (eV)."""
    bulk_converged: Mapped[bool] = mapped_column(Boolean)
    max_displacement: Mapped[float] = mapped_column(Float)
    """Largest displacement of any atom during the vacancy relaxation (Å)."""
    fill_distance: Mapped[float] = mapped_column(Float)
    """Distance from the vacant site to the closest atom after the relaxation (Å)."""
    flag: Mapped[str] = mapped_column(String(32))
    """ok | vacancy-moved | unconverged."""
    flag_reason: Mapped[str | None] = mapped_column(Text)
    settings: Mapped[dict[str, Any]]
    versions: Mapped[dict[str, Any]]
    relax_s: Mapped[float] = mapped_column(Float)
