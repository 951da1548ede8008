"""The archives imported into this database (hopflow export / import-archive): one row per import that added runs."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import DateTime, Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from hopflow.db import Base


class Archive(Base):
    """An imported archive: its file name and SHA-256, what its manifest says, and when it was imported."""

    __tablename__ = "archives"

    name: Mapped[str] = mapped_column(String(255))
    sha256: Mapped[str] = mapped_column(String(64), index=True)
    """SHA-256 of the whole archive file."""
    format_version: Mapped[int] = mapped_column(Integer)
    schema_revision: Mapped[str] = mapped_column(String(32))
    """The Alembic revision of the exporting database (the archive's tables have its columns)."""
    hopflow_version: Mapped[str | None] = mapped_column(String(64))
    exported_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    imported_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    manifest: Mapped[dict[str, Any]]
