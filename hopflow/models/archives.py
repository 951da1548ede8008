"""The archives imported into this database (hopflow export / import-archive): one row per import that added runs."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy.orm import Mapped, mapped_column

from hopflow.db import Base, Str32, Str64, Str255


class Archive(Base):
    """An imported archive: its file name and SHA-256, what its manifest says, and when it was imported."""

    __tablename__ = "archives"

    name: Mapped[Str255]
    sha256: Mapped[Str64] = mapped_column(index=True)
    """SHA-256 of the whole archive file."""
    format_version: Mapped[int]
    schema_revision: Mapped[Str32]
    """The Alembic revision of the exporting database (the archive's tables have its columns)."""
    hopflow_version: Mapped[Str64 | None]
    exported_at: Mapped[datetime | None]
    imported_at: Mapped[datetime]
    manifest: Mapped[dict[str, Any]]
