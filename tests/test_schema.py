"""The ORM models and the Alembic migrations describe one schema, on each backend."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

import hopflow.models  # noqa: F401  (registers every table on Base.metadata)
from hopflow.db import Base, make_engine


def test_the_models_match_the_migrated_schema(db_url) -> None:
    """Tables, columns, types, nullability, server defaults, indexes, unique and foreign keys: no difference."""
    engine = make_engine(db_url)
    try:
        with engine.connect() as conn:
            context = MigrationContext.configure(conn, opts={"compare_type": True, "compare_server_default": True})
            assert compare_metadata(context, Base.metadata) == []
    finally:
        engine.dispose()
