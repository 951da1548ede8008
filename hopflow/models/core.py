"""Core tables: sources, structures, the generic run table (queue + provenance), stage settings, ranker scores."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, ForeignKey, Index, Text, UniqueConstraint, text
from sqlalchemy.orm import Mapped, mapped_column

from hopflow.db import Base, Immutable, Str16, Str32, Str64, Str128, Str255


class RunState:
    """Run states. queued -> claimed -> running -> done | failed; sweep puts failed/expired back to queued."""

    QUEUED = "queued"
    CLAIMED = "claimed"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    LIVE = (CLAIMED, RUNNING)
    ALL = (QUEUED, CLAIMED, RUNNING, DONE, FAILED)


class Source(Base):
    """One imported source: a file (content hash + path), a bundled entry, or a Materials Project id."""

    __tablename__ = "sources"
    __table_args__ = (UniqueConstraint("kind", "key"),)

    kind: Mapped[Str16]
    key: Mapped[Str128]
    location: Mapped[str] = mapped_column(Text)
    format: Mapped[Str32 | None]
    payload: Mapped[str] = mapped_column(Text)
    meta: Mapped[dict[str, Any] | None]
    structure_id: Mapped[int | None] = mapped_column(ForeignKey("structures.id"), index=True)


class Structure(Immutable, Base):
    """A sanitized, deduplicated crystal structure (reduced primitive cell, oxidation states when known)."""

    __tablename__ = "structures"

    formula: Mapped[Str64] = mapped_column(index=True)
    chemsys: Mapped[Str128]
    spacegroup: Mapped[Str32]
    spacegroup_number: Mapped[int]
    nsites: Mapped[int]
    density: Mapped[float]
    volume: Mapped[float]
    oxidation_states: Mapped[dict[str, Any] | None]
    oxidation_method: Mapped[Str32 | None]
    fingerprint: Mapped[Str128] = mapped_column(index=True)
    structure: Mapped[dict[str, Any]]
    run_id: Mapped[int | None] = mapped_column(ForeignKey("runs.id"), index=True)
    energy_above_hull: Mapped[float | None]


class Run(Base):
    """One unit of a stage's work on one input under one parameter set: the queue entry and its provenance."""

    __tablename__ = "runs"
    __table_args__ = (
        UniqueConstraint("stage", "input_id", "param_hash"),
        Index("ix_runs_claimable", "stage", "param_hash", "state", "priority", "input_id"),
        Index("ix_runs_lease", "state", "lease_expires_at"),
    )

    stage: Mapped[Str32]
    input_id: Mapped[int]
    param_hash: Mapped[Str64]
    parameters: Mapped[dict[str, Any]]
    state: Mapped[Str16] = mapped_column(default=RunState.QUEUED, server_default=RunState.QUEUED)
    attempts: Mapped[int] = mapped_column(default=0, server_default=text("0"))
    max_attempts: Mapped[int] = mapped_column(default=3, server_default=text("3"))
    lease_expires_at: Mapped[datetime | None]
    claimant: Mapped[Str255 | None]
    ranker: Mapped[Str64 | None]
    priority: Mapped[float | None]
    error: Mapped[str | None] = mapped_column(Text)
    history: Mapped[list[Any] | None]
    cache_key: Mapped[Str64 | None] = mapped_column(index=True)
    reused_run_id: Mapped[int | None] = mapped_column(ForeignKey("runs.id"))
    versions: Mapped[dict[str, Any] | None]
    host: Mapped[Str255 | None]
    flow_run_id: Mapped[Str64 | None] = mapped_column(index=True)
    claimed_at: Mapped[datetime | None]
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    archive_id: Mapped[int | None] = mapped_column(index=True)
    """The `archives` row of the import that brought this run in (None: run here)."""
    origin: Mapped[dict[str, Any] | None]
    """For an imported run: its id in the exporting database and the archives it passed through before."""
    batch_limit: Mapped[int | None]
    """Largest batch this run may be claimed in: halved each time a batch it was in crashed (None: the stage's)."""


class RunOutput(Immutable):
    """Mixin for a stage's result tables: rows written once, each by the run that `run_id` names."""

    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id"), index=True, sort_order=-1)
    """The run that wrote the row (sorted first among the columns, where the migrations put it)."""


class StageSetting(Base):
    """History of a stage's live settings (cutoffs, target, active ranker): the newest row per key is in force."""

    __tablename__ = "stage_settings"
    __table_args__ = (Index("ix_stage_settings_lookup", "stage", "key", "id"),)

    stage: Mapped[Str32]
    key: Mapped[Str64]
    value: Mapped[Any] = mapped_column(JSON)
    reason: Mapped[str | None] = mapped_column(Text)


class Score(Base):
    """A ranker's priority key for one input item of a stage: lower score is claimed first (ties by item id)."""

    __tablename__ = "scores"
    __table_args__ = (
        UniqueConstraint("stage", "ranker", "item_id"),
        Index("ix_scores_order", "stage", "ranker", "score", "item_id"),
    )

    stage: Mapped[Str32]
    ranker: Mapped[Str64]
    item_id: Mapped[int]
    score: Mapped[float]
