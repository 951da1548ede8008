"""Shared fixtures: databases on SQLite and on the real PostgreSQL that the test command starts, the bundled crystals
and fluorite CaF2 (tests/crystals.py), small vacancy cells, and test stages registered for one test only.

Test modules never import this file (nor one another): they take these fixtures, or import the helper modules
(tests/crystals.py, tests/prefect_helpers.py, tests/fake_vasp); tests/test_layers.py checks it."""

from __future__ import annotations

import dataclasses
import os
import uuid
from collections.abc import Callable, Iterator

import crystals
import pytest
from prefect import get_client
from prefect.client.orchestration import SyncPrefectClient
from pymatgen.core import Structure as PmgStructure
from sqlalchemy import Engine, text

from hopflow.db import init_db, make_engine
from hopflow.registry import STAGES, Stage, get_stage, register
from hopflow.settings import get_settings

from prefect_helpers import prefect_api_url

POSTGRES_ENV = "HOPFLOW_TEST_POSTGRES_URL"


def _postgres_url() -> str:
    url = os.environ.get(POSTGRES_ENV)
    if not url:
        raise RuntimeError(f"{POSTGRES_ENV} is not set: run the tests through scripts/test.sh, which starts PostgreSQL")
    return url


def _create_database() -> tuple[str, str]:
    """Create an empty database on the test server; returns (url, name)."""
    base = _postgres_url()
    name = f"hopflow_{uuid.uuid4().hex[:12]}"
    admin = make_engine(base).execution_options(isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    return base.rsplit("/", 1)[0] + "/" + name, name


def _drop_database(name: str) -> None:
    admin = make_engine(_postgres_url()).execution_options(isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture
def prefect_client() -> Iterator[SyncPrefectClient]:
    """A sync client of the test server (scripts/test.sh starts it)."""
    prefect_api_url()
    with get_client(sync_client=True) as client:
        yield client


@pytest.fixture
def postgres_url() -> str:
    """The URL of the test PostgreSQL server's admin database (scripts/test.sh starts the server)."""
    return _postgres_url()


@pytest.fixture
def postgres_database() -> Iterator[Callable[[], str]]:
    """A factory: each call creates an empty database on the test server and returns its URL; every database it made
    is dropped when the test ends. The server is only asked for when the factory is called."""
    made: list[str] = []

    def create() -> str:
        url, name = _create_database()
        made.append(name)
        return url

    yield create
    for name in made:
        _drop_database(name)


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
        url, name = _create_database()
        init_db(make_engine(url)).dispose()
        yield url
        _drop_database(name)


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


@pytest.fixture(scope="session")
def crystal() -> Callable[..., PmgStructure]:
    """The bundled crystal builder: crystal(name, *, oxidation_states=False, a=None), conventional cell."""
    return crystals.crystal


@pytest.fixture
def caf2() -> PmgStructure:
    """Conventional fluorite CaF2 (12 sites) at the bundled a = 5.4631 Å (Speziale & Duffy 2002; crystals.CAF2_A)."""
    return crystals.caf2()


@pytest.fixture
def small_cells(monkeypatch) -> dict[str, str]:
    """Small vacancy supercells and 3 images (crystals.SMALL_CELLS) in the environment, settings re-read."""
    for key, value in crystals.SMALL_CELLS.items():
        monkeypatch.setenv(key, value)
    get_settings.cache_clear()
    return dict(crystals.SMALL_CELLS)


@pytest.fixture
def register_stage() -> Iterator[Callable[..., Stage]]:
    """A factory of stages registered for this test only: register_stage(name, **changes) registers a copy of the
    synthetic stage (or of `base=`) under `name` with the fields in `changes` replaced; register_stage(stage) registers
    `stage` as it is. Every stage it registered leaves the registry when the test ends, so no later test sees it."""
    added: list[str] = []

    def make(stage_or_name: Stage | str, *, base: str = "synthetic", **changes) -> Stage:
        if isinstance(stage_or_name, Stage):
            stage = dataclasses.replace(stage_or_name, **changes) if changes else stage_or_name
        else:
            stage = dataclasses.replace(get_stage(base), name=stage_or_name, **changes)
        if stage.name in STAGES:
            raise ValueError(f"stage {stage.name!r} is registered already: a test stage needs a name of its own")
        register(stage)
        added.append(stage.name)
        return stage

    yield make
    for name in added:
        STAGES.pop(name, None)
