"""Core tables: sources, structures, the generic run table (queue + provenance), stage settings, ranker scores."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, DateTime, Float, ForeignKey, Index, Integer, String, Text, UniqueConstraint, text
from sqlalchemy.orm import Mapped, mapped_column

from hopflow.db import Base, Immutable


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

    kind: Mapped[str] = mapped_column(String(16))
    key: Mapped[str] = mapped_column(String(128))
    location: Mapped[str] = mapped_column(Text)
    format: Mapped[str | None] = mapped_column(String(32))
    payload: Mapped[str] = mapped_column(Text)
    meta: Mapped[dict[str, Any] | None]
    structure_id: Mapped[int | None] = mapped_column(ForeignKey("structures.id"), index=True)


class Structure(Immutable, Base):
    """A sanitized, deduplicated crystal structure (reduced primitive cell, oxidation states when known)."""

    __tablename__ = "structures"

    formula: Mapped[str] = mapped_column(String(64), index=True)
    chemsys: Mapped[str] = mapped_column(String(128))
    spacegroup: Mapped[str] = mapped_column(String(32))
    spacegroup_number: Mapped[int] = mapped_column(Integer)
    nsites: Mapped[int] = mapped_column(Integer)
    density: Mapped[float] = mapped_column(Float)
    volume: Mapped[float] = mapped_column(Float)
    oxidation_states: Mapped[dict[str, Any] | None]
    oxidation_method: Mapped[str | None] = mapped_column(String(32))
    fingerprint: Mapped[str] = mapped_column(String(128), index=True)
    structure: Mapped[dict[str, Any]]
    run_id: Mapped[int | None] = mapped_column(ForeignKey("runs.id"), index=True)
    energy_above_hull: Mapped[float | None] = mapped_column(Float)


class Run(Base):
    """One unit of a stage's work on one input under one parameter set: the queue entry and its provenance."""

    __tablename__ = "runs"
    __table_args__ = (
        UniqueConstraint("stage", "input_id", "param_hash"),
        Index("ix_runs_claimable", "stage", "param_hash", "state", "priority", "input_id"),
        Index("ix_runs_lease", "state", "lease_expires_at"),
    )

    stage: Mapped[str] = mapped_column(String(32))
    input_id: Mapped[int] = mapped_column(Integer)
    param_hash: Mapped[str] = mapped_column(String(64))
    parameters: Mapped[dict[str, Any]]
    state: Mapped[str] = mapped_column(String(16), default=RunState.QUEUED, server_default=RunState.QUEUED)
    attempts: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    max_attempts: Mapped[int] = mapped_column(Integer, default=3, server_default=text("3"))
    lease_expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    claimant: Mapped[str | None] = mapped_column(String(255))
    ranker: Mapped[str | None] = mapped_column(String(64))
    priority: Mapped[float | None] = mapped_column(Float)
    error: Mapped[str | None] = mapped_column(Text)
    history: Mapped[list[Any] | None]
    cache_key: Mapped[str | None] = mapped_column(String(64), index=True)
    reused_run_id: Mapped[int | None] = mapped_column(ForeignKey("runs.id"))
    versions: Mapped[dict[str, Any] | None]
    host: Mapped[str | None] = mapped_column(String(255))
    flow_run_id: Mapped[str | None] = mapped_column(String(64), index=True)
    claimed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    archive_id: Mapped[int | None] = mapped_column(Integer, index=True)
    """The `archives` row of the import that brought this run in (None: run here)."""
    origin: Mapped[dict[str, Any] | None]
    """For an imported run: its id in the exporting database and the archives it passed through before."""
    batch_limit: Mapped[int | None] = mapped_column(Integer)
    """Largest batch this run may be claimed in: halved each time a batch it was in crashed (None: the stage's)."""


class StageSetting(Base):
    """History of a stage's live settings (cutoffs, target, active ranker): the newest row per key is in force."""

    __tablename__ = "stage_settings"
    __table_args__ = (Index("ix_stage_settings_lookup", "stage", "key", "id"),)

    stage: Mapped[str] = mapped_column(String(32))
    key: Mapped[str] = mapped_column(String(64))
    value: Mapped[Any] = mapped_column(JSON)
    reason: Mapped[str | None] = mapped_column(Text)


class Score(Base):
    """A ranker's priority key for one input item of a stage: lower score is claimed first (ties by item id)."""

    __tablename__ = "scores"
    __table_args__ = (
        UniqueConstraint("stage", "ranker", "item_id"),
        Index("ix_scores_order", "stage", "ranker", "score", "item_id"),
    )

    stage: Mapped[str] = mapped_column(String(32))
    ranker: Mapped[str] = mapped_column(String(64))
    item_id: Mapped[int] = mapped_column(Integer)
    score: Mapped[float] = mapped_column(Float)
