"""Tables of the synthetic stage: test machinery that exercises the queue and orchestration at scale (no science)."""

from __future__ import annotations

from sqlalchemy import Float, ForeignKey, Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from hopflow.db import Base, Immutable


class SyntheticItem(Base):
    """An input item of the synthetic stage: how long it burns or sleeps and how it misbehaves."""

    __tablename__ = "synthetic_items"

    cpu_ms: Mapped[float] = mapped_column(Float, default=50.0)
    sleep_ms: Mapped[float] = mapped_column(Float, default=0.0)
    failure: Mapped[str] = mapped_column(String(16), default="none")
    fail_attempts: Mapped[int] = mapped_column(Integer, default=0)
    fingerprint: Mapped[str | None] = mapped_column(String(64))
    priority: Mapped[float] = mapped_column(Float, default=0.0)


class SyntheticResult(Immutable, Base):
    """The synthetic stage's result: the value computed and the time it took."""

    __tablename__ = "synthetic_results"

    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id"), index=True)
    item_id: Mapped[int] = mapped_column(ForeignKey("synthetic_items.id"), index=True)
    value: Mapped[float] = mapped_column(Float)
    elapsed_s: Mapped[float] = mapped_column(Float)
