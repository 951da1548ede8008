"""Result tables of the pathways stage (one row per distinct hop) and the features stage (one row per pathway)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Boolean, Float, ForeignKey, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from hopflow.db import Base, Immutable


class Pathway(Immutable, Base):
    """One symmetry-distinct hop of the migrating ion in a structure (tasks.pathways.PathwayRecord's fields)."""

    __tablename__ = "pathways"

    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id"), index=True)
    structure_id: Mapped[int] = mapped_column(ForeignKey("structures.id"), index=True)
    ion: Mapped[str] = mapped_column(String(8))
    rank: Mapped[int] = mapped_column(Integer)
    length: Mapped[float] = mapped_column(Float, index=True)
    start_index: Mapped[int] = mapped_column(Integer)
    end_index: Mapped[int] = mapped_column(Integer)
    end_image: Mapped[list[Any]]
    start_frac: Mapped[list[Any]]
    end_frac: Mapped[list[Any]]
    start_cart: Mapped[list[Any]]
    end_cart: Mapped[list[Any]]
    start_label: Mapped[str] = mapped_column(String(32))
    end_label: Mapped[str] = mapped_column(String(32))
    multiplicity: Mapped[float] = mapped_column(Float)
    dimensionality: Mapped[int] = mapped_column(Integer)
    dimensionality_cumlengths: Mapped[int] = mapped_column(Integer)
    max_hop: Mapped[float] = mapped_column(Float)
    max_hop_automatic: Mapped[bool] = mapped_column(Boolean)
    hops_found: Mapped[int | None] = mapped_column(Integer)
    """Distinct hops the search found before `max_paths` kept the shortest (None: stored before it was recorded)."""
    fingerprint: Mapped[str | None] = mapped_column(String(64), index=True)
    """Content identity of the hop: the structure's fingerprint and the hop's geometry (no row ids); the cache key's
    input part for the stages fed by pathways."""


class Features(Immutable, Base):
    """Barrier predictors of one pathway (tasks.features.PathwayFeatures; units in docs/features.md)."""

    __tablename__ = "features"

    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id"), index=True)
    pathway_id: Mapped[int] = mapped_column(ForeignKey("pathways.id"), index=True)
    ion: Mapped[str] = mapped_column(String(8))
    ion_oxidation_state: Mapped[float] = mapped_column(Float)
    oxidation_states: Mapped[dict[str, Any]]
    radii: Mapped[dict[str, Any]]
    radii_description: Mapped[str] = mapped_column(Text)
    ion_fraction: Mapped[float] = mapped_column(Float)
    nsites: Mapped[int] = mapped_column(Integer)
    nsites_supercell: Mapped[int] = mapped_column(Integer)
    length: Mapped[float] = mapped_column(Float)
    min_cation_anion_distance: Mapped[float | None] = mapped_column(Float)
    length_vs_dmin: Mapped[float | None] = mapped_column(Float)
    dimensionality: Mapped[int] = mapped_column(Integer)
    dimensionality_cumlengths: Mapped[int] = mapped_column(Integer)
    nimages: Mapped[int] = mapped_column(Integer)
    overlap_cation_start: Mapped[float | None] = mapped_column(Float)
    overlap_cation_midpoint: Mapped[float | None] = mapped_column(Float)
    overlap_cation_max: Mapped[float | None] = mapped_column(Float)
    overlap_cation_max_change: Mapped[float | None] = mapped_column(Float, index=True)
    overlap_anion_start: Mapped[float | None] = mapped_column(Float)
    overlap_anion_midpoint: Mapped[float | None] = mapped_column(Float)
    overlap_anion_max: Mapped[float | None] = mapped_column(Float)
    overlap_anion_max_change: Mapped[float | None] = mapped_column(Float, index=True)
    overlap_neutral_start: Mapped[float | None] = mapped_column(Float)
    overlap_neutral_midpoint: Mapped[float | None] = mapped_column(Float)
    overlap_neutral_max: Mapped[float | None] = mapped_column(Float)
    overlap_neutral_max_change: Mapped[float | None] = mapped_column(Float)
    ewald_energy_start: Mapped[float] = mapped_column(Float)
    ewald_energy_midpoint: Mapped[float] = mapped_column(Float)
    ewald_energy_max: Mapped[float] = mapped_column(Float)
    ewald_energy_change: Mapped[float] = mapped_column(Float)
