"""Result tables of the pathways stage (one row per distinct hop) and the features stage (one row per pathway)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import ForeignKey, Text
from sqlalchemy.orm import Mapped, mapped_column

from hopflow.db import Base, Str8, Str32, Str64
from hopflow.models.core import RunOutput


class Pathway(RunOutput, Base):
    """One symmetry-distinct hop of the migrating ion in a structure (tasks.pathways.PathwayRecord's fields)."""

    __tablename__ = "pathways"

    structure_id: Mapped[int] = mapped_column(ForeignKey("structures.id"), index=True)
    ion: Mapped[Str8]
    rank: Mapped[int]
    length: Mapped[float] = mapped_column(index=True)
    start_index: Mapped[int]
    end_index: Mapped[int]
    end_image: Mapped[list[Any]]
    start_frac: Mapped[list[Any]]
    end_frac: Mapped[list[Any]]
    start_cart: Mapped[list[Any]]
    end_cart: Mapped[list[Any]]
    start_label: Mapped[Str32]
    end_label: Mapped[Str32]
    multiplicity: Mapped[float]
    dimensionality: Mapped[int]
    dimensionality_cumlengths: Mapped[int]
    max_hop: Mapped[float]
    max_hop_automatic: Mapped[bool]
    hops_found: Mapped[int | None]
    """Distinct hops the search found before `max_paths` kept the shortest (None: stored before it was recorded)."""
    fingerprint: Mapped[Str64 | None] = mapped_column(index=True)
    """Content identity of the hop: the structure's fingerprint and the hop's geometry (no row ids); the cache key's
    input part for the stages fed by pathways."""


class Features(RunOutput, Base):
    """Barrier predictors of one pathway (tasks.features.PathwayFeatures; units in docs/features.md)."""

    __tablename__ = "features"

    pathway_id: Mapped[int] = mapped_column(ForeignKey("pathways.id"), index=True)
    ion: Mapped[Str8]
    ion_oxidation_state: Mapped[float]
    oxidation_states: Mapped[dict[str, Any]]
    radii: Mapped[dict[str, Any]]
    radii_description: Mapped[str] = mapped_column(Text)
    ion_fraction: Mapped[float]
    nsites: Mapped[int]
    nsites_supercell: Mapped[int]
    length: Mapped[float]
    min_cation_anion_distance: Mapped[float | None]
    length_vs_dmin: Mapped[float | None]
    dimensionality: Mapped[int]
    dimensionality_cumlengths: Mapped[int]
    nimages: Mapped[int]
    overlap_cation_start: Mapped[float | None]
    overlap_cation_midpoint: Mapped[float | None]
    overlap_cation_max: Mapped[float | None]
    overlap_cation_max_change: Mapped[float | None] = mapped_column(index=True)
    overlap_anion_start: Mapped[float | None]
    overlap_anion_midpoint: Mapped[float | None]
    overlap_anion_max: Mapped[float | None]
    overlap_anion_max_change: Mapped[float | None] = mapped_column(index=True)
    overlap_neutral_start: Mapped[float | None]
    overlap_neutral_midpoint: Mapped[float | None]
    overlap_neutral_max: Mapped[float | None]
    overlap_neutral_max_change: Mapped[float | None]
    ewald_energy_start: Mapped[float]
    ewald_energy_midpoint: Mapped[float]
    ewald_energy_max: Mapped[float]
    ewald_energy_change: Mapped[float]
