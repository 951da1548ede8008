"""Database plumbing: one declarative base, engine creation for SQLite/PostgreSQL, one session helper, migrations."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from functools import lru_cache
from importlib import resources
from typing import Annotated, Any, ClassVar, get_args

from sqlalchemy import JSON, DateTime, Engine, MetaData, String, Table, create_engine, event, func
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker
from sqlalchemy.pool import StaticPool

from hopflow.errors import ImmutableResultError
from hopflow.settings import get_settings

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}
SQLITE_BUSY_TIMEOUT_MS = 60_000


def utcnow() -> datetime:
    """Timezone-aware now in UTC (stored naive-UTC on SQLite)."""
    return datetime.now(UTC)


Str8 = Annotated[str, 8]
Str16 = Annotated[str, 16]
Str32 = Annotated[str, 32]
Str64 = Annotated[str, 64]
Str128 = Annotated[str, 128]
Str255 = Annotated[str, 255]
"""Column annotations of bounded strings: `Mapped[Str32]` is a VARCHAR(32) column (Base.type_annotation_map)."""


class Base(DeclarativeBase):
    """The one declarative base: integer id and creation time on every table. Column types follow the annotations:
    int, float, bool as usual, datetime timezone-aware, dicts and lists JSON, `StrN` VARCHAR(N)."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map: ClassVar[dict[Any, Any]] = {
        dict[str, Any]: JSON,
        list[Any]: JSON,
        datetime: DateTime(timezone=True),
        **{alias: String(get_args(alias)[1]) for alias in (Str8, Str16, Str32, Str64, Str128, Str255)},
    }

    id: Mapped[int] = mapped_column(primary_key=True)
    created_at: Mapped[datetime] = mapped_column(server_default=func.now())


def is_sqlite(engine_or_url: Engine | str) -> bool:
    url = str(engine_or_url.url if isinstance(engine_or_url, Engine) else engine_or_url)
    return url.startswith("sqlite")


def is_in_memory(engine: Engine) -> bool:
    """Whether the engine is one in-memory SQLite connection (shared by every thread: no second thread may use it
    while another writes)."""
    return is_sqlite(engine) and engine.url.database in (None, "", ":memory:")


def make_engine(url: str | None = None) -> Engine:
    """An engine for `url` (default: the settings' database URL) with the right options per backend."""
    url = url or get_settings().url
    if is_sqlite(url):
        in_memory = url in ("sqlite://", "sqlite:///:memory:")
        connect_args = {"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000, "check_same_thread": False}
        kwargs: dict[str, Any] = {"connect_args": connect_args}
        if in_memory:
            kwargs["poolclass"] = StaticPool
        else:
            from pathlib import Path

            Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, **kwargs)

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            # Let SQLAlchemy's `begin` event own transaction start so claims can use BEGIN IMMEDIATE.
            dbapi_conn.isolation_level = None
            cur = dbapi_conn.cursor()
            if not in_memory:
                cur.execute("PRAGMA journal_mode=WAL")
            cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        @event.listens_for(engine, "begin")
        def _sqlite_begin(conn: Any) -> None:
            mode = conn.get_execution_options().get("sqlite_begin", "DEFERRED")
            conn.exec_driver_sql(f"BEGIN {mode}")

        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=5)


@lru_cache(maxsize=8)
def get_engine(url: str | None = None) -> Engine:
    """The process-wide engine for a URL (cached)."""
    return make_engine(url)


@lru_cache(maxsize=8)
def _sessionmaker(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


@contextmanager
def session_scope(engine: Engine | None = None, *, write: bool = False) -> Iterator[Session]:
    """One unit of work: commit on success, roll back on error.

    `write=True` takes SQLite's write lock up front (BEGIN IMMEDIATE) so read-then-write units never deadlock.
    """
    engine = engine or get_engine()
    if write and is_sqlite(engine):
        engine = engine.execution_options(sqlite_begin="IMMEDIATE")
    session = _sessionmaker(engine)()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def alembic_config(engine: Engine) -> Any:
    from alembic.config import Config

    script_location = str(resources.files("hopflow") / "migrations")
    cfg = Config()
    cfg.set_main_option("script_location", script_location)
    cfg.set_main_option("sqlalchemy.url", engine.url.render_as_string(hide_password=False).replace("%", "%%"))
    cfg.attributes["engine"] = engine
    return cfg


def init_db(engine: Engine | None = None) -> Engine:
    """Create or upgrade the schema to the newest migration (idempotent)."""
    from alembic import command

    engine = engine or get_engine()
    command.upgrade(alembic_config(engine), "head")
    install_result_guards(engine)
    return engine


class Immutable:
    """Mixin for result tables: rows are written once; updates and deletes through the ORM are rejected."""


@event.listens_for(Session, "before_flush")
def _reject_result_changes(session: Session, _context: Any, _instances: Any) -> None:
    for obj in (*session.dirty, *session.deleted):
        if isinstance(obj, Immutable) and (obj in session.deleted or session.is_modified(obj)):
            name = f"{type(obj).__name__} {getattr(obj, 'id', '?')}"
            raise ImmutableResultError(f"{name} is a stored result and cannot be changed")


# ---------------------------------------------------------------- immutability under raw SQL (PostgreSQL)

RESULT_REWRITE_SETTING = "hopflow.allow_result_rewrite"
"""Transaction-local PostgreSQL setting the guard trigger honours: a migration that must rewrite stored results calls
`allow_result_rewrite(op.get_bind())` first (docs/immutability.md)."""
GUARD_FUNCTION = "hopflow_reject_result_change"
GUARD_TRIGGER = "hopflow_immutable_result"


def result_tables() -> list[str]:
    """Every table whose model is `Immutable` (derived from the models, so a result table added later is covered)."""
    import hopflow.models  # noqa: F401  (registers every model)

    tables = (mapper.local_table for mapper in Base.registry.mappers if issubclass(mapper.class_, Immutable))
    return sorted({table.name for table in tables if isinstance(table, Table) and table.name in Base.metadata.tables})


def install_result_guards(engine: Engine) -> list[str]:
    """On PostgreSQL, a trigger on every result table that rejects UPDATE and DELETE of its rows unless the
    transaction set `hopflow.allow_result_rewrite`; idempotent; returns the tables guarded (none on SQLite, where the
    ORM guard below is the only one)."""
    if engine.dialect.name != "postgresql":
        return []
    from sqlalchemy import inspect, text

    with engine.begin() as conn:
        present = set(inspect(conn).get_table_names())
        tables = [name for name in result_tables() if name in present]
        conn.execute(text(f"""
            CREATE OR REPLACE FUNCTION {GUARD_FUNCTION}() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
                IF coalesce(current_setting('{RESULT_REWRITE_SETTING}', true), '') = 'on' THEN
                    RETURN CASE WHEN TG_OP = 'DELETE' THEN OLD ELSE NEW END;
                END IF;
                RAISE EXCEPTION 'hopflow: % of % row % refused: stored results are immutable', TG_OP,
                    TG_TABLE_NAME, OLD.id USING ERRCODE = 'restrict_violation',
                    HINT = 'a migration that must rewrite results runs SET LOCAL {RESULT_REWRITE_SETTING} = on';
            END $$"""))
        for name in tables:
            conn.execute(text(f'CREATE OR REPLACE TRIGGER {GUARD_TRIGGER} BEFORE UPDATE OR DELETE ON "{name}" '
                              f"FOR EACH ROW EXECUTE FUNCTION {GUARD_FUNCTION}()"))
    return tables


def allow_result_rewrite(connection: Any) -> None:
    """Let the rest of this transaction update or delete result rows (migrations only; PostgreSQL; no-op on
    SQLite). Ends with the transaction: `SET LOCAL`."""
    if connection.dialect.name == "postgresql":
        from sqlalchemy import text

        connection.execute(text(f"SET LOCAL {RESULT_REWRITE_SETTING} = 'on'"))
