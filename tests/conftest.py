"""Shared fixtures: databases on SQLite and on the real PostgreSQL that the test command starts."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest
from sqlalchemy import Engine, text

from hopflow.db import init_db, make_engine
from hopflow.settings import get_settings

POSTGRES_ENV = "HOPFLOW_TEST_POSTGRES_URL"


def postgres_url() -> str:
    url = os.environ.get(POSTGRES_ENV)
    if not url:
        raise RuntimeError(f"{POSTGRES_ENV} is not set: run the tests through scripts/test.sh, which starts PostgreSQL")
    return url


def fresh_postgres_database() -> tuple[str, str]:
    """Create an empty database on the test server; returns (url, name)."""
    base = postgres_url()
    name = f"hopflow_{uuid.uuid4().hex[:12]}"
    admin = make_engine(base).execution_options(isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    return base.rsplit("/", 1)[0] + "/" + name, name


def drop_postgres_database(name: str) -> None:
    admin = make_engine(postgres_url()).execution_options(isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture(autouse=True)
def hopflow_home(tmp_path, monkeypatch) -> Iterator[None]:
    """Every test gets its own data home and SQLite file; no test touches ~/.hopflow."""
    monkeypatch.setenv("HOPFLOW_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("HOPFLOW_DATABASE_URL", raising=False)
    get_settings.cache_clear()
    from hopflow.db import get_engine

    get_engine.cache_clear()
    yield
    get_settings.cache_clear()
    get_engine.cache_clear()


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request, tmp_path) -> Iterator[str]:
    """A migrated, empty database URL on each backend."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'test.sqlite'}"
        init_db(make_engine(url)).dispose()
        yield url
    else:
        url, name = fresh_postgres_database()
        init_db(make_engine(url)).dispose()
        yield url
        drop_postgres_database(name)


@pytest.fixture
def engine(db_url, monkeypatch) -> Iterator[Engine]:
    """The process-wide engine pointed at a fresh database of each backend."""
    monkeypatch.setenv("HOPFLOW_DATABASE_URL", db_url)
    get_settings.cache_clear()
    from hopflow.db import get_engine

    get_engine.cache_clear()
    eng = get_engine()
    yield eng
    eng.dispose()
    get_engine.cache_clear()
