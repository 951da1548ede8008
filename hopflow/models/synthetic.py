"""Tables of the synthetic stage: test machinery that exercises the queue and orchestration at scale (no science)."""

from __future__ import annotations

from sqlalchemy import ForeignKey
from sqlalchemy.orm import Mapped, mapped_column

from hopflow.db import Base, Str16, Str64
from hopflow.models.core import RunOutput


class SyntheticItem(Base):
    """An input item of the synthetic stage: how long it burns or sleeps and how it misbehaves."""

    __tablename__ = "synthetic_items"

    cpu_ms: Mapped[float] = mapped_column(default=50.0)
    sleep_ms: Mapped[float] = mapped_column(default=0.0)
    failure: Mapped[Str16] = mapped_column(default="none")
    fail_attempts: Mapped[int] = mapped_column(default=0)
    fingerprint: Mapped[Str64 | None]
    priority: Mapped[float] = mapped_column(default=0.0)


class SyntheticResult(RunOutput, Base):
    """The synthetic stage's result: the value computed and the time it took."""

    __tablename__ = "synthetic_results"

    item_id: Mapped[int] = mapped_column(ForeignKey("synthetic_items.id"), index=True)
    value: Mapped[float]
    elapsed_s: Mapped[float]
